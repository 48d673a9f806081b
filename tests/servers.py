"""Real servers for the team tests, started by the tests themselves on loopback.

- `postgres_server`: a PostgreSQL cluster from Debian's `postgresql` package (`initdb` + the
  `postgres` server binary), in a fresh data folder, on a free port; as root it runs as the
  unprivileged `postgres` user (PostgreSQL refuses to run as root).
- `s3_server`: moto's S3 API server (`python -m moto.server`, the `moto[server]` extra) as its
  own process, with one bucket created through boto3.
- `mlflow_server`: `mlflow server` as its own process: PostgreSQL backend store, S3 artifact
  store behind the server's artifact proxy (`--artifacts-destination s3://...`), so a client on
  any machine needs only `MLFLOW_TRACKING_URI` — no S3 endpoint nor credentials of its own.
- `team_stack`: the three together, once per test session (`TeamStack`).

Every server is a child process with its log in the work folder; readiness is polled (a real
connection, a real request), never a fixed sleep; each is stopped (SIGTERM, then SIGKILL) when its
`with` block ends, however it ends. `make test` installs `postgresql` where `initdb` is missing.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

log = logging.getLogger("r2m.tests.servers")
BIN = Path(sys.executable).parent
PG_USER = "r2m"  # the cluster's superuser (trust auth on loopback: a throw-away test cluster)
PG_DB = "mlflow"
S3_KEY = {"AWS_ACCESS_KEY_ID": "r2m-test", "AWS_SECRET_ACCESS_KEY": "r2m-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "r2m"
START_TIMEOUT_S = 180.0


class ServerError(RuntimeError):
    """A test server did not start; the message names it and ends with its log."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_until(ready: Callable[[], bool], what: str, proc: subprocess.Popen, logfile: Path,
               timeout_s: float = START_TIMEOUT_S) -> float:
    """Poll `ready()` until it is true; `ServerError` if `proc` exits or `timeout_s` passes.
    Returns the seconds it took."""
    start = time.monotonic()
    delay = 0.05
    while True:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with code {proc.returncode} before it was ready:\n{_tail(logfile)}")
        try:
            if ready():
                return time.monotonic() - start
        except Exception:  # not up yet: connection refused, 5xx, ...
            pass
        if time.monotonic() - start > timeout_s:
            raise ServerError(f"{what} not ready after {timeout_s:g} s:\n{_tail(logfile)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> None:
    """Stop a server started by this module (its whole process group): `sig`, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _popen(cmd: list[str], logfile: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, **kw)


# ---------------------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path:
    """Where `initdb` and `postgres` are: $R2M_PG_BINDIR, Debian's newest
    /usr/lib/postgresql/<major>/bin, or the PATH."""
    if os.environ.get("R2M_PG_BINDIR"):
        return Path(os.environ["R2M_PG_BINDIR"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise ServerError("PostgreSQL's initdb not found (install Debian's `postgresql` package: "
                      "`make test` does it when run as root, or set R2M_PG_BINDIR)")


def _unprivileged_user() -> dict:
    """As root: run PostgreSQL as the `postgres` user (it refuses root). Else: as ourselves."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError("running as root and there is no `postgres` user for PostgreSQL to run as "
                          "(Debian's `postgresql` package creates it)") from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@contextmanager
def postgres_server(workdir: Path | str, database: str = PG_DB) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1:<free port> with database `database`; yields its
    SQLAlchemy URL `postgresql+psycopg2://r2m@127.0.0.1:<port>/<database>` (the driver named:
    SQLAlchemy 2.1 reads a bare `postgresql://` as psycopg 3, which is not installed)."""
    import psycopg2

    workdir = Path(workdir)
    bindir = postgres_bindir()
    as_user = _unprivileged_user()
    # the data folder must belong to the server's user and its parents be traversable by it:
    # a folder of its own under the system temp dir (pytest's tmp folders are root-only)
    data = Path(tempfile.mkdtemp(prefix="r2m-pg-"))
    if as_user:
        os.chown(data, as_user["user"], as_user["group"])
    logfile = workdir / "postgres.log"
    proc = None
    try:
        init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust",
                               "-E", "UTF8", "--locale=C", "--no-sync"],
                              capture_output=True, text=True, cwd=data, **as_user)
        if init.returncode != 0:
            raise ServerError(f"initdb failed (exit {init.returncode}):\n{init.stdout}\n{init.stderr}")
        port = free_port()
        proc = _popen([str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                       "-k", str(data), "-c", "fsync=off", "-c", "synchronous_commit=off",
                       "-c", "full_page_writes=off"], logfile, cwd=data, **as_user)

        def ready() -> bool:
            psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres", connect_timeout=2).close()
            return True

        took = wait_until(ready, "PostgreSQL", proc, logfile)
        con = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        con.close()
        log.info("PostgreSQL on port %d ready in %.1f s", port, took)
        yield f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/{database}"
    finally:
        if proc is not None:
            stop(proc, signal.SIGINT)  # PostgreSQL's "fast" shutdown
        shutil.rmtree(data, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """Another database on the cluster of `url` (e.g. Prefect's beside MLflow's); its URL with
    the same driver (Prefect wants `postgresql+asyncpg://`: replace the scheme)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    con = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname="postgres")
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    con.close()
    return u.set(database=name).render_as_string(hide_password=False)


# ---------------------------------------------------------------------------------- S3


def s3_client(endpoint_url: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url, aws_access_key_id=S3_KEY["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_KEY["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_KEY["AWS_DEFAULT_REGION"])


@contextmanager
def s3_server(workdir: Path | str, bucket: str = BUCKET) -> Iterator[str]:
    """moto's S3 server as its own process on 127.0.0.1:<free port>, with `bucket` created;
    yields its endpoint URL."""
    workdir = Path(workdir)
    port = free_port()
    logfile = workdir / "moto.log"
    env = {**os.environ, **S3_KEY}
    proc = _popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], logfile, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = s3_client(endpoint)
        took = wait_until(lambda: client.list_buckets() is not None, "moto S3 server", proc, logfile)
        client.create_bucket(Bucket=bucket)
        log.info("moto S3 on port %d ready in %.1f s", port, took)
        yield endpoint
    finally:
        stop(proc)


# ------------------------------------------------------------------------------ MLflow


MLFLOW_SERVER_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")  # the server's only
MLFLOW_CLIENT_ENV = ("MLFLOW_TRACKING_URI",)  # all a client (r2m, a worker) needs of the tracking server


def mlflow_server_args(backend_uri: str, artifacts_destination: str, host: str, port: int) -> list[str]:
    """The `mlflow server` options of the team set-up (deploy/compose.yaml uses the same)."""
    return ["--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_destination,
            "--serve-artifacts", "--host", host, "--port", str(port)]


@contextmanager
def mlflow_server(backend_uri: str, artifacts_destination: str, env: dict[str, str],
                  workdir: Path | str | None = None) -> Iterator[str]:
    """`mlflow server` as its own process on 127.0.0.1:<free port>: `backend_uri` as backend
    store, artifacts proxied to `artifacts_destination` (e.g. `s3://bucket/mlartifacts`; `env`
    gives the server — only the server — its endpoint and credentials). Yields the tracking URI."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="r2m-mlflow-"))
    port = free_port()
    logfile = workdir / "mlflow-server.log"
    cmd = [str(BIN / "mlflow"), "server", *mlflow_server_args(backend_uri, artifacts_destination, "127.0.0.1", port),
           "--workers", "1"]
    proc = _popen(cmd, logfile, env={**os.environ, **env, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"},
                  cwd=workdir)
    uri = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                return r.status == 200

        took = wait_until(ready, "mlflow server", proc, logfile)
        log.info("mlflow server on port %d ready in %.1f s", port, took)
        yield uri
    finally:
        stop(proc)


# -------------------------------------------------------------------------- the stack


@dataclass
class TeamStack:
    """What the team tests (and a client process) need to reach the shared servers."""

    tracking_uri: str  # http://127.0.0.1:<port>: the MLflow server
    s3_endpoint: str  # http://127.0.0.1:<port>: moto's S3 API
    bucket: str
    postgres_url: str  # postgresql+psycopg2://r2m@127.0.0.1:<port>/mlflow: MLflow's backend store
    env: dict[str, str] = field(default_factory=dict)  # an MLflow client's environment: MLFLOW_TRACKING_URI only
    s3_env: dict[str, str] = field(default_factory=dict)  # an S3 client's (DVC, boto3): keys, region, endpoint
    started_s: float = 0.0  # how long the three servers took to start, together
    workdir: Path | None = None  # the servers' logs

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/mlartifacts"


@dataclass
class S3:
    """The S3 server alone (`team_s3`): what a DVC remote or a boto3 client needs."""

    s3_endpoint: str
    bucket: str
    s3_env: dict[str, str]
    started_s: float


def _s3_env(endpoint: str) -> dict[str, str]:
    return {**S3_KEY, "AWS_ENDPOINT_URL": endpoint}


@contextmanager
def team_stack_started(workdir: Path | str, s3: S3 | None = None) -> Iterator[TeamStack]:
    """PostgreSQL + S3 (or the given one) + the MLflow server on them, started in that order and
    stopped in reverse. `started_s`: the seconds until all three answered."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with ExitStack() as servers:
        pg = servers.enter_context(postgres_server(workdir))
        if s3 is None:
            endpoint = servers.enter_context(s3_server(workdir))
            before = 0.0
        else:
            endpoint, before = s3.s3_endpoint, s3.started_s
        server_env = {**S3_KEY, "MLFLOW_S3_ENDPOINT_URL": endpoint}
        uri = servers.enter_context(mlflow_server(pg, f"s3://{BUCKET}/mlartifacts", server_env, workdir))
        stack = TeamStack(
            tracking_uri=uri, s3_endpoint=endpoint, bucket=BUCKET, postgres_url=pg,
            env={"MLFLOW_TRACKING_URI": uri}, s3_env=_s3_env(endpoint),
            started_s=time.monotonic() - start + before, workdir=workdir,
        )
        line = f"team stack (PostgreSQL + moto S3 + mlflow server) started in {stack.started_s:.1f} s"
        log.info(line)
        print(f"\n{line}", file=sys.__stderr__)  # past pytest's capture: every `make test` shows it
        yield stack


@pytest.fixture(scope="session")
def team_s3(tmp_path_factory) -> Iterator[S3]:
    """moto's S3 server with the bucket `r2m`, once per session (shared with `team_stack`)."""
    workdir = tmp_path_factory.mktemp("team-s3")
    start = time.monotonic()
    with s3_server(workdir) as endpoint:
        yield S3(endpoint, BUCKET, _s3_env(endpoint), time.monotonic() - start)


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory, team_s3) -> Iterator[TeamStack]:
    """One PostgreSQL + S3 + MLflow server stack for the whole test session (see `TeamStack`)."""
    with team_stack_started(tmp_path_factory.mktemp("team-stack"), team_s3) as stack:
        yield stack


def empty_registry(tracking_uri: str) -> None:
    """Delete every registered model on the server (runs stay, unreferenced): a test that needs
    an empty registry starts from one, whatever an earlier test of the session left."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for rm in client.search_registered_models(max_results=1000):
        client.delete_registered_model(rm.name)


@pytest.fixture
def team_registry(team_stack) -> TeamStack:
    """`team_stack` with an empty model registry (registered models of earlier tests deleted)."""
    empty_registry(team_stack.tracking_uri)
    return team_stack
