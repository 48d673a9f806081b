"""The `r2m` command line: a thin driver over the library, one module per verb.

Exit status (docs/usage.md, "Command line"): 0 success, 1 a verdict against the input (a gate failed, a
specialist rejected), 2 bad input (any `R2MError`: one line on stderr naming the file, key or
flag), 70 a bug in r2m (any other exception: one line on stderr naming it and the log file that
holds the full traceback; 70 is EX_SOFTWARE of BSD's sysexits.h). The app and its `command`
decorator live in `r2m.cli.app`; importing the verb modules registers their commands on it.
"""

from __future__ import annotations

import sys

from r2m.cli.app import EXIT_BAD_INPUT, EXIT_BUG, app, command, write_crash_log  # noqa: F401  (before torch loads)
from r2m.cli import (  # noqa: E402,F401
    data,
    demo_data,
    train,
    merge,
    evaluate,
    registry,
    export,
    serve,
    run,
    external,
)


def main() -> None:
    app(prog_name="r2m")


if __name__ == "__main__":
    main()
    sys.exit(0)
