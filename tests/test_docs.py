"""The README and docs/: no dead relative link (files and #anchors), the README a short front
page with its two set-up commands, and its results table the one benchmarks/regenerate.py writes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            a = anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def dead_links(page: Path) -> list[str]:
    dead = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            dead.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            dead.append(f"{target} (no heading #{frag} in {dest.relative_to(ROOT)})")
    return dead


def test_the_checker_finds_dead_files_and_anchors(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "b.md").write_text("# Long outputs: decode-phase compression (`--kv-decode-budget`)\n## Twice\n## Twice\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#long-outputs-decode-phase-compression---kv-decode-budget) [ok](b.md#twice-1) "
                    "[web](https://x.org/y) ![img](b.md) [bad](c.md) [bad](b.md#nope) [self](#here)\n"
                    "```\n[in code](missing.md)\n```\n# Here\n")
    assert dead_links(page) == ["c.md (no file c.md)", "b.md#nope (no heading #nope in b.md)"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dead_relative_link(page):
    assert dead_links(page) == []


def test_every_doc_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs, "docs/ is empty"
    assert [d.name for d in docs if f"(docs/{d.name}" not in readme] == []


def test_readme_is_a_front_page_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    commands = re.findall(r"^bash scripts/(\w+)\.sh", text, re.M)
    assert commands[:2] == ["run", "test"] and set(commands) == {"run", "test"}


def test_results_blocks_are_the_ones_regenerate_writes():
    """README's table and docs/benchmarks-and-results.md's section equal what
    `python benchmarks/regenerate.py --report-only` writes from the committed results."""
    from benchmarks import regenerate

    for path, (begin, end, text) in regenerate.blocks().items():
        body = path.read_text()
        assert body.count(begin) == 1 and body.count(end) == 1, path
        assert body[body.index(begin):body.index(end) + len(end)] == text, (
            f"{path.relative_to(ROOT)} is stale: run python benchmarks/regenerate.py --report-only")
