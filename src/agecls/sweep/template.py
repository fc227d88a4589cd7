"""Trial processes forked from a pre-imported template process, so that a trial starts in milliseconds
rather than seconds of interpreter start and imports, while each trial stays a process of its own (a crash,
a leaked CUDA context or thread ends with it).

The template (`python -m agecls.sweep.template`, started by the sweeper before it plans the study) imports
what a trial imports (agecls.cli.trial_preload: torch, lightning, mlflow, optuna, Hydra, agecls), then reads
requests, one JSON line each on its stdin: `{"id", "module", "args", "env", "log", "cwd"}`. For each it
forks a child that runs `python -m module args` in-process as `__main__`, and answers `{"id", "pid"}`; when
a child ends it answers `{"pid", "exit"}` (a negative exit is the signal that ended it, as subprocess says).

It never touches CUDA before it forks (it refuses to serve if the imports did): a child's
CUDA_VISIBLE_DEVICES and thread count are set in the child before its trial runs anything."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PRELOAD = "agecls.cli.trial_preload"


def is_module_command(cmd: list[str]) -> bool:
    """Whether `cmd` is `python -m <module> ...` with this interpreter: what the template can run."""
    return len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1] == "-m"


class TemplateGone(RuntimeError):
    """The template process ended or could not start; trials then start as fresh interpreters."""


@dataclass
class ForkedHandle:
    """A trial forked by the template: its pid, and its exit code once the template reaped it."""

    template: Template
    pid: int

    def done(self) -> bool:
        return self.template.exit_code(self.pid) is not None

    def signal(self, sig: int) -> None:
        if not self.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> None:
        self.template.wait_exit(self.pid, max(0.1, timeout))

    @property
    def returncode(self) -> int | None:
        return self.template.exit_code(self.pid)


class Template:
    """The sweeper's side of the template process: starts it, sends it trials and collects their exits."""

    def __init__(self) -> None:
        """Start the template process; it imports in the background while the sweeper goes on."""
        env = {**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}  # a CUDA check must not init the driver
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        self._pids: dict[int, int] = {}
        self._exits: dict[int, int] = {}
        self._ready: float | None = None
        self._next_id = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="agecls-template", daemon=True)
        self._reader.start()

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds the template took to import; TemplateGone if it ended or did not get ready in time."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._ready is not None or self._gone(), timeout=timeout):
                self.close()
                raise TemplateGone(f"the trial template did not start in {timeout:.0f} s")
        if self._ready is None:
            raise TemplateGone(f"the trial template ended with exit code {self.process.wait()}")
        return self._ready

    def start(
        self, cmd: list[str], env: dict[str, str], log_path: Path, cwd: str | None = None
    ) -> ForkedHandle:
        """Fork a trial running `cmd` (`python -m module args`) with `env` added, output in `log_path`."""
        self.wait_ready()
        with self._changed:
            self._next_id += 1
            request_id = self._next_id
        request = {"id": request_id, "module": cmd[2], "args": cmd[3:], "env": env, "log": str(log_path)}
        request["cwd"] = cwd or os.getcwd()
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise TemplateGone(f"the trial template is gone ({exc})") from None
        with self._changed:
            self._changed.wait_for(lambda: request_id in self._pids or self._gone(), timeout=60)
            if request_id not in self._pids:
                raise TemplateGone("the trial template did not fork the trial")
            return ForkedHandle(self, self._pids.pop(request_id))

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            if pid not in self._exits and self._gone():
                return -signal.SIGKILL  # the template died: it can no longer say how its trial ended
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self._gone(), timeout=timeout)

    def wait_any(self, timeout: float) -> None:
        """Return when a trial ends (or after `timeout`): the sweeper's loop wakes at once, not at a poll."""
        with self._changed:
            ended = len(self._exits)
            self._changed.wait_for(lambda: len(self._exits) != ended or self._gone(), timeout=timeout)

    def close(self) -> None:
        """End the template (trials it forked run on to their end, as trials of a dead sweeper do)."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self.process.poll() is None:
            self.process.kill()

    def _gone(self) -> bool:
        return self.process.poll() is not None and not self._reader.is_alive()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:  # not an answer: say it rather than lose the template over it
                log.warning("trial template: %s", line.rstrip())
                continue
            with self._changed:
                if "ready" in message:
                    self._ready = float(message["ready"])
                elif "exit" in message:
                    self._exits[int(message["pid"])] = int(message["exit"])
                else:
                    self._pids[int(message["id"])] = int(message["pid"])
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()


# -- the template process itself ------------------------------------------------------------------------


def serve(out) -> int | None:
    """The template's loop: fork a child per request, report exits on `out`; returns None at the end of its
    input, or, in a forked child, the exit code of the trial it ran."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the sweeper and the trials, not for this
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    children: set[int] = set()
    pending = b""
    while True:
        events = selector.select(timeout=0.02 if children else 1.0)
        _reap(out, children)
        if not events:
            continue
        chunk = os.read(0, 1 << 16)  # raw reads: a buffered reader could hold a request the selector missed
        if not chunk:
            return None
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                selector.close()
                out.close()  # the answers' pipe is the template's alone
                return run_child(request)
            children.add(pid)
            _answer(out, {"id": request["id"], "pid": pid})


def _reap(out, children: set[int]) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            _answer(out, {"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def _answer(out, message: dict) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def run_child(request: dict) -> int:
    """In the forked child: the environment, folder, signals, threads and output a fresh `python -m module
    args` would have, then the module run as __main__; returns its exit code."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    with open(request["log"], "ab", buffering=0) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    threads = request["env"].get("OMP_NUM_THREADS")
    if threads:  # torch read the template's environment when it was imported
        import torch

        torch.set_num_threads(int(threads))
    sys.argv = [request["module"], *request["args"]]
    _set_title([sys.executable, "-m", *sys.argv])
    sys.path[0] = request["cwd"]  # as `python -m` puts its working folder first
    try:
        import runpy
        import warnings

        # the template imported the module already (its whole point): runpy's warning about that is noise
        warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return _exit_code(exc.code)
    except BaseException:  # as a fresh interpreter would: the traceback in the log, exit code 1
        import traceback

        traceback.print_exc()
        return 1
    return 0


def _set_title(cmd: list[str]) -> None:
    """Show the trial's own command line in ps, top and /proc/PID/cmdline, not the template's."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a dependency; without it trials show the template's line
        return
    setproctitle.setproctitle(" ".join(cmd))


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main() -> None:
    started = time.monotonic()
    # answers go on a descriptor of their own; whatever a library prints (fd 1) goes to stderr instead
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    __import__(PRELOAD)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        print("agecls template: importing the trial's modules initialised CUDA; not forking", file=sys.stderr)
        sys.exit(3)
    _answer(out, {"ready": round(time.monotonic() - started, 2)})
    code = serve(out)
    if code is not None:
        end_child(code)
    out.flush()
    os._exit(0)  # the sweeper is done with it: skip tearing down its modules one by one


def end_child(code: int) -> None:
    """End a forked trial as an interpreter ends (its threads joined, atexit handlers run, output flushed)
    but without tearing down its thousands of modules one by one: seconds at the end of every trial."""
    import atexit

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
