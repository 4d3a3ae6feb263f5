"""The `serve` verb: load the runs, then serve the page and the API with uvicorn. FastAPI and
uvicorn are the `[serve]` extra; without them the verb says, in one line, what to install."""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from pathlib import Path

from ..errors import PretuneError

INSTALL = "pip install 'pretune[serve]'"


def require_serve_deps() -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise PretuneError(f"the server needs {' and '.join(missing)}, which are not installed", "pretune serve", INSTALL)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_cmd(runs: list[Path], host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
              weights: str = "auto") -> None:
    """Serve runs as a local web page and JSON API: fill-mask, streamed generation, classification, similarity, cost, live curves.

    Args:
        runs: run directories (pretrain, finetune or import); each is served under its folder's name
        host: the address to listen on; anything but loopback exposes the models to the network
        port: the TCP port (0: any free one)
        max_batch: concurrent generation requests decoded together (1: one at a time)
        weights: auto (the run's own: int4 for a run imported with --weights int4, else fp32), fp32 (as trained), bf16, int8 (per channel) or int4 (groups of 32) for every run: docs/performance.md
    """
    require_serve_deps()
    from ..models.quantize import check_weights

    check_weights(weights, "pretune serve")
    if not 0 <= port <= 65535:
        raise PretuneError(f"--port {port} is not a TCP port", "pretune serve", "use 0 .. 65535, e.g. 8000")
    if max_batch < 1:
        raise PretuneError(f"--max-batch {max_batch} must be at least 1", "pretune serve", "use e.g. 16")
    import uvicorn

    from .api import create_app
    from .runs import load_runs

    loaded = load_runs(list(runs), weights)
    if not _loopback(host):
        print(f"warning: listening on {host}: anyone who can reach this address can use the models "
              "(there is no authentication); use --host 127.0.0.1 to keep it local", file=sys.stderr)
    app = create_app(loaded, max_batch)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {', '.join(f'{n} ({r.kind})' for n, r in loaded.items())} at http://{shown}:{port}/ "
          f"(API: http://{shown}:{port}/docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
