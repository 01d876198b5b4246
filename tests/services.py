"""Real servers for the slow `services` tests: a throw-away PostgreSQL cluster, an `mlflow server`
on it, and a single-node Slurm (slurmctld + slurmd + munge on loopback). They come from Debian packages
(postgresql, slurm-wlm, munge; `.ci/run` installs them): without them the tests that need them skip
here and fail under CI=true. The fixtures (tests/conftest.py) start each server once per session.
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # in-process tests set some
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def missing(what: str):
    message = f"{what} not installed (apt-get install postgresql slurm-wlm munge; .ci/run installs them)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Postgres:
    """A throw-away PostgreSQL cluster on a loopback port (trust auth, fsync off)."""

    def __init__(self):
        initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: float(Path(p).parts[-3]))
        if not initdb:
            missing("PostgreSQL server (Debian package postgresql)")
        self.bin = Path(initdb[-1]).parent
        self.base = Path(tempfile.mkdtemp(prefix="promptehr-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.base, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.run("initdb", "-D", self.base / "data", "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.run(
            "pg_ctl",
            "-D",
            self.base / "data",
            "-l",
            self.base / "server.log",
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            "start",
        )

    def run(self, tool, *args):
        subprocess.run([*self.as_user, str(self.bin / tool), *map(str, args)], check=True, capture_output=True, timeout=120)

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self):
        self.run("pg_ctl", "-D", self.base / "data", "-m", "fast", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def start_mlflow_server(postgres):
    """`mlflow server` backed by PostgreSQL, as on a cluster: every process logs to it over HTTP.
    Returns (uri, stop)."""
    workdir = Path(tempfile.mkdtemp(prefix="promptehr-mlflow-"))
    port = free_port()
    backend = postgres.create_database("mlflow")
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(workdir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        cwd=workdir,
    )
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, (workdir / "server.log").read_text()[-3000:]
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    wait_for(healthy, 180, "mlflow server")

    def stop():
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)

    return uri, stop


class Slurm:
    """A single-node Slurm cluster on loopback: munged, slurmctld and slurmd in a temporary folder."""

    def __init__(self):
        tools = {
            name: shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
            for name in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
        }
        if not all(tools.values()):
            missing(f"Slurm/munge ({', '.join(k for k, v in tools.items() if not v)})")
        self.tools = tools
        self.dir = Path(tempfile.mkdtemp(prefix="promptehr-slurm-"))
        munge = self.dir / "munge"
        munge.mkdir(mode=0o700)
        (munge / "munge.key").write_bytes(os.urandom(1024))
        (munge / "munge.key").chmod(0o600)
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir()
        self.procs = [
            subprocess.Popen(
                [
                    tools["munged"],
                    "--foreground",
                    "--force",
                    f"--key-file={munge / 'munge.key'}",
                    f"--socket={munge / 'munge.socket'}",
                    f"--pid-file={munge / 'munged.pid'}",
                    f"--log-file={munge / 'munged.log'}",
                    f"--seed-file={munge / 'munged.seed'}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        ]
        wait_for(lambda: (munge / "munge.socket").exists(), 30, "munged")
        user = getpass.getuser()
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.conf = self.dir / "slurm.conf"
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=promptehr-test",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={munge / 'munge.socket'}",
                    f"SlurmUser={user}",
                    f"SlurmdUser={user}",
                    f"StateSaveLocation={self.dir / 'state'}",
                    f"SlurmdSpoolDir={self.dir / 'spool'}",
                    f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.dir / 'slurmd.pid'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "MinJobAge=600",
                    "MailProg=/bin/true",
                    f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
                    f"RealMemory={int(memory_mb * 0.9)} State=UNKNOWN",
                    "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.env = clean_env(SLURM_CONF=str(self.conf))
        for daemon, extra in (("slurmctld", []), ("slurmd", ["-N", "localhost"])):
            log = open(self.dir / f"{daemon}.log", "w")
            self.procs.append(
                subprocess.Popen(
                    [tools[daemon], "-D", "-f", str(self.conf), *extra], env=self.env, stdout=log, stderr=subprocess.STDOUT
                )
            )
        wait_for(lambda: "idle" in self.scontrol("show", "node", "localhost", check=False), 60, "the Slurm node")

    def scontrol(self, *args, check=True) -> str:
        proc = subprocess.run([self.tools["scontrol"], *args], env=self.env, capture_output=True, text=True, timeout=30)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc.stdout.lower() + proc.stderr.lower()

    def job_states(self, job_id: str) -> list[str]:
        out = self.scontrol("show", "job", job_id)
        return [part.split("=", 1)[1] for part in out.split() if part.startswith("jobstate=")]

    def stop(self):
        subprocess.run([self.tools["scancel"], "--user", getpass.getuser()], env=self.env, timeout=30)
        time.sleep(1)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
