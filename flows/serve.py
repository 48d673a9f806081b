"""Serve the watcher on a schedule behind a local Prefect server (docs/usage.md, "On a schedule (Prefect)").

    python -m flows.serve                # from the project root; Ctrl-C stops both

1. starts `prefect server start` in the background, its state under `.prefect/` in the project
   (PREFECT_HOME), its log in `.prefect/server.log`; a server already answering on the port is
   reused instead (and left running on exit);
2. waits until `GET /api/health` answers;
3. serves the `r2m-watch` flow as the deployment `r2m-watch/continual`, every
   `flow.schedule_interval_s` seconds (params.yaml), at most one run at a time.

The Prefect UI at http://127.0.0.1:4200 then shows the deployment, its runs, their task runs
and the artifacts (datasets, specialists, gate report with MLflow links). `--port`, `--params`
and `--no-schedule` (serve without starting a run on a timer) are optional.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEPLOYMENT = "continual"
HEALTH_TIMEOUT_S = 120.0


def api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def is_healthy(url: str) -> bool:
    """True when the Prefect API at `url` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(url: str, server: subprocess.Popen | None, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Block until the API answers; fail early (with the log's place) if the server process died."""
    deadline = time.monotonic() + timeout_s
    while not is_healthy(url):
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"prefect server exited with status {server.returncode}; see its log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Prefect API at {url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


def server_env(home: Path, url: str) -> dict[str, str]:
    """The environment of the server and of this process: state under `home`, no telemetry."""
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def start_server(home: Path, host: str, port: int) -> subprocess.Popen:
    """`prefect server start` in the background, logging to `<home>/server.log`."""
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "ab")  # noqa: SIM115 -- owned by the child for its lifetime
    prefect = Path(sys.executable).with_name("prefect")
    return subprocess.Popen(
        [str(prefect), "server", "start", "--host", host, "--port", str(port)],
        env=server_env(home, api_url(host, port)), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches us, and we stop the server ourselves
    )


def stop_server(server: subprocess.Popen, timeout_s: float = 20.0) -> None:
    server.terminate()
    try:
        server.wait(timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def serve_watcher(params_file: str | None, interval_s: int | None) -> None:
    """Serve `r2m-watch` (blocks until interrupted)."""
    from flows.continual import watch

    watch.serve(
        name=DEPLOYMENT,
        interval=interval_s,
        parameters={"params_file": params_file},
        global_limit=1,  # a scheduled run never overlaps the previous one
        description="Scan the data root; onboard new generators; re-merge, gate, release.",
        tags=["r2m"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=None, help="params.yaml to read (default: the project's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--no-schedule", action="store_true", help="serve the deployment without a timer")
    args = parser.parse_args(argv)

    from r2m.config import load_params

    params = load_params(args.params)
    home = params.root / ".prefect"
    url = api_url(args.host, args.port)
    os.environ.update(server_env(home, url))  # before Prefect reads its settings

    server = None
    if is_healthy(url):
        print(f"using the Prefect server already at {url}")
    else:
        print(f"starting a Prefect server at {url} (state in {home}, log in {home / 'server.log'})")
        server = start_server(home, args.host, args.port)
    try:
        wait_healthy(url, server)
        interval = None if args.no_schedule else params.flow.schedule_interval_s
        print(f"serving r2m-watch/{DEPLOYMENT} every {interval} s; UI: http://{args.host}:{args.port}")
        serve_watcher(args.params, interval)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    main()
