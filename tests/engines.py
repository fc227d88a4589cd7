"""Real engines for the `cluster` tests, started once per test run on 127.0.0.1 and stopped at its end: a
PostgreSQL server (Optuna's storage and the MLflow server's backend store), an MLflow tracking server with
proxied artifacts, and a one-node Slurm cluster (munged, MariaDB + slurmdbd for `sacct`, slurmctld, slurmd;
proctrack/linuxproc, no cgroups; at least 4 CPUs and 2 GPUs of 2 shards each: GRES_CONF). `make engines`
installs what they need; a fixture whose programs are missing skips its tests, naming what is missing.
Registered as a pytest plugin by tests/conftest.py."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = (
    "run `make engines` (as root: apt-get install slurm-wlm slurmdbd munge mariadb-server postgresql)"
)
SLURM_PROGRAMS = (
    "munged",
    "slurmdbd",
    "slurmctld",
    "slurmd",
    "sbatch",
    "sacct",
    "mariadbd",
    "mariadb-install-db",
)
SLURM_GPUS = 2  # GPU indices Slurm hands out (stand-in device files: GRES_CONF)
# shards of each GPU (gres/shard): jobs of `--gres=shard:1` share a GPU, as optuna.trials_per_device asks
SLURM_SHARDS_PER_GPU = 2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _which(name: str, extra: tuple[str, ...] = ()) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join([*extra, "/usr/sbin", "/sbin"]))


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} not written)"


def wait_for(check, what: str, timeout: float, log: Path | None = None, proc=None) -> None:
    """Poll `check()` until it is true; fail naming `what` and the log's tail after `timeout` s, or as soon
    as `proc` (the daemon) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    detail = _tail(log) if log else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s: {detail}")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _spawn(cmd: list[str], log: Path, user: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """A daemon kept in the foreground, its own process group, output into `log`."""
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env or os.environ.copy()
        )


def _engine_dir(name: str) -> Path:
    """A short, world-traversable folder (unix socket paths are limited to ~100 characters; PostgreSQL runs
    as the postgres user and must reach its data folder)."""
    path = Path(tempfile.mkdtemp(prefix=f"agecls-{name}-", dir="/tmp"))
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------- PostgreSQL
@dataclass
class Postgres:
    port: int
    user: str = "postgres"
    # how to stop and start the server (the storage outage tests): [*as_user, pg_ctl, -D, data], its options
    ctl: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    def pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.ctl, *args], check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        """Stop the server at once (`-m fast`: open connections are terminated, as on a restart)."""
        self.pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> None:
        self.pg_ctl(*self.options, "-w", "-t", "120", "start")

    def restart(self, down_s: float = 0.0) -> None:
        """`pg_ctl restart -m fast`: every open connection is terminated, the server is back in seconds.
        With `down_s`, the server stays stopped that long first, as a restart that takes a while does: a
        client calling every few seconds then surely meets the outage instead of perhaps missing it."""
        if down_s <= 0:
            self.pg_ctl(*self.options, "-m", "fast", "-w", "-t", "120", "restart")
            return
        self.stop()
        time.sleep(down_s)
        self.start()

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database `name` (once) and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(self.url("postgres", "postgresql"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _pg_bin(name: str) -> str | None:
    extra = tuple(str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    return _which(name, extra)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on a free port of 127.0.0.1 (trust authentication), data in a temp folder."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip(
            f"no PostgreSQL server binaries (initdb, pg_ctl) on PATH or /usr/lib/postgresql: {INSTALL_HINT}"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install 'agecls[postgres]'")
    user = None
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a `postgres` user to run the PostgreSQL server as")
        user = "postgres"
    root = _engine_dir("pg")
    data, log = root / "data", root / "server.log"
    if user:
        shutil.chown(root, user)
    as_user = ["runuser", "-u", user, "--"] if user else []
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    server = Postgres(port, ctl=[*as_user, pg_ctl, "-D", str(data)], options=["-l", str(log), "-o", opts])
    server.start()
    try:
        wait_for(lambda: server.create_database("postgres"), "PostgreSQL", 60, log)
        yield server
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- MLflow
@dataclass
class MlflowServer:
    uri: str
    artifacts: Path
    log: Path


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres) -> Iterator[MlflowServer]:
    """`mlflow server` with PostgreSQL as its backend store and proxied artifacts (`--artifacts-destination`):
    clients upload and download checkpoints through HTTP and never see its disk."""
    mlflow = Path(sys.executable).with_name("mlflow")
    if not mlflow.exists():
        pytest.skip(f"no `mlflow` command beside {sys.executable}")
    backend = postgres.create_database("mlflow")
    root = _engine_dir("mlflow")
    port = free_port()
    log = root / "server.log"
    cmd = [
        str(mlflow),
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(root / "art"),
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = _spawn(cmd, log, env={**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"})
    try:
        uri = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            import urllib.request

            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return response.status == 200

        wait_for(healthy, "mlflow server", 240, log, proc)
        yield MlflowServer(uri, root / "art", log)
    finally:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- Slurm
@dataclass
class SlurmCluster:
    """A running one-node cluster; `env` (SLURM_CONF) lets sbatch/srun/sacct/scancel reach it."""

    root: Path
    conf: Path
    partition: str
    node: str
    gpus: int
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout


SLURM_CONF = """\
ClusterName=agecls
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# one machine, no cgroups: processes are tracked through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# accounting through slurmdbd, so that `sacct` answers (submitit polls jobs with it)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
AccountingStoragePass={munge_socket}
AccountingStorageTRES=gres/gpu,gres/shard
JobCompType=jobcomp/none
GresTypes=gpu,shard
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 Gres=gpu:{gpus},shard:{shards} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""

SLURMDBD_CONF = """\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort={dbd_port}
SlurmUser=root
PidFile={root}/slurmdbd.pid
LogFile={root}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=root
StorageLoc=slurm_acct_db
"""

# Slurm 22.05's gres/gpu drops a GPU without File= ("Removing file-less GPU gpu:(null) from final GRES
# list": no count-only GPUs), and one whose file is not a character device is counted but never exported to
# the job. Without cgroups nothing is bound, so two harmless character devices stand in for the GPUs; Slurm
# then gives each job its own index as CUDA_VISIBLE_DEVICES, as on a real GPU node. The shards (gres/shard,
# spread evenly over the GPUs) let `--gres=shard:1` jobs share one; CUDA_VISIBLE_DEVICES is the GPU's index.
GRES_CONF = """\
NodeName={host} Name=gpu File=/dev/null
NodeName={host} Name=gpu File=/dev/zero
NodeName={host} Name=shard Count={shards}
"""


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """slurmctld + slurmd on this machine (4 CPUs or more, `gpu:2,shard:4` GRES, partition `agecls`), with
    slurmdbd on a private MariaDB so that `sacct` answers; all on free ports of 127.0.0.1."""
    missing = [name for name in SLURM_PROGRAMS if not _which(name)]
    if missing:
        pytest.skip(f"no {', '.join(missing)}: {INSTALL_HINT}")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's Slurm daemons run as root (SlurmUser=root): run the tests as root")
    root = _engine_dir("slurm")
    for sub in ("state", "spool", "db", "munge"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    ports = {
        "ctld_port": free_port(),
        "slurmd_port": free_port(),
        "dbd_port": free_port(),
        "db_port": free_port(),
    }
    munge_socket = root / "munge" / "munge.socket"
    # at least 4 CPUs (config_overrides: more than this machine has is fine): 4 one-CPU trial jobs at once
    cpus = max(4, os.cpu_count() or 2)
    fill = {"root": root, "host": host, "munge_socket": munge_socket, "cpus": cpus, **ports}
    fill.update(gpus=SLURM_GPUS, shards=SLURM_GPUS * SLURM_SHARDS_PER_GPU, partition="agecls")
    (root / "slurm.conf").write_text(SLURM_CONF.format(**fill))
    dbd_conf = root / "slurmdbd.conf"
    dbd_conf.write_text(SLURMDBD_CONF.format(**fill))
    dbd_conf.chmod(0o600)  # slurmdbd refuses a readable config (it may hold the database password)
    (root / "gres.conf").write_text(GRES_CONF.format(**fill))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    procs: list[subprocess.Popen] = []
    try:
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munged = [
            _which("munged"),
            "--foreground",
            "--force",
            f"--socket={munge_socket}",
            f"--key-file={key}",
        ]
        munged += [f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log"]
        munged += [f"--seed-file={root}/munge/munged.seed"]
        procs.append(_spawn(munged, root / "munged.out", env=env))
        wait_for(munge_socket.exists, "munged", 30, root / "munged.out", procs[-1])

        subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={root}/db", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        mariadbd = [_which("mariadbd"), "--no-defaults", f"--datadir={root}/db", "--user=root"]
        mariadbd += [f"--port={ports['db_port']}", "--bind-address=127.0.0.1", f"--socket={root}/db.sock"]
        mariadbd += ["--skip-grant-tables", "--innodb-flush-log-at-trx-commit=0", "--skip-log-bin"]
        procs.append(_spawn(mariadbd, root / "mariadbd.log", env=env))
        wait_for(lambda: _port_open(ports["db_port"]), "mariadbd", 120, root / "mariadbd.log", procs[-1])

        procs.append(_spawn([_which("slurmdbd"), "-D"], root / "slurmdbd.out", env=env))
        wait_for(lambda: _port_open(ports["dbd_port"]), "slurmdbd", 180, root / "slurmdbd.log", procs[-1])
        procs.append(_spawn([_which("slurmctld"), "-D", "-i"], root / "slurmctld.out", env=env))
        wait_for(lambda: _port_open(ports["ctld_port"]), "slurmctld", 120, root / "slurmctld.log", procs[-1])
        procs.append(_spawn([_which("slurmd"), "-D"], root / "slurmd.out", env=env))
        cluster = SlurmCluster(
            root, root / "slurm.conf", "agecls", host, SLURM_GPUS, {"SLURM_CONF": env["SLURM_CONF"]}
        )

        def node_idle() -> bool:
            return cluster.run("sinfo", "-h", "-N", "-o", "%t").split() == ["idle"]

        wait_for(node_idle, "slurmd (node idle in sinfo)", 120, root / "slurmd.log", procs[-1])
        # the controller registers the cluster with slurmdbd; until then sacct has nothing to answer from
        wait_for(
            lambda: cluster.run("sacct", "-n", "-X", "-o", "JobID") is not None,
            "sacct",
            60,
            root / "slurmdbd.log",
        )
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True, timeout=30)
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------- a server that goes away
class Gate:
    """A TCP relay on a free port of 127.0.0.1 to `port`: clients use the gate's port; `close()` makes the
    server unreachable as a stopped one is (connection refused, open connections cut) and `open()` brings
    it back at once, so a test controls exactly how long a server (the MLflow server) is away."""

    def __init__(self, port: int) -> None:
        import threading

        self.target, self.port = port, free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.open()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """Refuse new connections and cut those open (the server is down)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
