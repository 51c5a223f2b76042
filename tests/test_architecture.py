"""The package's shape: docs/architecture.md's module map matches the files, the engine's imports point down, and
the client side imports no torch."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minimind_course"
MAP = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").split("## Module map", 1)[1]
HEAVY = ("torch", "transformers")


def mapped_modules() -> set[str]:
    """Every `path.py` named in the first column of the module table."""
    rows = [line.split("|")[1] for line in MAP.splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`([\w/]+\.py)`", cell)}


def test_every_module_is_in_the_map_and_every_row_exists():
    entry_points = {"__init__.py", "chat.py", "export.py", "train_tiny.py", "eval_tiny.py"}
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if p.name not in ("__init__.py", "__main__.py") and str(p.relative_to(PACKAGE)) not in entry_points}
    mapped = mapped_modules()
    assert sorted(files - mapped) == [], "modules missing from docs/architecture.md"
    assert sorted(mapped - files) == [], "the map names files that do not exist"


ENGINE = PACKAGE / "engine"
# what the engine's lower layers must not know about: the core and everything that drives or feeds it
ABOVE = {
    "sequence": {"core", "engine", "handle", "scheduler", "block_manager", "kv_cache", "runner", "sampler",
                 "output_processor"},
    "block_manager": {"core", "engine", "handle", "scheduler", "sequence", "kv_cache", "runner", "sampler",
                      "output_processor"},
    "scheduler": {"core", "engine", "handle", "kv_cache", "runner", "sampler", "output_processor"},
    "core": {"engine", "handle"},
}


def engine_imports() -> dict[str, set[str]]:
    """Each engine module's imports of other engine modules (TYPE_CHECKING ones included), from its source."""
    graph = {}
    for path in ENGINE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "minimind_course.engine":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minimind_course.engine."):
                found.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("minimind_course.engine.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_engine_imports_have_no_cycle_and_point_down():
    graph = engine_imports()
    assert graph["engine"] >= {"core", "handle"} and graph["core"] >= {"scheduler", "runner", "sampler"}
    for module, forbidden in ABOVE.items():
        assert graph[module] & forbidden == set(), f"engine/{module}.py imports a module above it"
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for child in graph.get(module, ()):
                visit(child, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_the_core_knows_no_threads_or_event_loop_and_no_engine_file_is_long():
    core = {alias.name for node in ast.walk(ast.parse((ENGINE / "core.py").read_text(encoding="utf-8")))
            if isinstance(node, ast.Import) for alias in node.names}
    assert core & {"asyncio", "threading"} == set()
    lengths = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in ENGINE.glob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 300} == {}


def test_the_engine_keeps_its_public_names_importable_from_engine_engine():
    from minimind_course.engine import engine, outputs

    for name in engine.__all__:
        assert hasattr(engine, name), name
    assert engine.StepOutput is outputs.StepOutput


def test_entry_points_are_thin():
    """`python -m minimind_course.chat` etc. only hand over to the module of their layer."""
    for name in ("chat.py", "export.py", "train_tiny.py", "eval_tiny.py"):
        code = [line for line in (PACKAGE / name).read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith(("import", "from", '"""', "if __name__", "    sys.exit"))]
        assert code == [], f"{name} holds code of its own: {code}"


def heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it left in sys.modules."""
    probe = f"import sys\n{code}\nprint('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    return [m for m in run.stdout.rsplit("HEAVY:", 1)[1].strip().split(",") if m]


@pytest.mark.parametrize("module", ["minimind_course", "minimind_course.client", "minimind_course.client.terminal",
                                    "minimind_course.client.widget", "minimind_course.bench.loadgen",
                                    "minimind_course.bench.cli", "minimind_course.bench.timing",
                                    "minimind_course.launch", "minimind_course.serve", "minimind_course.chat",
                                    "minimind_course.engine.config"])
def test_client_side_imports_neither_torch_nor_transformers(module):
    assert heavy_modules_after(f"import {module}") == []


@pytest.mark.parametrize("cli", ["serve", "chat", "bench"])
def test_cli_help_imports_neither_torch_nor_transformers(cli):
    code = (f"import runpy\nsys.argv = ['{cli}', '--help']\ntry:\n    runpy.run_module('minimind_course.{cli}', "
            "run_name='__main__')\nexcept SystemExit:\n    pass")
    assert heavy_modules_after(code) == []


def test_importing_the_model_layer_registers_the_architecture(tmp_path):
    """`import minimind_course.model` is what lets AutoModelForCausalLM load a MiniMind folder."""
    from transformers import AutoModelForCausalLM

    from minimind_course.model import MiniMindConfig, MiniMindForCausalLM

    config = MiniMindConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                            vocab_size=32, intermediate_size=128)
    MiniMindForCausalLM(config).save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "MiniMindForCausalLM"
