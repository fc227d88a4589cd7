"""A stand-in for Slurm's sbatch / srun / sacct / scancel on one machine, for tests only: `sbatch` runs the
submitted script at once as its own process group with the SLURM_* variables a job sees, `sacct` answers
RUNNING / COMPLETED / FAILED / CANCELLED, `scancel` stops the group. State lives in $FAKE_SLURM_DIR.
`install(bin_dir)` writes the four commands; tests put bin_dir first on PATH."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "fake-slurm"))


def sbatch(args):
    script = args[-1]
    STATE.mkdir(parents=True, exist_ok=True)
    # job ids under an exclusive lock: two sweeper workers may submit at the same moment
    with open(STATE / "next.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counter = STATE / "next"
        job = int(counter.read_text()) if counter.exists() else 1000
        counter.write_text(str(job + 1))
    env = {
        **os.environ,
        "SLURM_JOB_ID": str(job),
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "node1",
    }
    rc = STATE / f"{job}.rc"
    # Run a copy: submitit moves the submitted file into its job folder as soon as sbatch returns, so
    # running the original raced with that move (bash exited 127 when it lost).
    copy = STATE / f"{job}.sh"
    copy.write_text(Path(script).read_text())
    proc = subprocess.Popen(
        ["bash", "-c", f'bash "{copy}"; echo $? > "{rc}"'],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (STATE / f"{job}.pid").write_text(str(proc.pid))
    print(f"Submitted batch job {job}")


def srun(args):
    out = err = None
    rest = list(args)
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0)
        if flag in ("--output", "--error"):
            path = rest.pop(0).replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0")
            if flag == "--output":
                out = path
            else:
                err = path
    if out:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
    if err:
        fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 2)
    os.execvp(rest[0], rest)


def sacct(args):
    jobs = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for job in jobs:
        if (STATE / f"{job}.cancelled").exists():
            state = "CANCELLED"
        elif (STATE / f"{job}.rc").exists():
            state = "COMPLETED" if (STATE / f"{job}.rc").read_text().strip() == "0" else "FAILED"
        else:
            state = "RUNNING"
        print(f"{job}|{state}|node1")


def scancel(args):
    job = args[0]
    pid = int((STATE / f"{job}.pid").read_text())
    if "--signal" in args:
        os.killpg(pid, getattr(signal, args[args.index("--signal") + 1]))
        return
    (STATE / f"{job}.cancelled").write_text("")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)


def install(bin_dir: Path) -> None:
    """Write sbatch, srun, sacct and scancel into bin_dir, each running this file with this Python."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in ("sbatch", "srun", "sacct", "scancel"):
        path = bin_dir / command
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {command} "$@"\n')
        path.chmod(0o755)


if __name__ == "__main__":
    {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scancel": scancel}[sys.argv[1]](sys.argv[2:])
