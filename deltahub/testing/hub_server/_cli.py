"""``python -m deltahub.testing.hub_server``: the command line (a contract: keep its options)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ._common import DEFAULT_USERNAME, is_loopback_host, logger
from ._server import HubServer


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _megabytes_per_second(text: str) -> float:
    """``--bandwidth``: a positive, finite number of megabytes per second."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of MB/s, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deltahub.testing.hub_server --root DIR [--host H] [--port N] [--token T] [--bandwidth MBPS]``."""
    parser = argparse.ArgumentParser(
        prog="python -m deltahub.testing.hub_server",
        description="Local Hugging Face Hub-compatible server (repos persist in --root). "
        "Point clients at it with HF_ENDPOINT=<url> and HF_HUB_DISABLE_XET=1.",
    )
    parser.add_argument("--root", required=True, help="storage directory (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback only by default)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = pick a free one)")
    parser.add_argument("--token", default=None, help="require this bearer token for writes / private reads")
    parser.add_argument("--username", default=DEFAULT_USERNAME, help="account name (whoami, default namespace)")
    parser.add_argument("--allow-non-loopback", action="store_true", help="allow binding a non-loopback address")
    parser.add_argument("--bandwidth", type=_megabytes_per_second, default=None, metavar="MBPS",
                        help="limit response bodies to MBPS megabytes (10**6 bytes) per second, shared by all "
                        "connections like one real link (default: unlimited)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request (to stderr)")
    args = parser.parse_args(argv)

    if not args.allow_non_loopback and not is_loopback_host(args.host):
        print(
            f"error: refusing to bind non-loopback host {args.host!r}; pass --allow-non-loopback to override",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if args.verbose:
        logger.setLevel(logging.DEBUG)
    server = HubServer(
        args.root,
        host=args.host,
        port=args.port,
        token=args.token,
        username=args.username,
        allow_non_loopback=args.allow_non_loopback,
        bandwidth=args.bandwidth,
    )
    try:
        server.start()
    except OSError as e:
        print(f"error: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    link = f", bandwidth={args.bandwidth:g} MB/s" if args.bandwidth is not None else ""
    print(f"Hub server running at {server.url} (root={server.root}, auth={'token' if args.token else 'open'}{link})")
    print(f"  export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1   # Ctrl-C to stop", flush=True)
    # Treat SIGTERM like Ctrl-C so the server shuts down cleanly (main thread only). SIGINT too, explicitly: a
    # server started in the background by a non-interactive shell (`... &` in a script) inherits SIGINT ignored.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if in_main_thread else None
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler) if in_main_thread else None
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
    return 0
