"""The package's shape: docs/architecture.md's module map matches the files, and the client side imports no torch."""

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
                                    "minimind_course.launch", "minimind_course.serve", "minimind_course.chat"])
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
