"""The README's table of differences from the public fVLM code cites both sides of every row,
and its citations of this project's code point at lines that exist and hold what they name.

The public code's side cannot be opened here (it is not vendored); its citations are checked for
form only. This project's side is checked for real, so a citation that drifts fails a test.
"""

from __future__ import annotations

import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: `path/to/file.py:12`, `file.yaml:3-7`, `:12` (same file as the citation before it).
CITATION = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|yaml)|)(:(\d+)(?:-(\d+))?(?:,\d+(?:-\d+)?)*)`")
#: A citation followed by the name it points at: `file.py:12` (`name`).
NAMED = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.py|):(\d+)` \(`(\w+)`\)")


def _rows() -> list[list[str]]:
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Differences from the public code") :]
    section = section[: section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| |") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0].startswith("**"):  # a group heading
            continue
        rows.append(cells)
    return rows


def _project_file(path: str) -> Path | None:
    for base in (PROJECT_ROOT, PROJECT_ROOT / "training" / "configs"):
        if (base / path).is_file():
            return base / path
    return None


def test_every_row_cites_both_sides():
    rows = _rows()
    assert len(rows) >= 25
    for cells in rows:
        assert len(cells) == 5, cells
        public, project = cells[1], cells[2]
        assert CITATION.search(public), f"{cells[0]}: the public code's side cites no file:line"
        assert CITATION.search(project), f"{cells[0]}: this project's side cites no file:line"


def test_project_citations_point_at_what_they_name():
    checked = named = 0
    for cells in _rows():
        current: Path | None = None
        for m in CITATION.finditer(cells[2]):
            if m.group(1):
                current = _project_file(m.group(1))
                assert current is not None, f"{cells[0]}: {m.group(1)} is not a file of this project"
            assert current is not None, f"{cells[0]}: {m.group(0)} follows no file"
            n_lines = len(current.read_text(encoding="utf-8").splitlines())
            last = int(m.group(4) or m.group(3))
            assert 1 <= int(m.group(3)) <= last <= n_lines, (
                f"{cells[0]}: {m.group(0)} is past {current}'s end"
            )
            checked += 1
        current = None
        for m in NAMED.finditer(cells[2]):
            current = _project_file(m.group(1)) if m.group(1) else current
            line = current.read_text(encoding="utf-8").splitlines()[int(m.group(2)) - 1]
            assert m.group(3) in line, f"{cells[0]}: {current}:{m.group(2)} is not {m.group(3)}: {line!r}"
            named += 1
    assert checked >= 40 and named >= 10


def _line_of(path: Path, name: str, near: int) -> int | None:
    """The line that defines ``name`` in ``path`` (``def``/``class``/assignment), else the line
    holding ``name`` nearest to ``near``; 1-based, None when no line holds it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    defining = re.compile(
        rf"^\s*(?:(?:async\s+)?def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*[:=]"
    )
    for i, line in enumerate(lines, 1):
        if defining.search(line):
            return i
    holding = [i for i, line in enumerate(lines, 1) if name in line]
    return min(holding, key=lambda i: abs(i - near)) if holding else None


def fix_named_citations(readme: Path = PROJECT_ROOT / "README.md") -> list[str]:
    """Move each named citation of this project's code in the differences table (`file.py:N`
    (`name`)) to the line that now defines ``name``; returns what moved. Unnamed citations are
    left for a person to check. Run ``python Testing/test_readme_differences.py --fix`` after a
    change that shifts the cited files."""
    text = readme.read_text(encoding="utf-8")
    start = text.index("## Differences from the public code")
    end = text.index("\n## ", start + 1)
    moved: list[str] = []
    rows = []
    for line in text[start:end].splitlines(keepends=True):
        cells = line.split(" | ")
        if line.startswith("| ") and len(cells) >= 5:
            current: list[Path | None] = [None]

            def move(m: re.Match, current=current) -> str:
                current[0] = _project_file(m.group(1)) if m.group(1) else current[0]
                if current[0] is None:
                    return m.group(0)
                new = _line_of(current[0], m.group(3), int(m.group(2)))
                if new is None or new == int(m.group(2)):
                    return m.group(0)
                moved.append(f"{m.group(1) or current[0].name}:{m.group(2)} -> {new} ({m.group(3)})")
                return f"`{m.group(1)}:{new}` (`{m.group(3)}`)"

            cells[2] = NAMED.sub(move, cells[2])
            line = " | ".join(cells)
        rows.append(line)
    readme.write_text(text[:start] + "".join(rows) + text[end:], encoding="utf-8")
    return moved


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--fix"]:
        sys.exit("usage: python Testing/test_readme_differences.py --fix")
    print("\n".join(fix_named_citations()) or "nothing moved")
