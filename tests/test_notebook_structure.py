"""Every course notebook keeps the course's shape, and both READMEs map every notebook.

Shape: a "What you will learn" markdown cell first (its title numbered as the file), a summary with what comes next
after the last numbered section, a versions cell near the top (it prints the python, torch, transformers and course
package versions), an exercises section, and after it solution cells whose source and outputs are collapsed
(``"jupyter": {"source_hidden": true, "outputs_hidden": true}``), a "Further reading" section with links, and no
measured figure in markdown (numbers come from cells). Committed executed top to bottom (1..N) with kernelspec
``python3``, or nbval compares nothing. Every image a markdown cell shows exists, and the mechanism figures in
notebooks/figures/ are the ones ``make_figures.py`` draws.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
COURSE_NUMBERS = [f"{n:02d}" for n in range(10)]  # 00 setup check ... 07 tools ... 09 benchmark
VERSION_WORDS = ("python", "torch", "transformers", "minimind")
VERSIONS_CELL_WITHIN = 3  # cells from the top
EXERCISE_HEADING = re.compile(r"^#+ .*(exercise|练习)", re.I | re.M)
NBVAL_MARKERS = {"NBVAL_IGNORE_OUTPUT", "NBVAL_CHECK_OUTPUT", "NBVAL_SKIP", "NBVAL_RAISES_EXCEPTION"}
BARE_PYTHON = re.compile(r"^\s*!\s*(python3?|pip3?|jupyter)\b", re.M)  # the PATH's python, not the kernel's


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def text(cell: dict) -> str:
    return "".join(cell["source"])


def output_text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append("".join(out.get("text", "")))
        parts.append("".join(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def test_every_course_notebook_exists():
    present = {p.name[:2] for p in NOTEBOOKS}
    assert not [n for n in COURSE_NUMBERS if n not in present], f"missing notebooks: {sorted(set(COURSE_NUMBERS) - present)}"


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
def test_readme_maps_every_notebook(readme: str):
    body = (ROOT / readme).read_text(encoding="utf-8")
    assert not [p.name for p in NOTEBOOKS if f"notebooks/{p.name}" not in body], f"{readme} does not link them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_starts_with_what_you_will_learn(path: Path):
    first = cells(path)[0]
    assert first["cell_type"] == "markdown" and "what you will learn" in text(first).lower()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_title_number_matches_the_file(path: Path):
    assert text(cells(path)[0]).startswith(f"# {path.name[:2]} ·")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ends_with_a_summary_and_what_comes_next(path: Path):
    """A summary section after the last numbered section, naming where the learner goes next."""
    markdown = [text(c) for c in cells(path) if c["cell_type"] == "markdown"]
    summaries = [i for i, body in enumerate(markdown) if body.startswith("## Summary")]
    assert summaries, "no '## Summary' section"
    numbered = [i for i, body in enumerate(markdown) if re.match(r"^## \d+[.·]", body)]
    assert summaries[-1] > max(numbered, default=-1), "the summary must come after the last numbered section"
    summary = markdown[summaries[-1]].lower()
    assert "what comes next" in summary or "where to go from here" in summary


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_has_a_versions_cell_near_the_top(path: Path):
    top = [c for c in cells(path)[:VERSIONS_CELL_WITHIN] if c["cell_type"] == "code"]
    assert any("print" in text(c) and all(word in (text(c) + output_text(c)).lower() for word in VERSION_WORDS)
               for c in top), (
        f"none of the first {VERSIONS_CELL_WITHIN} cells prints the {', '.join(VERSION_WORDS)} versions")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ends_with_exercises_and_a_collapsed_solution(path: Path):
    all_cells = cells(path)
    starts = [i for i, c in enumerate(all_cells) if c["cell_type"] == "markdown" and EXERCISE_HEADING.search(text(c))]
    assert starts, "no markdown heading with 'Exercises'"
    after = all_cells[starts[-1] + 1:]
    solutions = [c for c in after if c["cell_type"] == "code" and c["metadata"].get("jupyter", {}).get("source_hidden")]
    assert solutions, "no collapsed solution cell (metadata jupyter.source_hidden) after the exercises"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_executed_in_order_with_python3_kernel(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    counts = [c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code"]
    assert counts == list(range(1, len(counts) + 1)), "re-run the notebook top to bottom before committing"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nbval_markers_are_exact(path: Path):
    """nbval only honours a comment that is the marker alone: ``# NBVAL_IGNORE_OUTPUT  (why)`` is silently ignored."""
    bad = [(i, line.strip()) for i, c in enumerate(cells(path)) if c["cell_type"] == "code"
           for line in text(c).splitlines()
           if line.strip().startswith("#") and "NBVAL_" in line and line.strip().lstrip("#").strip() not in NBVAL_MARKERS]
    assert not bad, f"put the explanation on its own comment line: {bad}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_shell_commands_use_the_kernels_python(path: Path):
    """``!python`` runs whatever python is first on PATH (``make test`` does not activate .venv): use
    ``!{sys.executable} -m ...`` so the command sees the same packages as the kernel."""
    bad = [i for i, c in enumerate(cells(path)) if c["cell_type"] == "code" and BARE_PYTHON.search(text(c))]
    assert not bad, f"cells {bad} call python/pip/jupyter from PATH"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_vllm_is_checked_before_it_is_started(path: Path):
    """A notebook that starts vLLM first asks whether vLLM can run here (macOS, no AVX2, no GPU...), and runs its
    other cells without it: ``vllm_problem()`` (``vllm_installed()`` misses an installed vLLM that cannot be
    imported), and no ``assert`` that would stop "Run All" where vLLM is missing."""
    code = [text(c) for c in cells(path) if c["cell_type"] == "code"]
    starts = [i for i, body in enumerate(code) if "VLLMServer(" in body]
    if starts:
        checks = [i for i, body in enumerate(code) if "vllm_problem()" in body]
        assert checks and checks[0] <= starts[0], "VLLMServer is started before vllm_problem() is asked"
    asserts = [i for i, body in enumerate(code) if re.search(r"^\s*assert\b.*vllm_(installed|problem)\(", body, re.M)]
    assert not asserts, f"code cells {asserts} stop the notebook where vLLM is missing: print a note instead"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solution_cells_look_alike_and_versions_are_not_compared(path: Path):
    """One title and one tag for every solution cell; the versions cell's output is machine-specific, so ignored."""
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    for cell in code:
        if text(cell).startswith("# Solutions"):
            assert text(cell).startswith(("# Solutions (expand to read)", "# Solutions (continued)")), text(cell)[:60]
            assert "solution" in cell["metadata"].get("tags", []) and cell["metadata"]["jupyter"]["source_hidden"]
    versions = next(c for c in code if all(word in text(c).lower() for word in ("platform", "version")))
    assert "NBVAL_IGNORE_OUTPUT" in text(versions)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solution_outputs_are_hidden_until_opened(path: Path):
    """A solution's printed answer is a spoiler too: its source and its outputs are collapsed in JupyterLab
    (``jupyter.source_hidden`` and ``jupyter.outputs_hidden``); nbval still runs it and compares its outputs."""
    solutions = [c for c in cells(path) if c["cell_type"] == "code" and "solution" in c["metadata"].get("tags", [])]
    assert solutions, "no cell tagged 'solution'"
    for cell in solutions:
        hidden = cell["metadata"].get("jupyter", {})
        assert hidden.get("source_hidden") and hidden.get("outputs_hidden"), text(cell)[:60]
        assert cell.get("outputs") and "NBVAL_SKIP" not in text(cell), f"a solution shows what it prints: {text(cell)[:60]}"


# ---- further reading ----------------------------------------------------------------------------------------
LINK = re.compile(r"\[[^\]]+\]\((https?://[^)\s]+)\)")
BARE_ISSUE = re.compile(r"#\d{2,}(?!\d|\]\()")  # "vLLM #4240" without a link: write [vLLM #4240](https://...)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ends_with_further_reading(path: Path):
    """The papers and references behind the notebook, as links, in a markdown section after the summary."""
    markdown = [text(c) for c in cells(path) if c["cell_type"] == "markdown"]
    reading = [i for i, body in enumerate(markdown) if body.startswith("## Further reading")]
    summaries = [i for i, body in enumerate(markdown) if body.startswith("## Summary")]
    assert reading and summaries and reading[-1] > summaries[-1], "no '## Further reading' section after the summary"
    assert len(LINK.findall(markdown[reading[-1]])) >= 3, "further reading lists at least three linked references"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_issue_numbers_are_links(path: Path):
    bare = {i: BARE_ISSUE.findall(text(c)) for i, c in enumerate(cells(path))
            if c["cell_type"] == "markdown" and BARE_ISSUE.search(text(c))}
    assert not bare, f"link the issues these markdown cells name: {bare}"


def test_bare_issue_pattern():
    assert BARE_ISSUE.findall("vLLM #4240 and llama.cpp #11720") == ["#4240", "#11720"]
    assert not BARE_ISSUE.findall("[vLLM #4240](https://github.com/vllm-project/vllm/issues/4240), [#352](u), ## 3 ·")


# ---- figures ------------------------------------------------------------------------------------------------
FIGURES_DIR = ROOT / "notebooks" / "figures"
FIGURES_SCRIPT = FIGURES_DIR / "make_figures.py"
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")
FIGURE_NAMES = {"request_path.svg", "sse_chunk_sequence.svg", "tool_round_trip.svg", "history_window.svg",
                "paged_kv_cache.svg", "minimind_block.svg", "plan_a_plan_b.svg", "export_mapping.svg",
                "ecosystem_map.svg", "cors_preflight.svg", "roofline.svg"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_image_in_markdown_exists(path: Path):
    """An image a markdown cell shows (``![alt](figures/x.svg)``) is a file in the repository, and has alt text."""
    for cell in cells(path):
        if cell["cell_type"] != "markdown":
            continue
        for match in MARKDOWN_IMAGE.finditer(text(cell)):
            target = match.group(1)
            if target.startswith(("http://", "https://", "attachment:", "data:")):
                continue
            assert (path.parent / target).is_file(), f"{path.name} shows {target}, which does not exist"
            assert len(match.group(0)) > len(f"![]({target}") + 20, f"{path.name}: describe {target} in its alt text"


def test_the_figures_script_runs_and_writes_every_figure(tmp_path: Path):
    """The script draws every committed figure into a fresh folder as a well-formed SVG of the committed width (bytes
    are not compared: paths and glyphs change with matplotlib's version; regenerate with the script, not by hand)."""
    run = subprocess.run([sys.executable, str(FIGURES_SCRIPT), str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in FIGURES_DIR.glob("*.svg")} == FIGURE_NAMES
    for name in FIGURE_NAMES:
        made, committed = ElementTree.parse(tmp_path / name).getroot(), ElementTree.parse(FIGURES_DIR / name).getroot()
        assert made.tag.endswith("svg") and made.get("width") == committed.get("width"), name


# ---- numbers come from cells --------------------------------------------------------------------------------
# A measured figure in prose goes stale with every re-execution (and differs on every machine): markdown points at
# the cell that prints it instead. Caught: a number with a time, speed or ratio unit ("153 ms", "45 s", "82 tok/s",
# "3×", "2.4x", "+44 %", "5 minutes"). Not caught: sizes and limits (1 GiB, 1024 tokens, 16-token blocks) and
# formulas with a spaced "×" ("2 × layers").
MEASURED_FIGURE = re.compile(
    r"(?<![\w.#/-])[+±~≈]?\d+(?:[.,]\d+)*"
    r"(?:\s?(?:ms|s|sec|seconds|min|minutes|tok/s|tokens/s|GB/s|MB/s|%)(?![\w/])|[×x](?!\w))")
# Figures that are not measurements, each with its reason: (notebook number, the exact phrase around the figure).
ALLOWED_FIGURES = {
    ("09", "at 50 GB/s the bound is"): "a worked example of the bound from stated numbers",
    ("09", "about 3.5 tokens/s per sequence"): "the same worked example's result",
}


def measured_figures(markdown: str, notebook: str = "") -> list[str]:
    """The figures in one markdown text that look measured, less the allowed phrases of that notebook."""
    allowed = [phrase for (number, phrase) in ALLOWED_FIGURES if number == notebook]
    spans = [(m.start(), m.end()) for phrase in allowed for m in re.finditer(re.escape(phrase), markdown)]
    return [m.group(0) for m in MEASURED_FIGURE.finditer(markdown)
            if not any(start <= m.start() and m.end() <= end for start, end in spans)]


def test_the_number_rule_catches_the_common_forms():
    stale = ("The stall shrinks from 153 to 48 ms; vLLM started in 45 s at 82.3 tok/s. A step over 16 rows costs "
             "2.4× one row (6.8x the throughput), the gather adds +44 %, 19% of the parameters, 1–5 minutes.")
    assert measured_figures(stale) == ["48 ms", "45 s", "82.3 tok/s", "2.4×", "6.8x", "+44 %", "19%", "5 minutes"]
    fine = ("1 GiB of KV cache, 16-token blocks, 1024 tokens of context, `2 × layers × kv_heads`, port 8998, "
            "hidden 512, 8 layers, max_tokens=32, notebook 09, PR #738, the cell above prints the figure.")
    assert measured_figures(fine) == []
    assert measured_figures("at 50 GB/s the bound is", "09") == [] and measured_figures("at 50 GB/s", "04")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markdown_states_no_measured_figures(path: Path):
    """Numbers come from cells: no markdown cell states a measured time, speed, ratio or share."""
    found = {i: figures for i, c in enumerate(cells(path)) if c["cell_type"] == "markdown"
             if (figures := measured_figures(text(c), path.name[:2]))}
    assert not found, f"markdown cells state measured figures (point at the cell that prints them): {found}"
