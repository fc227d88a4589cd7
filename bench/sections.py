"""Each benchmark owns one marked section of BENCHMARKS.md and rewrites only that."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

HEADER = "# Benchmarks\n\nFigures measured by the scripts in `bench/`.\n"


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the section between `begin` and `end` markers of `path`, or append it (creating the file)."""
    text = path.read_text() if path.is_file() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def render_saved(
    saved: Path,
    render: Callable[[dict], str],
    write: Path | None,
    markers: tuple[str, str] | Callable[[dict], tuple[str, str]],
    notes: Path | None = None,
) -> int:
    """`--from-json`: render a saved report (with `--notes` lines appended), print it, and rewrite its section
    of `write` when given; `markers` may depend on the report (a callable). Returns the exit status, 0."""
    rep = json.loads(saved.read_text())
    if notes:
        rep["notes"] = notes.read_text().splitlines()
    section = render(rep)
    print(section)
    if write:
        write_section(write, section, *(markers(rep) if callable(markers) else markers))
    return 0
