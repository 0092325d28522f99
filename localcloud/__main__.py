"""``python -m localcloud up [--detach] | down | status | env | tick minute|export | demo``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from localcloud.errors import LocalCloudError
from localcloud.stack import StackConfig


def _state(config: StackConfig) -> dict[str, Any]:
    """The running stack's state, or LocalCloudError when none runs."""
    path = config.home / "state.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise LocalCloudError("the local cloud is not running; start it with `make up`") from None
    if not _alive(int(state["pid"])):
        path.unlink(missing_ok=True)
        raise LocalCloudError(
            "the local cloud is not running (stale state removed); start it with `make up`"
        )
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_up(config: StackConfig, detach: bool) -> int:
    try:
        _state(config)
    except LocalCloudError:
        pass
    else:
        raise LocalCloudError(
            f"the local cloud already runs from {config.home}; `python -m localcloud down` first"
        )
    if detach:
        return _up_detached(config)
    from dicomflow import log
    from localcloud.stack import Stack

    log.configure(stream=sys.stderr)
    stack = Stack(config)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stack.start()
    stack.write_state()
    for name, value in stack.env().items():
        print(f"export {name}={value}")
    print(f"# local cloud ready (Pub/Sub: {stack.pubsub_kind}); stop with Ctrl-C", flush=True)
    try:
        stopping.wait()
    finally:
        stack.stop()
    return 0


def _up_detached(config: StackConfig) -> int:
    config.home.mkdir(parents=True, exist_ok=True)
    log_path = config.home / "localcloud.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "localcloud", "up"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    state_path = config.home / "state.json"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            if not tail:
                raise LocalCloudError(f"the local cloud exited; see {log_path}")
            raise LocalCloudError(tail[0].removeprefix("localcloud: "))
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state.get("pid") == process.pid:
                print(f"local cloud running (pid {process.pid}, Pub/Sub: {state['pubsubKind']})")
                return 0
        time.sleep(0.1)
    process.terminate()
    raise LocalCloudError(f"the local cloud did not start within 120 s; see {log_path}")


def cmd_down(config: StackConfig) -> int:
    try:
        state = _state(config)
    except LocalCloudError:
        print("the local cloud is not running")
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    print("local cloud stopped")
    return 0


def cmd_env(config: StackConfig, gcloud: bool) -> int:
    state = _state(config)
    for name, value in state["env"].items():
        print(f"export {name}={value}")
    if state.get("pubsubKind") == "emulator":
        print(f"export PUBSUB_EMULATOR_HOST={state['urls']['pubsub'].removeprefix('http://')}")
    if gcloud:
        print(f"export CLOUDSDK_API_ENDPOINT_OVERRIDES_HEALTHCARE={state['urls']['healthcare']}/")
        print(
            f"export CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE={state['urls']['storage']}/storage/v1/"
        )
        print(f"export CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB={state['urls']['pubsub']}/")
        print("export CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true")
        print("export CLOUDSDK_CORE_PROJECT=local")
    return 0


def cmd_status(config: StackConfig, as_json: bool) -> int:
    from localcloud.delivery import count_dead_letters

    state = _state(config)
    dead = count_dead_letters(config.dead_letter_path)
    rows = []
    for name, url in state["urls"].items():
        try:
            with urllib.request.urlopen(url, timeout=2):
                up = True
        except urllib.error.HTTPError:
            up = True
        except (urllib.error.URLError, OSError):
            up = False
        rows.append({"service": name, "url": url, "up": up})
    if as_json:
        print(
            json.dumps(
                {
                    "pid": state["pid"],
                    "pubsubKind": state["pubsubKind"],
                    "services": rows,
                    "deadLetters": dead,
                }
            )
        )
    else:
        print(
            f"local cloud pid {state['pid']}, home {state['home']}, Pub/Sub: {state['pubsubKind']}"
        )
        for row in rows:
            print(f"  {row['service']:<11} {'up  ' if row['up'] else 'DOWN'} {row['url']}")
        where = f" (kept in {config.dead_letter_path})" if dead else ""
        print(f"  dead letters: {dead} event(s) delivery gave up on{where}")
    return 0 if all(r["up"] for r in rows) else 1


def cmd_tick(config: StackConfig, which: str) -> int:
    from localcloud.delivery import Deliverer
    from localcloud.scheduler import Schedule, fire

    state = _state(config)
    urls, env = state["urls"], state["env"]
    project = env["DICOMFLOW_ALERTS_TOPIC"].split("/")[1]
    if which == "minute":
        schedule = Schedule(
            "minute",
            f"projects/{project}/topics/dicomflow-tick",
            0,
            (("ingest", urls["ingest"]), ("report", urls["report"])),
        )
    else:
        schedule = Schedule(
            "export",
            f"projects/{project}/topics/dicomflow-export",
            0,
            (("export", urls["export"]),),
        )
    deliverer = Deliverer(workers=2, max_age=60)
    try:
        fire(deliverer, schedule)
        ok = deliverer.wait_idle(600)
    finally:
        deliverer.stop()
    print(
        f"{which} tick delivered to {len(schedule.targets)} function(s)"
        if ok
        else "tick not delivered"
    )
    return 0 if ok and not deliverer.dead else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcloud", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local cloud (foreground unless --detach)")
    up.add_argument("--detach", action="store_true", help="return once everything is ready")
    sub.add_parser("down", help="stop a detached local cloud")
    status = sub.add_parser("status", help="show what runs where")
    status.add_argument("--json", action="store_true")
    env = sub.add_parser("env", help="print `export NAME=value` lines for the running cloud")
    env.add_argument("--gcloud", action="store_true", help="also point gcloud at the local cloud")
    tick = sub.add_parser("tick", help="fire a scheduler tick by hand")
    tick.add_argument("which", choices=("minute", "export"))
    demo = sub.add_parser("demo", help="run the demo pipeline on sample data")
    demo.add_argument("--keep", action="store_true", help="leave the local cloud running after")
    demo.add_argument("--json", metavar="FILE", help="also write the summary to FILE as JSON")
    args = parser.parse_args(argv)
    try:
        config = StackConfig.from_env()
        if args.command == "up":
            return cmd_up(config, args.detach)
        if args.command == "down":
            return cmd_down(config)
        if args.command == "env":
            return cmd_env(config, args.gcloud)
        if args.command == "status":
            return cmd_status(config, args.json)
        if args.command == "tick":
            return cmd_tick(config, args.which)
        from pathlib import Path

        from localcloud.demo import run_demo

        return run_demo(keep=args.keep, json_path=Path(args.json) if args.json else None)
    except LocalCloudError as exc:
        print(f"localcloud: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
