"""Pub/Sub on loopback: the gcloud SDK's emulator when present, else a built-in fallback.

Both answer the Pub/Sub v1 REST API on ``http://127.0.0.1:PORT``, so
google-api-python-client works against either with
``client_options={"api_endpoint": url + "/"}``.

- ``emulator``: ``platform/pubsub-emulator/bin/cloud-pubsub-emulator`` from the
  SDK that ``gcloud`` on PATH belongs to (found without running gcloud, which
  takes seconds). It needs ``java`` and keeps its state in memory only.
- ``fallback``: :mod:`localcloud.pubsub_fallback`, in this process's threads.
- ``auto``: the emulator when the SDK has it and java exists, else the fallback.

As a process for the supervisor::

    python -m localcloud.pubsub --port P [--kind auto|emulator|fallback]

prints ``ready URL`` once serving and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from localcloud.errors import LocalCloudError
from localcloud.ports import (
    HOST,
    PortTaken,
    die_with_parent,
    ensure_free,
    start_on_free_port,
    wait_http,
)
from localcloud.pubsub_fallback import FallbackServer

KINDS = ("auto", "emulator", "fallback")
PORT_SETTING = "LOCALCLOUD_PUBSUB_PORT"
# The JVM starts in about 1.5 s here; leave room for a slow CI machine.
EMULATOR_START_TIMEOUT = 60.0
# What the emulator prints once it serves, or when its port is taken (it then keeps running).
EMULATOR_STARTED = b"Server started, listening on"
EMULATOR_BIND_FAILED = b"java.net.BindException"


def find_emulator() -> Path | None:
    """The SDK's emulator launcher, or None when gcloud, the component or java is missing."""
    gcloud = shutil.which("gcloud")
    if gcloud is None or shutil.which("java") is None:
        return None
    # gcloud is often a symlink (/usr/bin/gcloud -> SDK/bin/gcloud); the SDK root is
    # the parent of the real file's directory.
    sdk_root = Path(gcloud).resolve().parent.parent
    launcher = sdk_root / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    return launcher if os.access(launcher, os.X_OK) else None


def emulator_missing_reason() -> str | None:
    """Why the emulator kind cannot run here, or None when it can."""
    if shutil.which("gcloud") is None:
        return "gcloud is not on PATH"
    if shutil.which("java") is None:
        return "java is not on PATH (the Pub/Sub emulator needs it)"
    if find_emulator() is None:
        return (
            "the gcloud SDK has no Pub/Sub emulator; "
            "install it with `gcloud components install pubsub-emulator` "
            "or the google-cloud-cli-pubsub-emulator package"
        )
    return None


@dataclass
class PubSubServer:
    """A running Pub/Sub, either the emulator's process or the in-process fallback."""

    port: int
    kind: str
    process: subprocess.Popen[bytes] | None = None
    fallback: FallbackServer | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        """Stop serving; for the emulator, end its whole process group."""
        if self.fallback is not None:
            self.fallback.stop()
            self.fallback = None
        if self.process is not None:
            _stop_group(self.process)
            self.process = None


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    # The launcher execs java today, but signalling the group also covers a
    # launcher that forks, so no JVM outlives us.
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def start_pubsub(
    port: int = 0,
    kind: str = "auto",
    project: str = "local",
    data_dir: Path | None = None,
    log: IO[bytes] | None = None,
) -> PubSubServer:
    """Start Pub/Sub on loopback and wait until it answers REST.

    Args:
        port: 0 for any free port.
        kind: "emulator", "fallback" or "auto" (the emulator when available).
        project: the project whose topics the readiness probe lists.
        data_dir: where the fallback saves its state across restarts; the
            emulator keeps everything in memory and ignores it.
        log: where the emulator's output goes (default: discarded).

    Raises:
        LocalCloudError: unknown kind, emulator missing, port taken, or no answer.
    """
    if kind not in KINDS:
        raise LocalCloudError(f"Pub/Sub kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "emulator" if find_emulator() is not None else "fallback"
    if kind == "fallback":
        try:
            fallback = FallbackServer(HOST, port, data_dir)  # port 0: it binds any free port
        except OSError as exc:
            raise LocalCloudError(
                f"port {port} for Pub/Sub is taken ({exc.strerror}); free it or set "
                f"{PORT_SETTING} to another port (0 picks a free one)"
            ) from None
        return PubSubServer(fallback.port, "fallback", fallback=fallback)
    if port:
        ensure_free(port, f"Pub/Sub ({kind})", PORT_SETTING)
        return _start_emulator(port, project, log)
    # The emulator takes a port number only: it is started again on another port when
    # another process took the picked one before the emulator bound it.
    return start_on_free_port(lambda picked: _start_emulator(picked, project, log))


class _EmulatorOutput:
    """Copies the emulator's output to ``log`` and notes whether it could bind its port."""

    def __init__(self, pipe: IO[bytes], log: IO[bytes] | None) -> None:
        self.settled = threading.Event()
        self.bind_failed = False
        self._log = log
        threading.Thread(
            target=self._copy, args=(pipe,), daemon=True, name="pubsub-emulator-output"
        ).start()

    def _copy(self, pipe: IO[bytes]) -> None:
        recent = b""
        try:
            while chunk := os.read(pipe.fileno(), 65536):
                self._write(chunk)
                if not self.settled.is_set():
                    recent = recent[-100:] + chunk
                    self.bind_failed = EMULATOR_BIND_FAILED in recent
                    if self.bind_failed or EMULATOR_STARTED in recent:
                        self.settled.set()
        finally:
            pipe.close()
            self.settled.set()

    def _write(self, chunk: bytes) -> None:
        if self._log is None:
            return
        try:
            self._log.write(chunk)
            self._log.flush()
        except (OSError, ValueError):  # the caller closed its log: drain without it
            self._log = None


def _start_emulator(port: int, project: str, log: IO[bytes] | None) -> PubSubServer:
    reason = emulator_missing_reason()
    launcher = find_emulator()
    if reason is not None or launcher is None:
        raise LocalCloudError(f"Pub/Sub emulator unavailable: {reason}; or use kind 'fallback'")
    process = subprocess.Popen(
        [str(launcher), f"--host={HOST}", f"--port={port}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so stop() can end the JVM tree
        preexec_fn=die_with_parent,
    )
    assert process.stdout is not None
    output = _EmulatorOutput(process.stdout, log)
    server = PubSubServer(port, "emulator", process=process)
    try:
        # Whatever answers on the port may be another process: the emulator's own
        # output says whether it bound the port.
        output.settled.wait(EMULATOR_START_TIMEOUT)
        if output.bind_failed:
            raise PortTaken(f"port {port} for the Pub/Sub emulator was taken before it bound it")
        wait_http(
            f"{server.url}/v1/projects/{project}/topics",
            EMULATOR_START_TIMEOUT,
            "the Pub/Sub emulator",
            lambda: process.poll() is None,
        )
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    """Serve Pub/Sub until SIGTERM or SIGINT; print ``ready URL`` once serving."""
    parser = argparse.ArgumentParser(prog="python -m localcloud.pubsub", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--kind", choices=KINDS, default="auto")
    parser.add_argument("--project", default="local")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    try:
        server = start_pubsub(args.port, args.kind, args.project, args.data_dir, sys.stderr.buffer)
    except LocalCloudError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"# Pub/Sub {server.kind} started in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    print(f"ready {server.url}", flush=True)
    try:
        while not stop.wait(0.5):
            if server.process is not None and server.process.poll() is not None:
                print("error: the Pub/Sub emulator exited", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
