"""`python -m r2m.serving --repository DIR [--host H] [--port N] [--threads N]` (the container's entry)."""

from __future__ import annotations

import argparse
import sys

from r2m.config import load_params
from r2m.errors import R2MError
from r2m.serving.server import run_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r2m.serving", description=__doc__)
    parser.add_argument("--repository", default=None, help="model repository (default: paths.model_repository)")
    parser.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: serve.port)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads, at most the usable CPUs (default: serve.threads)")
    args = parser.parse_args(argv)
    try:
        run_server(load_params(), args.repository, args.host, args.port, args.threads)
    except R2MError as err:
        print(f"r2m serve: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
