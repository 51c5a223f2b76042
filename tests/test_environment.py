"""environment.yml (conda users) declares exactly the requirements of pyproject.toml."""

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def normalise(spec: str) -> tuple[str, str]:
    req = Requirement(spec)
    return req.name.lower().replace("_", "-"), str(req.specifier)


def pyproject_requirements() -> set[tuple[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra in ("test", "dev", "vllm", "ecosystem"):
        specs += project["optional-dependencies"][extra]
    return {normalise(s) for s in specs if Requirement(s).name != project["name"]}  # dev includes [test] by name


def environment_requirements() -> set[tuple[str, str]]:
    text = (ROOT / "environment.yml").read_text(encoding="utf-8")
    env = yaml.safe_load(text)
    # vLLM is the documented second step (one resolve with LlamaIndex is impossible): "#   then: pip install X && ..."
    then = [line.split("then: pip install", 1)[1] for line in text.splitlines() if "then: pip install" in line]
    specs = [then[0].split("&&")[0].strip()] if then else []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            specs += [s for s in dep["pip"] if not s.startswith("-")]
        elif not dep.startswith(("python=", "pip")):
            specs.append(dep)
    return {normalise(s) for s in specs}


def test_environment_yml_matches_pyproject():
    assert environment_requirements() == pyproject_requirements()


def test_environment_yml_installs_the_package_itself():
    env = (ROOT / "environment.yml").read_text(encoding="utf-8")
    assert "-e ." in env and "python=3.11" in env


# Imports that come with a declared requirement (FastAPI is built on Starlette and pydantic).
PROVIDED_BY = {"starlette": "fastapi", "pydantic": "fastapi"}
DEV_ONLY_LAYERS = ("bench", "training")  # dev-only layers, installed by `make test`: not part of `make serve`


def imported_distributions(path: Path, local: frozenset[str] = frozenset()) -> set[str]:
    """The installed distributions that the third-party imports of one module come from (``local``: sibling modules)."""
    providers = packages_distributions()
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            tops.add(node.module.split(".")[0])
    tops -= set(sys.stdlib_module_names) | {"minimind_course"} | local
    return {PROVIDED_BY.get(top) or providers[top][0].lower().replace("_", "-") for top in tops}


def test_the_runtime_layers_import_only_declared_dependencies():
    """`make serve` installs the base dependencies only: a module of the server or client that imports anything else
    (xgrammar and jsonschema once came only with vLLM and JupyterLab) fails on that install."""
    base = {name for name, _ in (normalise(spec) for spec in tomllib.loads(
        (ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"])}
    missing = {}
    for path in (ROOT / "minimind_course").rglob("*.py"):
        if path.relative_to(ROOT / "minimind_course").parts[0] in DEV_ONLY_LAYERS:
            continue
        if undeclared := imported_distributions(path) - base:
            missing[str(path.relative_to(ROOT))] = sorted(undeclared)
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def serve_env_tests() -> list[Path]:
    """The test files the Makefile runs in the `make serve` resolution (``SERVE_TESTS``)."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in makefile.splitlines() if line.startswith("SERVE_TESTS :="))
    return [ROOT / name for name in line.split(":=", 1)[1].split()]


def test_the_serve_env_tests_need_only_the_base_install_and_the_test_extra():
    """`make test-serve-env` installs ``.[test,agents]``: a listed test file (or a test helper it imports) that
    needs vLLM, LangChain or JupyterLab would fail there, and a renamed file would silently drop out."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    allowed = {normalise(s)[0] for s in project["dependencies"] + project["optional-dependencies"]["test"]}
    paths = serve_env_tests()
    assert paths and all(p.exists() for p in paths), [str(p) for p in paths if not p.exists()]
    helpers = [p for p in (ROOT / "tests").glob("*.py") if not p.name.startswith("test_")]
    local = frozenset(p.stem for p in (ROOT / "tests").glob("*.py"))
    needs = {str(p.relative_to(ROOT)): sorted(imported_distributions(p, local) - allowed) for p in paths + helpers}
    assert not {k: v for k, v in needs.items() if v}, needs
