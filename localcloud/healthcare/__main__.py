"""``python -m localcloud.healthcare``: run the emulator in the foreground.

Prints ``ready URL`` once serving and stops cleanly on SIGTERM or Ctrl-C. A
taken port or a bad knob gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from localcloud.errors import LocalCloudError
from localcloud.healthcare import start_healthcare
from localcloud.healthcare.knobs import knobs_from_env, parse_faults, parse_latency


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m localcloud.healthcare", description="Cloud Healthcare API emulator"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=0, help="0 picks a free port")
    where.add_argument(
        "--fd", type=int, default=None, help="an inherited loopback socket, bound and listening"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--storage-endpoint", default=None, help="fake-gcs-server URL")
    parser.add_argument(
        "--storage-root",
        type=Path,
        default=None,
        help="filesystem root of that fake-gcs-server, for imports to read its files directly",
    )
    parser.add_argument(
        "--pubsub-endpoint", default=None, help="Pub/Sub REST URL for store notifications"
    )
    parser.add_argument(
        "--import-workers", type=int, default=None, help="default: one per core, at least 2"
    )
    parser.add_argument("--operation-latency", type=float, default=None, help="seconds")
    parser.add_argument("--max-concurrent-ops", type=int, default=None, help="0 = no limit")
    parser.add_argument("--faults", default=None, help="e.g. import=0.1:503,export=1.0:500")
    parser.add_argument("--latency", default=None, help="e.g. import=0.5,dicomWeb.search=0.01")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    # pydicom warns about odd files with their values, which can be patient data.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    try:
        knobs = knobs_from_env(os.environ)
        if args.operation_latency is not None:
            knobs["operation_latency"] = args.operation_latency
        if args.max_concurrent_ops is not None:
            knobs["max_concurrent_ops"] = args.max_concurrent_ops
        if args.faults is not None:
            knobs["faults"] = parse_faults(args.faults)
        if args.latency is not None:
            knobs["latency"] = parse_latency(args.latency)
        server = start_healthcare(
            args.port,
            args.data_dir,
            args.storage_endpoint,
            args.pubsub_endpoint,
            args.import_workers,
            args.storage_root,
            listener=None if args.fd is None else socket.socket(fileno=args.fd),
            **knobs,
        )
    except (LocalCloudError, ValueError) as exc:
        print(f"healthcare emulator: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"ready {server.url}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
