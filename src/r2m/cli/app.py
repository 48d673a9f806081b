"""The `r2m` typer app and `command`, the decorator every verb registers with (one module per
verb in `r2m.cli`, which imports them all).

Exit status (docs/usage.md, "Command line"): 0 success, 1 a verdict against the input (a gate failed, a
specialist rejected), 2 bad input (any `R2MError`: one line on stderr naming the file, key or
flag), 70 a bug in r2m (any other exception: one line on stderr naming it and the log file that
holds the full traceback; 70 is EX_SOFTWARE of BSD's sysexits.h).
"""

from __future__ import annotations

from r2m.threads import set_thread_env

set_thread_env()  # before anything imports torch or numpy: OpenMP reads these once, when it loads

import functools  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import typer  # noqa: E402

from r2m.errors import R2MError  # noqa: E402

EXIT_BAD_INPUT = 2
EXIT_BUG = 70  # EX_SOFTWARE (sysexits.h): an internal error, distinct from bad input
CRASH_LOGS = "logs"  # under the project root: logs/r2m-crash-<time>-<pid>.log

app = typer.Typer(
    name="r2m",
    help=(
        "Keep one deepfake detector up to date as new generators appear: fine-tune one "
        "specialist per generator, merge them training-free with R²M, gate, export to ONNX, serve."
    ),
    epilog=("Exit status: 0 success, 1 a verdict against the input (gate failed, specialist rejected), "
            "2 bad input (one line naming the file, key or flag), 70 a bug in r2m (one line naming the crash log "
            "under <project root>/logs/). Threads: R2M_THREADS=N or R2M_THREADS=library (docs/usage.md, \"Running beside other jobs\")."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _cli_flow() -> tuple[type[BaseException], ...]:
    """What the CLI raises on purpose, passed through untouched: typer's exits and aborts, and the
    exits, aborts and usage errors of click (typer ≥ 0.20 ships its own copy, `typer._click`)."""
    kinds: list[type[BaseException]] = [typer.Exit, typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        kinds += [getattr(module, k) for k in ("Exit", "Abort", "ClickException") if hasattr(module, k)]
    return tuple(kinds)


_CLI_FLOW = _cli_flow()


def write_crash_log(verb: str, err: BaseException) -> Path:
    """Write the full traceback of `err` to `<project root>/logs/r2m-crash-<time>-<pid>.log`, or
    to the temp folder when the project cannot take it; returns the file written."""
    from r2m import __version__
    from r2m.config import project_root
    from r2m.fileio import atomic_write_text

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"r2m-crash-{stamp}-{os.getpid()}.log"
    text = (f"r2m {__version__}, python {sys.version.split()[0]}, {stamp}\n"
            f"command: {' '.join(sys.argv)} (verb {verb})\ncwd: {os.getcwd()}\n\n"
            + "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    try:
        folders = [project_root() / CRASH_LOGS]
    except OSError:  # the cwd itself is gone
        folders = []
    for folder in (*folders, Path(tempfile.gettempdir())):
        try:
            return atomic_write_text(folder / name, text)
        except OSError:
            continue
    raise OSError("no folder to write the crash log to")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def command(name: str, **kwargs) -> Callable:
    """Register a verb: an `R2MError` becomes one line on stderr and exit status 2; any other
    exception (a bug in r2m) one line naming it and its crash log, exit status 70. The CLI's own
    exits, Ctrl-C and SystemExit pass through untouched."""

    def decorator(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except R2MError as err:
                typer.echo(f"r2m {name}: error: {err}", err=True)
                raise typer.Exit(code=EXIT_BAD_INPUT) from None
            except _CLI_FLOW:
                raise  # the CLI's own exits and usage errors: its flow, not a crash
            except Exception as err:  # noqa: BLE001 - the last resort: never a raw traceback
                try:
                    where = f"full traceback in {write_crash_log(name, err)}"
                except OSError as log_err:
                    where = f"no crash log could be written ({log_err})"
                what = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                typer.echo(f"r2m {name}: internal error, a bug in r2m (please report it): {_one_line(what)}; {where}",
                           err=True)
                raise typer.Exit(code=EXIT_BUG) from None

        app.command(name, **kwargs)(wrapper)
        return wrapper

    return decorator
