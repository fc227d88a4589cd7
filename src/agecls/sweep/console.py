"""What a running study shows on the console: one status line (counts, best so far, elapsed, time left)
and the latest epoch of each running trial, redrawn in place on a terminal, else printed as log lines.
A study with several objectives shows its Pareto front's size and the best value of each objective."""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialView:
    """One trial as the status line needs it: state name (optuna's TrialState), value (one objective) or
    values (several), params, the latest reported epoch and its value, the run's epochs, and how long it ran
    (seconds; so far, while running)."""

    number: int
    state: str
    value: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    epoch_value: float | None = None
    max_epochs: int | None = None
    seconds: float | None = None
    values: tuple[float, ...] | None = None


def trial_view(frozen: Any, now: float | None = None) -> TrialView:
    """A TrialView of an optuna FrozenTrial; `now` (time.time()) measures a running trial's age."""
    steps = frozen.intermediate_values or {}
    epoch = max(steps) if steps else None
    seconds = None
    if frozen.datetime_start is not None:
        if frozen.datetime_complete is not None:
            seconds = (frozen.datetime_complete - frozen.datetime_start).total_seconds()
        else:
            seconds = (now if now is not None else time.time()) - frozen.datetime_start.timestamp()
    max_epochs = frozen.user_attrs.get("max_epochs")
    # FrozenTrial.value raises for a trial of several objectives: read `values`
    values = tuple(frozen.values) if frozen.state.name == "COMPLETE" and frozen.values else None
    return TrialView(
        number=frozen.number,
        state=frozen.state.name,
        value=values[0] if values is not None and len(values) == 1 else None,
        values=values,
        params=dict(frozen.params),
        epoch=epoch,
        epoch_value=steps[epoch] if epoch is not None else None,
        max_epochs=int(max_epochs) if max_epochs is not None else None,
        seconds=seconds,
    )


def short_value(value: Any) -> str:
    """A parameter value in a few characters: floats to 3 significant digits."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def duration(seconds: float) -> str:
    """Seconds as `45s`, `4m12s` or `1h03m`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def time_left(trials: Iterable[TrialView], target: int, slots: int) -> float | None:
    """Seconds the study still needs: the mean duration of its finished (complete or pruned) trials for
    each trial still to run, less what the running ones have done, spread over the slots. None until a
    trial has finished."""
    trials = list(trials)
    spans = [t.seconds for t in trials if t.state in ("COMPLETE", "PRUNED") and t.seconds is not None]
    if not spans:
        return None
    mean = sum(spans) / len(spans)
    running = [t for t in trials if t.state == "RUNNING"]
    finished = len([t for t in trials if t.state in ("COMPLETE", "PRUNED")])
    to_start = max(0, target - finished - len(running))
    work = sum(max(0.0, mean - (t.seconds or 0.0)) for t in running) + to_start * mean
    return work / max(1, slots)


def objective_value(value: float) -> str:
    """An objective's value in a few characters: a count as a whole number, a score to 4 decimals."""
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) >= 10:
        return str(int(value))
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"


def pareto_front(trials: Iterable[TrialView], directions: Sequence[str]) -> list[TrialView]:
    """The COMPLETE trials no other COMPLETE trial dominates (at least as good in every objective, better
    in one), by trial number; `directions`: maximize | minimize per objective."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    points = [
        (t, [s * v for s, v in zip(signs, t.values, strict=True)])
        for t in trials
        if t.state == "COMPLETE" and t.values is not None and len(t.values) == len(signs)
    ]

    def dominates(a: list[float], b: list[float]) -> bool:
        pairs = list(zip(a, b, strict=True))
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    front = [t for t, p in points if not any(dominates(q, p) for _, q in points)]
    return sorted(front, key=lambda t: t.number)


def front_text(trials: list[TrialView], names: Sequence[str], directions: Sequence[str]) -> str:
    """`front N of M complete | best NAME VALUE (trial K), ...`: the Pareto front's size and, for each
    objective, its best value among the complete trials."""
    complete = [t for t in trials if t.state == "COMPLETE" and t.values is not None]
    if not complete:
        return "front: none yet"
    front = pareto_front(complete, directions)
    best = []
    for i, (name, direction) in enumerate(zip(names, directions, strict=True)):
        pick = (max if direction == "maximize" else min)(complete, key=lambda t, i=i: t.values[i])
        best.append(f"{name} {objective_value(pick.values[i])} (trial {pick.number})")
    return f"front {len(front)} of {len(complete)} complete | best " + ", ".join(best)


def status_line(
    trials: Iterable[TrialView],
    target: int,
    slots: int,
    elapsed: float,
    maximize: bool = True,
    *,
    names: Sequence[str] | None = None,
    directions: Sequence[str] | None = None,
) -> str:
    """The study's state in one line: finished of n_trials (complete, pruned), running, failed, the best
    value with its parameters, elapsed time and the estimate of what remains. With several objectives
    (`names`, `directions`): the Pareto front's size and each objective's best value instead of the best."""
    trials = list(trials)
    count = {s: sum(t.state == s for t in trials) for s in ("COMPLETE", "PRUNED", "RUNNING", "FAIL")}
    done = count["COMPLETE"] + count["PRUNED"]
    parts = [
        f"{done}/{target} done ({count['COMPLETE']} complete, {count['PRUNED']} pruned), "
        f"{count['RUNNING']} running, {count['FAIL']} failed"
    ]
    left = time_left(trials, target, slots)
    if done >= target:
        parts.append(f"{duration(elapsed)} elapsed")
    elif left is None:
        parts.append(f"{duration(elapsed)} elapsed, time left known once a trial ends")
    else:
        parts.append(f"{duration(elapsed)} elapsed, ~{duration(left)} left")
    if names is not None and directions is not None and len(names) > 1:
        parts.append(front_text(trials, names, directions))
        return " | ".join(parts)
    # the parameters last: a narrow terminal cuts the line's end
    complete = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    if complete:
        best = (max if maximize else min)(complete, key=lambda t: t.value)
        params = " ".join(f"{k}={short_value(v)}" for k, v in best.params.items())
        parts.append(f"best {best.value:.4f} (trial {best.number}{': ' + params if params else ''})")
    else:
        parts.append("best: none yet")
    return " | ".join(parts)


def running_lines(trials: Iterable[TrialView], reports_epochs: bool = True) -> list[str]:
    """One line per running trial: its latest reported epoch and validation value; for trials that report
    no epochs (a study with several objectives), how long it has run."""
    lines = []
    for t in sorted((t for t in trials if t.state == "RUNNING"), key=lambda t: t.number):
        if t.epoch is None and not reports_epochs and t.seconds is not None:
            lines.append(f"trial {t.number}: running {duration(t.seconds)}")
            continue
        if t.epoch is None:
            lines.append(f"trial {t.number}: starting")
            continue
        of = f"/{t.max_epochs}" if t.max_epochs else ""
        lines.append(f"trial {t.number}: epoch {t.epoch}{of} val {t.epoch_value:.4f}")
    return lines


class StatusConsole:
    """Shows the status: on a terminal a block redrawn in place at every poll; otherwise (a pipe, a log
    file, CI) a plain log line on every trial event and at most every `every_s` seconds in between."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 30.0, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._drawn = 0  # lines of the live block now on the terminal
        self._last_plain = -math.inf

    def clear(self) -> None:
        """Erase the live block (terminal), so that a log line can be written where it stood."""
        if self.tty and self._drawn:
            self.stream.write("\x1b[1A\x1b[2K" * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0

    def keep(self) -> None:
        """Leave the live block where it is: what is written next goes below it."""
        self._drawn = 0

    def show(self, status: str, running: list[str], event: bool = False) -> None:
        """Redraw the block (terminal), or log the status when an event happened or `every_s` has passed."""
        if self.tty:
            self.clear()
            # one terminal row per line, else a wrapped line would outlast the cursor-up that erases it
            width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
            lines = [line[:width] for line in (status, *(f"  {line}" for line in running))]
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()
            self._drawn = len(lines)
            return
        now = time.monotonic()
        if event or now - self._last_plain >= self.every_s:
            shown = status + (" | " + "; ".join(running) if running else "")
            log.info("status: %s", shown)
            self._last_plain = now
