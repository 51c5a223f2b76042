"""environment.yml (conda users) declares exactly the requirements of pyproject.toml."""

import tomllib
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
    for extra in ("dev", "vllm", "ecosystem"):
        specs += project["optional-dependencies"][extra]
    return {normalise(s) for s in specs}


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
