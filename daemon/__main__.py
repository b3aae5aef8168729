"""`python -m chinwag.daemon`: what `chinwag serve` runs.

With ``--check`` it serves nothing: it checks the config, the storage URL and
each agent's provider, and prints one JSON report on stdout (`chinwag doctor`
renders it; see ``_check.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from pathlib import Path

import msgspec
import structlog
import trio
from chinwag.protocol import default_socket_path
from chinwag.storage import StorageError

from ._check import run_check
from ._config import ConfigError, default_storage_url, load_config
from ._logging import configure_logging
from ._serve import serve
from ._server import ServeError
from ._tools import TOOL_NAMES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chinwag serve", description="Run the chinwag daemon.")
    parser.add_argument(
        "--config",
        type=Path,
        help="config.toml (default: $CHINWAG_CONFIG, "
        "else config.toml in the user config directory)",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        help="Unix socket path (default: $CHINWAG_SOCKET, "
        "else $XDG_RUNTIME_DIR/chinwag/chinwag.sock)",
    )
    parser.add_argument("--storage", help="storage URL, e.g. sqlite:////abs/path.db or memory:")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("CHINWAG_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="least severe log level written to stderr (default: $CHINWAG_LOG_LEVEL, else info)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config, the storage and each agent's provider, print a JSON report "
        "on stdout and exit (what `chinwag doctor` runs)",
    )
    parser.add_argument(
        "--store-in-use",
        action="store_true",
        help="with --check: a daemon serves on this storage, so leave it closed (opening "
        "it could migrate or lock what that daemon uses)",
    )
    args = parser.parse_args(argv)
    if args.check:
        # Only failures: a check opens the store and the providers like a daemon would.
        configure_logging(logging.ERROR)
        report = run_check(args.config, args.storage, store_in_use=args.store_in_use)
        sys.stdout.buffer.write(msgspec.json.encode(report) + b"\n")
        sys.stdout.flush()
        return 0
    configure_logging(getattr(logging, args.log_level.upper()))
    log = structlog.get_logger("chinwag.daemon")
    try:
        config = load_config(args.config, tool_names=TOOL_NAMES)
    except ConfigError as exc:
        print(f"chinwag: {exc}", file=sys.stderr)
        return 2
    socket_path = args.socket or (
        Path(config.daemon.socket) if config.daemon.socket else default_socket_path()
    )
    storage_url = args.storage or config.daemon.storage or default_storage_url()
    try:
        trio.run(
            partial(
                serve, config, socket_path=socket_path, storage_url=storage_url, handle_signals=True
            )
        )
    except (ServeError, StorageError) as exc:  # StorageError: the store would not open
        print(f"chinwag: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except ValueError as exc:  # a storage URL the daemon does not know
        print(f"chinwag: {exc}", file=sys.stderr)
        return 2
    log.info("exit", code=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
