"""Whether a process recorded earlier still runs: its pid with the start time /proc gives it, which tells a
reused pid apart. Shared by study trials (agecls.study) and single runs (agecls.tracking)."""

from __future__ import annotations

from pathlib import Path

ENDED = ("Z", "X")  # /proc states of a process that has exited (a zombie not yet reaped, or dead)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of process `pid` from /proc/PID/stat (fields 3 and 22);
    None where there is no such process or no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name (field 2) may hold spaces
    return fields[0], int(fields[19])
