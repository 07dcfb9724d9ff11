"""The documentation runs as written: every code block of README.md and docs/*.md.

How the blocks are run:

- Every ```python and ```bash block runs, unless the nearest non-blank line above its opening
  fence is a marker `<!-- not run: REASON -->` (set-up commands, training runs, torchrun,
  builds, GPU-only code). Each marked block is reported as a skipped test with its page, line
  and reason, so `pytest -ra` lists them and counts them.
- ```text blocks are output, never run. Any other fence (or one without a language) fails
  `test_fences`, so a new kind of block cannot slip past unrun.
- The blocks of one page run in order, in one fresh Python process, in a temporary folder
  (files they write land there): python blocks in one shared namespace, so a block may build
  on the blocks above it; bash blocks with `bash -euo pipefail`, with `.venv` in that folder
  linking to the running environment and its `bin/` first on PATH, so both
  `.venv/bin/sparse-attention` and `sparse-attention` work. Tracebacks name the markdown file
  and its line.
- Sizes are shrunk only through SUBSTITUTIONS below: plain text replacements, applied to the
  runnable blocks of the page they are listed for, each of which must match at least once (so
  the table follows the pages). A block thus stays the one users copy.

Also checked: the README's length and its set-up commands, lines of at most 100 characters,
relative links and their #anchors, and that the README links every docs page.

Run this file's blocks of one page by hand: `python tests/test_docs.py docs/op.md /tmp/x`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))

README_MAX_LINES = 300
MAX_LINE_LENGTH = 100
SETUP_COMMANDS = (
    "bash scripts/bootstrap.sh && .venv/bin/sparse-attention demo",
    "bash scripts/bootstrap.sh --test && .venv/bin/python -m pytest -q tests",
)

RUN_LANGUAGES = ("python", "bash")
OUTPUT_LANGUAGES = ("text",)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")

# page -> [(text in its runnable blocks, replacement)]: the only changes made before running.
# Every occurrence is replaced; each entry must occur at least once.
SUBSTITUTIONS = {
    "README.md": [
        ("B, H, Hkv, N, D = 1, 8, 2, 8192, 64", "B, H, Hkv, N, D = 1, 8, 2, 1024, 64"),
    ],
    "docs/patterns.md": [
        ("B, H, N, D = 1, 8, 8192, 64", "B, H, N, D = 1, 8, 1024, 64"),
        ("seq_len = 4096", "seq_len = 1024"),
        ("--seq-len 8192", "--seq-len 2048"),
    ],
    "docs/models.md": [
        ("4096", "1024"),   # the modules' sequences
        ("2048", "512"),    # the models' max_seq_len and inputs
    ],
    "docs/transformers.md": [
        ("(2, 4000)", "(2, 600)"),
        ("mask[1, 3500:]", "mask[1, 500:]"),
    ],
}
PAGE_TIMEOUT_S = 300


@dataclasses.dataclass
class Block:
    page: str
    line: int        # line of the block's first code line in the page (1-based)
    language: str
    code: str
    not_run: str | None  # the marker's reason, if marked

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def page_lines(page: str) -> list[str]:
    return (ROOT / page).read_text(encoding="utf-8").splitlines()


def blocks_of(page: str) -> list[Block]:
    """The fenced blocks of a page (fences at the start of a line: see test_fences)."""
    lines, blocks, i = page_lines(page), [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\S*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        assert end < len(lines), f"{page}:{i + 1}: code block never closed"
        above = i - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        marker = NOT_RUN.fullmatch(lines[above].strip()) if above >= 0 else None
        blocks.append(Block(page, i + 2, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            marker.group(1) if marker else None))
        i = end + 1
    return blocks


def runnable(page: str) -> list[Block]:
    """The blocks of a page that run, with the page's substitutions applied."""
    blocks = [b for b in blocks_of(page) if b.language in RUN_LANGUAGES and b.not_run is None]
    for old, new in SUBSTITUTIONS.get(page, []):
        assert "\n" not in old + new, "substitutions keep the line numbers: no newlines"
        for block in blocks:
            block.code = block.code.replace(old, new)
    return blocks


def run_page(page: str, workdir: Path) -> None:
    """Runs a page's blocks in order in this process (called in a fresh one by the test)."""
    os.chdir(workdir)
    namespace = {"__name__": "__main__"}
    for block in runnable(page):
        start = time.perf_counter()
        print(f"--- {block.where} ({block.language})", flush=True)
        if block.language == "python":
            # Padded so that tracebacks give the block's lines in the markdown file.
            source = "\n" * (block.line - 1) + block.code
            exec(compile(source, str(ROOT / page), "exec"), namespace)
        else:
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=workdir)
            if result.returncode != 0:
                raise SystemExit(f"{block.where}: the bash block exited with {result.returncode}")
        print(f"--- {block.where}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    run_page(sys.argv[1], Path(sys.argv[2]))
    raise SystemExit(0)


import pytest  # noqa: E402  (not needed to run a page by hand)

MARKED = [b for page in PAGES for b in blocks_of(page) if b.not_run is not None]


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)])
def test_page_runs(page, tmp_path):
    environment = Path(sys.prefix)
    (tmp_path / ".venv").symlink_to(environment, target_is_directory=True)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
               PATH=f"{environment / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([sys.executable, __file__, page, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)
    assert result.returncode == 0, (f"a code block of {page} failed:\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")


@pytest.mark.parametrize("block", MARKED, ids=[b.where for b in MARKED])
def test_marked_block(block):
    assert block.language in RUN_LANGUAGES, f"{block.where}: a `not run` marker on a non-code block"
    pytest.skip(f"{block.where} ({block.language}) not run: {block.not_run}")


@pytest.mark.parametrize("page", SUBSTITUTIONS)
def test_substitutions_match(page):
    code = "".join(b.code for b in blocks_of(page)
                   if b.language in RUN_LANGUAGES and b.not_run is None)
    for old, _ in SUBSTITUTIONS[page]:
        assert old in code, f"{page}: the substitution of {old!r} matches no runnable block"


@pytest.mark.parametrize("page", PAGES)
def test_fences(page):
    lines = page_lines(page)
    for number, line in enumerate(lines, 1):
        assert not re.match(r"\s+```", line), f"{page}:{number}: indented fence"
    for block in blocks_of(page):
        assert block.language in RUN_LANGUAGES + OUTPUT_LANGUAGES, (
            f"{block.where}: a ```{block.language} block; use python, bash or text")
    markers = [line for line in lines if line.strip().startswith("<!-- not run")]
    assert all(NOT_RUN.fullmatch(line.strip()) for line in markers), (
        f"{page}: a `not run` marker without a reason")
    marked = sum(1 for b in blocks_of(page) if b.not_run is not None)
    assert len(markers) == marked, f"{page}: a `not run` marker that is not just above a block"


@pytest.mark.parametrize("page", PAGES)
def test_line_length(page):
    long = [f"{page}:{n}" for n, line in enumerate(page_lines(page), 1)
            if len(line) > MAX_LINE_LENGTH]
    assert not long, f"lines over {MAX_LINE_LENGTH} characters: {', '.join(long)}"


def test_readme_is_short_and_keeps_the_setup_commands():
    lines = page_lines("README.md")
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    for command in SETUP_COMMANDS:
        assert command in lines, f"the README lost the set-up command `{command}`"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"]({page}" in readme, f"README.md does not link {page}"


def heading_anchors(page: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to -."""
    anchors = set()
    in_code = False
    for line in page_lines(page):
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES)
def test_links(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    base = (ROOT / page).parent
    for target in targets:
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve() if path else ROOT / page
        assert file.exists(), f"{page}: the link {target} points at nothing"
        if anchor:
            assert file.suffix == ".md", f"{page}: an anchor into a non-markdown file: {target}"
            relative = file.relative_to(ROOT).as_posix()
            assert anchor in heading_anchors(relative), f"{page}: no heading for {target}"
