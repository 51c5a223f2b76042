"""The docs check: what README*.md and docs/*.md promise must hold.

- A fenced block whose info string has the word ``runnable`` (```` ```bash runnable ```` or
  ```` ```python runnable ````) is run from the repository root. ``http://127.0.0.1:8998`` in it is replaced by
  the test server's address (the session ``server`` fixture), and ``curl`` fails on HTTP errors
  (``--fail-with-body``), so a curl that gets a 4xx/5xx fails the check.
- Every relative link (README*, docs/*.md, markdown cells of the notebooks) points at a file in the repository,
  and a ``#fragment`` into a markdown file names one of its headings (GitHub's anchor rules).
- Every ``python -m minimind_course.X --flag`` in a code block names a flag that ``X --help`` lists, and every
  ``make TARGET`` names a Makefile target.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import mistune
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([*ROOT.glob("README*.md"), *(ROOT / "docs").glob("*.md")])
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DOCUMENTED_URL = "http://127.0.0.1:8998"
RUNNERS = {"bash": ["bash", "-c"], "sh": ["bash", "-c"], "python": [sys.executable, "-c"]}
STRICT_CURL = 'set -euo pipefail\ncurl() { command curl --fail-with-body --silent --show-error "$@"; }\n'
BLOCK_TIMEOUT_S = 300

_parse = mistune.create_markdown(renderer=None, plugins=["table", "strikethrough"])


@dataclass(frozen=True)
class CodeBlock:
    """A fenced code block of a markdown file."""

    path: Path
    line: int
    info: str
    code: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def runnable(self) -> bool:
        return "runnable" in self.info.split()[1:]

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def walk(tokens: list[dict]):
    """Every token of a mistune AST, depth first."""
    for token in tokens:
        yield token
        yield from walk(token.get("children", []))


def plain_text(token: dict) -> str:
    """The visible text of a token (heading text for anchors)."""
    if "raw" in token:
        return token["raw"]
    return "".join(plain_text(child) for child in token.get("children", []))


def code_blocks(path: Path) -> list[CodeBlock]:
    """Fenced blocks with the line of their opening fence (mistune does not report lines, so fences are matched)."""
    text = path.read_text(encoding="utf-8")
    fences = [i + 1 for i, line in enumerate(text.splitlines()) if re.match(r"\s{0,3}(```|~~~)\s*\S", line)]
    blocks = [t for t in walk(_parse(text)) if t["type"] == "block_code" and t.get("attrs", {}).get("info")]
    assert len(fences) == len(blocks), f"{path}: cannot match code fences to blocks (unclosed fence?)"
    return [CodeBlock(path, line, t["attrs"]["info"].strip(), t["raw"]) for line, t in zip(fences, blocks)]


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lower case, punctuation dropped (CJK kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """Heading ids of a markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    ids = set()
    for token in walk(_parse(path.read_text(encoding="utf-8"))):
        if token["type"] == "heading":
            slug = github_anchor(plain_text(token))
            ids.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    ids.update(re.findall(r'<a (?:name|id)="([^"]+)"', path.read_text(encoding="utf-8")))
    return frozenset(ids)


def links(markdown: str) -> list[str]:
    """Link and image targets of a markdown text (inline and reference style, raw <a href>/<img src> too)."""
    targets = [t["attrs"]["url"] for t in walk(_parse(markdown)) if t["type"] in ("link", "image")]
    targets += re.findall(r'<(?:a|img)\s[^>]*(?:href|src)="([^"]+)"', markdown)
    return targets


def link_sources() -> list[tuple[str, Path, str, Path | None]]:
    """(label, folder links are relative to, markdown text, file for #fragment-only links) per doc and notebook cell."""
    sources = [(str(p.relative_to(ROOT)), p.parent, p.read_text(encoding="utf-8"), p) for p in DOC_FILES]
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "markdown":
                sources.append((f"{nb.relative_to(ROOT)} cell {i}", nb.parent, "".join(cell["source"]), None))
    return sources


def broken_links(folder: Path, markdown: str, own: Path | None) -> list[str]:
    """Problems with the relative links of one markdown text (empty when all resolve)."""
    problems = []
    for target in links(markdown):
        parts = urlsplit(target)
        if parts.scheme or target.startswith("//"):
            continue  # http(s), mailto: not checked (no network in tests)
        path = (folder / unquote(parts.path)).resolve() if parts.path else own
        if path is None:
            continue  # a #fragment inside a notebook: Jupyter makes its own anchors
        if ROOT not in (path, *path.parents):
            problems.append(f"{target}: points outside the repository")
        elif not path.exists():
            problems.append(f"{target}: no such file")
        elif parts.fragment and path.suffix == ".md" and unquote(parts.fragment) not in anchors(path):
            problems.append(f"{target}: {path.name} has no heading with id #{parts.fragment}")
    return problems


ALL_BLOCKS = [block for path in DOC_FILES for block in code_blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if block.runnable]


def test_docs_exist_and_link_each_other():
    names = {p.name for p in DOC_FILES}
    assert {"README.md", "README.zh-CN.md"} <= names
    assert "README.zh-CN.md" in links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "README.md" in links((ROOT / "README.zh-CN.md").read_text(encoding="utf-8"))


def test_there_are_runnable_blocks():
    """The README's curl is the promise a newcomer tries first; it must be among the checked blocks."""
    readme_runnable = [b for b in RUNNABLE if b.path.name == "README.md"]
    assert any("curl" in b.code and "/v1/chat/completions" in b.code for b in readme_runnable)
    assert all(b.language in RUNNERS for b in RUNNABLE), [str(b) for b in RUNNABLE if b.language not in RUNNERS]


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_runnable_block_runs(block: CodeBlock, server):
    code = block.code.replace(DOCUMENTED_URL, server.base_url)
    if block.language in ("bash", "sh"):
        code = STRICT_CURL + code
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run([*RUNNERS[block.language], code], cwd=ROOT, env=env, capture_output=True,
                         encoding="utf-8", errors="replace", timeout=BLOCK_TIMEOUT_S)
    assert run.returncode == 0, f"{block} exited {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.stdout.strip(), f"{block} printed nothing"
    assert "\ufffd" not in run.stdout, f"{block} printed a replacement character (broken UTF-8)"


LINK_SOURCES = link_sources()


@pytest.mark.parametrize(("label", "folder", "markdown", "own"), LINK_SOURCES, ids=[s[0] for s in LINK_SOURCES])
def test_relative_links_resolve(label: str, folder: Path, markdown: str, own: Path | None):
    problems = broken_links(folder, markdown, own)
    assert not problems, f"{label}:\n" + "\n".join(problems)


def test_anchor_rules_match_github():
    assert github_anchor("Port already in use: `Address already in use`") == "port-already-in-use-address-already-in-use"
    assert github_anchor("中文乱码（U+FFFD）") == "中文乱码ufffd"
    assert github_anchor("vLLM: MiniMindForCausalLM is not a registered model") == (
        "vllm-minimindforcausallm-is-not-a-registered-model")


# ---- commands named in code blocks ----------------------------------------------------------------------
CLI_CALL = re.compile(r"python3? -m (minimind_course\.\w+)((?:[ \t]+(?:\\\n)?[^\s|;&#]+)*)")


API_CLIS = [("minimind_course.serve", None), ("minimind_course.chat", None), ("minimind_course.export", None),
            ("minimind_course.bench", "sweep"),
            ("minimind_course.bench", "overhead"), ("minimind_course.train_tiny", None), ("minimind_course.eval_tiny", None)]


HELP_SCRIPT = """
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
helps = {}
for module, subcommand in json.loads(sys.argv[1]):
    sys.argv = [module, *([subcommand] if subcommand else []), "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
        except Exception as err:  # e.g. a module the docs name that does not exist
            out.write(f"error: {type(err).__name__}: {err}")
    helps[f"{module} {subcommand}"] = out.getvalue()
print(json.dumps(helps))
"""


@functools.cache
def all_cli_help() -> dict[str, str]:
    """``--help`` of every CLI the docs name, collected in one interpreter (each import of torch costs seconds)."""
    wanted = sorted({(module, sub) for _, module, sub, flags in documented_cli_calls() if flags} | set(API_CLIS))
    run = subprocess.run([sys.executable, "-c", HELP_SCRIPT, json.dumps(wanted)], cwd=ROOT, capture_output=True,
                         encoding="utf-8", timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def cli_help(module: str, subcommand: str | None) -> str:
    """``python -m module [subcommand] --help`` output."""
    text = all_cli_help()[f"{module} {subcommand}"]
    assert "usage:" in text, f"python -m {module} {subcommand or ''} --help printed no usage: {text[:300]}"
    return text


def option_flags(help_text: str) -> set[str]:
    """The long options an argparse --help lists in its options section."""
    return set(re.findall(r"^\s{2}(?:-\w[ \w]*, )?(--[a-z][\w-]*)", help_text, re.M)) - {"--help"}


def documented_cli_calls() -> list[tuple[str, str, str | None, list[str]]]:
    """(where, module, subcommand, flags) for every ``python -m minimind_course.X ...`` in a shell code block."""
    calls = []
    for block in ALL_BLOCKS:
        if block.language not in ("bash", "sh", "console", "shell", "text", ""):
            continue
        for match in CLI_CALL.finditer(block.code):
            words = shlex.split(match.group(2).replace("\\\n", " "), comments=True)
            words = words[:words.index("--")] if "--" in words else words  # after a lone --: vLLM's own flags
            subcommand = words[0] if words and re.fullmatch(r"[a-z]+", words[0]) else None
            flags = [w.split("=")[0] for w in words if w.startswith("--")]
            calls.append((str(block), match.group(1), subcommand, flags))
    return calls


CLI_CALLS = documented_cli_calls()


@pytest.mark.parametrize(("where", "module", "subcommand", "flags"), CLI_CALLS, ids=[c[0] for c in CLI_CALLS])
def test_documented_cli_flags_exist(where: str, module: str, subcommand: str | None, flags: list[str]):
    if not flags:
        return  # nothing to check, and not every module has --help (check_env runs its checks instead)
    text = cli_help(module, subcommand)
    missing = sorted(set(flags) - option_flags(text) - {"--help"})
    assert not missing, f"{where}: python -m {module} {subcommand or ''} has no {', '.join(missing)}"


@pytest.mark.parametrize(("module", "subcommand"), API_CLIS, ids=[m for m, _ in API_CLIS])
def test_api_md_documents_every_flag(module: str, subcommand: str | None):
    """docs/api.md has a section per CLI that names every flag its --help lists."""
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    heading = f"## `python -m {module}`"
    assert heading in api, f"docs/api.md has no section {heading!r}"
    section = api.split(heading, 1)[1].split("\n## ", 1)[0]
    flags = option_flags(cli_help(module, subcommand))
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", section))
    assert not missing, f"docs/api.md, {heading}: undocumented {', '.join(missing)}"


def test_documented_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.M))
    used = {(str(b), t) for b in ALL_BLOCKS for t in re.findall(r"(?:^|[;&|(]|\s)make ([a-z][\w-]*)", b.code)}
    missing = sorted(f"{where}: make {t}" for where, t in used if t not in targets)
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("readme, minute, total", [
    ("README.md", r"\| (\d+) min \|", r"About (\d+) h (\d+) min in all"),
    ("README.zh-CN.md", r"\| (\d+) 分钟 \|", r"合计约 (\d+) 小时 (\d+) 分钟"),
])
def test_the_readme_total_is_the_sum_of_the_notebook_times(readme, minute, total):
    """The course's stated length is what its notebook table adds up to (one row per course notebook)."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(r"\| \d\d \| \[", line)]
    assert len(rows) == len([p for p in NOTEBOOKS if re.match(r"\d\d_", p.name)])
    minutes = sum(int(re.search(minute, row).group(1)) for row in rows)
    hours, rest = (int(g) for g in re.search(total, text).groups())
    assert minutes == 60 * hours + rest
