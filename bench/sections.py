"""Each benchmark owns one marked section of BENCHMARKS.md (the lever rounds: docs/BENCHMARKS-EARLIER.md) and
rewrites only that."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

HEADER = "# Benchmarks\n\nFigures measured by the scripts in `bench/`.\n"
# Keys renamed since a saved result was written (the Lightning callbacks moved from the trainer group to their
# own): sections show today's names, so every command in them can be pasted as it is.
RENAMED = {
    "trainer.ema.": "callbacks.ema.",
    "trainer.swa.": "callbacks.swa.",
    "trainer.early_stopping.": "callbacks.early_stopping.",
    "trainer.checkpoint.": "callbacks.checkpoint.",
}


def current_keys(text: str) -> str:
    """`text` (a command or an override) with renamed config keys under their current names."""
    for old, new in RENAMED.items():
        text = text.replace(old, new)
    return text


def machine_text(m: dict) -> str:
    """One line for the machine dict of data_pipeline.machine(): CPU, cores, GPU, torch."""
    return f"{m['cpu']}, {m['nproc']} CPUs, GPU: {m['gpu']}; torch {m['torch']}"


def provenance(command: str, machine: str, date: str) -> list[str]:
    """The three lines under every section's title: the command that wrote it, the machine, the date."""
    return [f"- Command: `{current_keys(command)}`", f"- Machine: {machine}", f"- Date: {date}"]


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the section between `begin` and `end` markers of `path`, or append it (creating the file)."""
    text = path.read_text() if path.is_file() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# A notes file's lines above this marker are the section's reading; those below stay in the notes file, which
# the section links: a section keeps to its table and a few lines, the per-run narrative lives beside it.
DETAILS = "<!-- details -->"


def read_notes(notes: Path | None, write: Path | None = None) -> list[str]:
    """The reading lines of a `--notes` file for the section of `write`: the lines above DETAILS (all of them
    without it), and with details below it a last line linking the notes file (relative to `write`)."""
    if not notes:
        return []
    lines = notes.read_text().splitlines()
    if DETAILS not in lines:
        return lines
    reading = lines[: lines.index(DETAILS)]
    while reading and not reading[-1].strip():
        reading.pop()
    target = os.path.relpath(notes.resolve(), (write or Path("x")).resolve().parent)
    return [*reading, f"- Details: [{notes.name}]({Path(target).as_posix()})."]


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
        rep["notes"] = read_notes(notes, write)
    section = render(rep)
    print(section)
    if write:
        write_section(write, section, *(markers(rep) if callable(markers) else markers))
    return 0


def args_record(args) -> dict:
    """A script's parsed arguments as JSON-ready values (paths as text), for its saved report."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def save_report(
    rep: dict,
    name: str,
    out: Path,
    results: Path,
    section: str,
    write: Path | None,
    markers: tuple[str, str],
    quick: bool = False,
) -> None:
    """Save a run's report as `out/<name>.json`; with `write` (and not a quick smoke) also as the committed
    record `results/<name>.json`, and rewrite the section of `write`."""
    saved = json.dumps(rep, indent=1, default=str) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(saved)
    if write and not quick:
        results.mkdir(exist_ok=True)
        (results / f"{name}.json").write_text(saved)
    if write:
        write_section(write, section, *markers)
        print(f"wrote {write}")
