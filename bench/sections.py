"""Each benchmark owns one marked section of BENCHMARKS.md and rewrites only that."""

from __future__ import annotations

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
