"""The documentation: the MkDocs site builds with --strict, the README is a short front door whose set-up
and test commands are the ones CI runs, every relative link resolves, the parameter reference is the
generated one, and hand-written prose carries no run records (dates, commit hashes, CPU models, figures)."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
INSTALL = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[app,test,ray]"'
MAIN_JOB = "dvc repro"
TEST = "python -m pytest -q"

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
GENERATED = re.compile(r"<!-- b2p-results:([A-Za-z0-9_.-]+) begin -->.*?<!-- b2p-results:\1 end -->", re.S)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks, inline code and generated result sections."""
    text = GENERATED.sub("", text)
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _section(text: str, heading: str) -> str:
    """The body of the `## heading` section (up to the next `## `)."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README.md has no '## {heading}' section"
    return m.group(1)


def _commands(block: str) -> list[str]:
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict`: every page in the nav, every link and anchor resolves, no warning."""
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                        "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    for page in sorted(DOCS.rglob("*.md")):
        rel = page.relative_to(DOCS).with_suffix("")
        html = tmp_path / "site" / ("index.html" if rel.name == "index" else rel / "index.html")
        assert html.is_file(), f"{page} was not built (not in mkdocs.yml's nav?)"


def test_readme_is_a_short_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; the front door stays under 300"


def test_readme_has_the_two_set_up_commands_and_the_test_command_ci_runs() -> None:
    """Exactly two set-up commands (install, the main job) and one test command, as `.ci/run` runs them."""
    text = README.read_text()
    setup = _section(text, "Set up and run")
    blocks = [_commands(b) for b in FENCE.findall(setup)]
    assert blocks == [[INSTALL, MAIN_JOB], [TEST]], blocks
    ci = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    for step in [*INSTALL.split(" && "), TEST]:
        assert step in ci, f".ci/run does not run the README's `{step}`"
    # the README names no other install of b2p or test command anywhere (the torch-free runtime is another
    # distribution, for another machine)
    everywhere = [c for b in FENCE.findall(text) for c in _commands(b)]
    assert [c for c in everywhere if ("pip install" in c and "./runtime" not in c) or "pytest" in c] == [INSTALL, TEST], everywhere


def _slug_mkdocs(heading: str) -> str:
    """Python-Markdown's toc slugify (what MkDocs anchors are)."""
    s = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    s = re.sub(r"[^\w\s-]", "", s).strip().lower()
    return re.sub(r"[-\s]+", "-", s)


def _slug_git_host(heading: str) -> str:
    """The git host's anchors: lower case, punctuation dropped, every space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path, slug) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(re.sub(r"`", "", m.group(1))) for m in re.finditer(r"^#{1,6} (.+?)\s*#*$", text, re.M)}


def test_every_relative_link_points_at_an_existing_file() -> None:
    """Every relative link of the README and the docs pages resolves to a file (and an anchor, on both a git
    host and the MkDocs site); docs pages link only inside docs/ (MkDocs serves nothing else)."""
    problems = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_file():
                problems.append(f"{page.relative_to(REPO)}: link to {target} (no such file)")
                continue
            if page.is_relative_to(DOCS) and not dest.is_relative_to(DOCS):
                problems.append(f"{page.relative_to(REPO)}: link to {target} leaves docs/ (use a code span)")
            if anchor and dest.suffix == ".md":
                for slug in (_slug_mkdocs, _slug_git_host):
                    if anchor not in _anchors(dest, slug):
                        problems.append(f"{page.relative_to(REPO)}: link to {target}: no such heading ({slug.__name__})")
    assert problems == []
    assert len([t for p in PAGES for t in LINK.findall(p.read_text())]) > 20  # the pattern finds the links


def test_the_parameter_reference_is_the_generated_one() -> None:
    from b2p.reference import check

    assert check(REPO) == []


RECORDS = {
    "a date": re.compile(r"\b(19|20)\d\d-[01]\d-[0-3]\d\b"),
    "a commit hash": re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"),
    "a CPU model": re.compile(r"\b(Xeon|EPYC|Ryzen|Core i\d)\b"),
    "a measured figure": re.compile(r"(?<![\w.])0\.\d{3,}\b|\b\d+(\.\d+)? ?(s|ms|min|minutes|seconds)\b|\bx\d+\.\d+\b"),
}


HAND_WRITTEN = [p for p in PAGES if p != DOCS / "reference" / "params.md"]  # that one is generated from the schema


@pytest.mark.parametrize("page", HAND_WRITTEN, ids=lambda p: str(p.relative_to(REPO)))
def test_hand_written_prose_carries_no_run_records(page: Path) -> None:
    """Dates, commit hashes, CPU models and measured figures live in generated reports and tables only
    (the generated result sections are left out of the prose)."""
    prose = _prose(page.read_text())
    found = [f"{what}: {m.group(0)!r}" for what, rx in RECORDS.items() for m in rx.finditer(prose)]
    assert found == []


def test_the_record_patterns_catch_what_they_are_for() -> None:
    sample = "run 2026-11-30 at b5b72f8 on an Intel Xeon: 0.663 binary IoU in 59.1 min, x2.35 faster"
    for what, rx in RECORDS.items():
        assert rx.search(_prose(sample)), what
    clean = "the calib split (`import.calib: 0.5`), 3x3 convolutions, strides 8, 16 and 32, beta = 0.4"
    assert not any(rx.search(_prose(clean)) for rx in RECORDS.values())
