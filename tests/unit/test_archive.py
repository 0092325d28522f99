"""What the function archive ships, as Terraform computes it, and what requirements.txt installs
with it.

infra/functions.tf zips main.py, requirements.txt and the files of dicomflow/ that the module
infra/modules/source_files lists. These tests run that module with the real ``terraform`` binary
(it has no provider, so ``init`` and ``apply`` work offline) and check the list: no operator tool,
and nothing the three functions import left out (a copy of exactly those files imports them, cut
off from the repository). Then the third-party imports of the shipped code against the pins of
requirements.txt, both ways.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import metadata
from pathlib import Path, PurePosixPath

import hcl2
import pytest

from tests.unit.test_infra import _blocks, _clean
from tests.unit.test_layout import import_nodes, imported_names, module_name

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MODULE = INFRA / "modules" / "source_files"
REQUIREMENTS = ROOT / "requirements.txt"
OPS_REQUIREMENTS = ROOT / "requirements-ops.txt"

# Modules of the operator tools, wherever they would sit; and the CLI entry.
OPERATOR_MODULES = {"cli", "cli_restore", "status", "status_page", "tables", "__main__"}
# Pinned in requirements.txt though the functions do not import them: each is a dependency of a
# distribution they import, and is deployed anyway; the pin fixes its version (requirements.txt
# says why, naming it).
DELIBERATE = {"httplib2", "google-auth-httplib2"}

pytestmark = pytest.mark.skipif(
    shutil.which("terraform") is None,
    reason="terraform is not installed: the archive's file list is computed by terraform",
)


# --- Terraform's list ------------------------------------------------------------------------


def terraform_outputs(work: Path, modules: dict[str, Path]) -> dict[str, list[str]]:
    """`terraform apply` of a root in `work` that calls modules/source_files once per entry of
    `modules` (output name -> the `root` it is given); the outputs, as Terraform computed them."""
    source = os.path.relpath(MODULE, work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "main.tf").write_text(
        "".join(
            f'module "{name}" {{\n  source = "{source}"\n  root   = {json.dumps(str(root))}\n}}\n'
            f'output "{name}" {{\n  value = module.{name}.package_files\n}}\n'
            for name, root in modules.items()
        )
    )
    (work / "cli.tfrc").write_text("")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TF_")},
        "TF_CLI_CONFIG_FILE": str(work / "cli.tfrc"),
        "TF_IN_AUTOMATION": "1",
        "CHECKPOINT_DISABLE": "1",
    }
    for cmd in (["init", "-input=false"], ["apply", "-auto-approve", "-input=false"]):
        done = subprocess.run(
            ["terraform", *cmd, "-no-color"], cwd=work, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
    out = subprocess.run(
        ["terraform", "output", "-json", "-no-color"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {name: value["value"] for name, value in json.loads(out.stdout).items()}


def _synthetic(root: Path) -> Path:
    for name in (
        "main.py",
        "dicomflow/__init__.py",
        "dicomflow/__main__.py",
        "dicomflow/alert.schema.json",
        "dicomflow/clock.py",
        "dicomflow/sub/__main__.py",
        "dicomflow/__pycache__/clock.cpython-311.pyc",
        "dicomflow/ops/__init__.py",
        "dicomflow/ops/cli.py",
        "dicomflow/ops/deeper/tables.py",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The module's list for this repository ("real") and for a small synthetic one."""
    tmp = tmp_path_factory.mktemp("archive")
    return terraform_outputs(tmp / "tf", {"real": ROOT, "synthetic": _synthetic(tmp / "synthetic")})


@pytest.fixture(scope="module")
def archive(computed: dict[str, list[str]]) -> list[str]:
    """Repository-relative paths of every file the function archive holds."""
    return ["main.py", "requirements.txt", *(f"dicomflow/{f}" for f in computed["real"])]


def test_functions_tf_archives_exactly_the_module_list() -> None:
    """The archive is main.py, requirements.txt and dicomflow/<each file the module lists>:
    what the other tests here take it to be."""
    doc = _clean(hcl2.loads((INFRA / "functions.tf").read_text()))
    local = {k: v for block in doc["locals"] for k, v in block.items()}
    assert local["repo_root"] == "${path.module}/.."
    assert local["package_root"] == "${path.module}/../dicomflow"
    module = {k: v for block in doc["module"] for k, v in block.items()}["source_files"]
    assert (module["source"], module["root"]) == ("./modules/source_files", "${local.repo_root}")
    (archives,) = doc["data"]
    (body,) = archives["archive_file"].values()
    assert "source_dir" not in body
    static = [(s["filename"], s["content"]) for s in _blocks(body, "source")]
    assert static == [
        ("main.py", '${file("${local.repo_root}/main.py")}'),
        ("requirements.txt", '${file("${local.repo_root}/requirements.txt")}'),
    ]
    (dynamic,) = _blocks(body, "dynamic")
    assert dynamic["source"]["for_each"] == "${module.source_files.package_files}"
    (content,) = _blocks(dynamic["source"], "content")
    assert content == {
        "filename": "dicomflow/${source.value}",
        "content": '${file("${local.package_root}/${source.value}")}',
    }


def test_the_module_leaves_out_operator_tools_the_cli_entry_and_bytecode(
    computed: dict[str, list[str]],
) -> None:
    assert computed["synthetic"] == [
        "__init__.py",
        "alert.schema.json",
        "clock.py",
        "sub/__main__.py",
    ]


def operator_code(paths: Iterable[str]) -> list[str]:
    return [
        p
        for p in paths
        if p.startswith("dicomflow/ops/") or PurePosixPath(p).stem in OPERATOR_MODULES
    ]


def test_archive_holds_no_operator_code(archive: list[str]) -> None:
    assert (ROOT / "dicomflow/ops/cli.py").exists() and (ROOT / "dicomflow/__main__.py").exists()
    assert operator_code(archive) == []
    assert {"main.py", "dicomflow/functions.py", "dicomflow/runtime.py"} <= set(archive)
    assert operator_code(["dicomflow/ops/x.py", "dicomflow/status_page.py", "a/__main__.py"]) == [
        "dicomflow/ops/x.py",
        "dicomflow/status_page.py",
        "a/__main__.py",
    ]


# --- the archive alone runs the functions ----------------------------------------------------


def runtime_imports(files: dict[str, str]) -> list[tuple[str, str]]:
    """(statement, package it runs in) for every import the shipped modules make at run time,
    lazy ones included, as Python text."""
    found = set()
    for path, text in files.items():
        _, package = module_name(Path(path), Path("."))
        for node in import_nodes(ast.parse(text, path), runtime_only=True):
            if isinstance(node, ast.Call):
                (name,) = imported_names(node, package)
                found.add((f"importlib.import_module({name!r})", package))
            else:
                found.add((ast.unparse(node), package))
    return sorted(found)


def test_a_copy_of_the_archive_imports_the_functions(archive: list[str], tmp_path: Path) -> None:
    """A copy of exactly the archive's files, with site-packages but without the repository (and
    without the editable install's path hook): main, every shipped module and every import they
    make at run time (lazy ones too) import from the copy."""
    copy = tmp_path / "archive"
    for name in archive:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, copy / name)
    shipped = {p: (copy / p).read_text() for p in archive if p.endswith(".py")}
    modules = sorted(module_name(Path(p), Path("."))[0] for p in shipped)
    paths = [str(copy), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    script = (
        "import importlib, json, sys\n"
        f"sys.path[:0] = {paths!r}\n"
        f"for statement, package in {runtime_imports(shipped)!r}:\n"
        "    where = {'importlib': importlib, '__package__': package, '__name__': package + '._'}\n"
        "    exec(statement, where)\n"
        f"loaded = {{m: importlib.import_module(m).__file__ for m in {modules!r}}}\n"
        "print(json.dumps(loaded))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "K_SERVICE"}
    # -I: no PYTHON* variables, no user site, not the working directory; -S: no .pth files (the
    # editable install's hook would find a module the copy lacks in the repository).
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        cwd=copy, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert "main" in loaded and "dicomflow.functions" in loaded
    assert {m: f for m, f in loaded.items() if not f.startswith(str(copy) + os.sep)} == {}


def test_runtime_imports_read_lazy_and_named_imports_but_not_type_checking_ones() -> None:
    text = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from dicomflow.ops import cli\n"
        "def f():\n"
        "    from . import clock\n"
        "    return importlib.import_module('google.cloud.secretmanager')\n"
    )
    assert runtime_imports({"dicomflow/x.py": text}) == [
        ("from . import clock", "dicomflow"),
        ("from typing import TYPE_CHECKING", "dicomflow"),
        ("importlib.import_module('google.cloud.secretmanager')", "dicomflow"),
    ]


# --- requirements.txt ------------------------------------------------------------------------


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of each ``name==version`` line (a -r line is not followed)."""
    found = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if "==" in spec:
            name, version = spec.split("==", 1)
            found[normal(name)] = version.split(";")[0].strip()
    return found


@cache
def _top_level() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()


@cache
def _files(distribution: str) -> frozenset[str]:
    return frozenset(str(f) for f in metadata.files(distribution) or ())


def distributions(module: str) -> set[str]:
    """The installed distributions that provide `module` (a dotted name; a trailing attribute is
    fine). For a namespace package such as google, those holding the longest prefix of it."""
    parts = module.split(".")
    candidates = set(_top_level().get(parts[0], []))
    for n in range(len(parts), 1, -1):
        if len(candidates) <= 1:
            break
        path = "/".join(parts[:n])
        owners = {
            d
            for d in candidates
            if any(f == f"{path}.py" or f.startswith(f"{path}/") for f in _files(d))
        }
        if owners:
            return {normal(d) for d in owners}
    return {normal(d) for d in candidates}


def third_party(files: dict[str, str]) -> dict[str, set[str]]:
    """distribution -> the modules of `files` that import it; "?" for what nothing provides."""
    own = {module_name(Path(p), Path("."))[0].split(".")[0] for p in files}
    found: dict[str, set[str]] = {}
    for path, text in files.items():
        for node in import_nodes(ast.parse(text, path), runtime_only=True):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            for name in imported_names(node, ""):
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in own:
                    continue
                for dist in distributions(name) or {f"? {name}"}:
                    found.setdefault(dist, set()).add(path)
    return found


@pytest.fixture(scope="module")
def imported(archive: list[str]) -> dict[str, set[str]]:
    """The distributions the archive's modules import, with the modules that import each."""
    return third_party({p: (ROOT / p).read_text() for p in archive if p.endswith(".py")})


def test_requirements_pin_every_distribution_the_functions_import(
    imported: dict[str, set[str]],
) -> None:
    assert {"google-cloud-storage", "pydicom", "google-cloud-secret-manager"} <= set(imported)
    unpinned = {d: sorted(by) for d, by in imported.items() if d not in pins(REQUIREMENTS)}
    assert unpinned == {}


def test_requirements_pin_only_what_the_functions_import(imported: dict[str, set[str]]) -> None:
    assert sorted(set(pins(REQUIREMENTS)) - set(imported) - DELIBERATE) == []


def test_deliberate_pins_are_documented_dependencies_of_imported_ones(
    imported: dict[str, set[str]],
) -> None:
    pinned = pins(REQUIREMENTS)
    comments = " ".join(
        line.split("#", 1)[1] for line in REQUIREMENTS.read_text().splitlines() if "#" in line
    )
    for name in sorted(DELIBERATE):
        assert name in pinned, f"{name} is not pinned in requirements.txt"
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", comments), (
            f"requirements.txt does not say why it pins {name}"
        )
        needed_by = {
            d
            for d in imported
            for r in metadata.requires(d) or []
            if normal(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) == name and "extra ==" not in r
        }
        assert needed_by, f"{name} is not a dependency of what the functions import"


def test_operator_requirements_pin_what_the_operator_tools_import() -> None:
    """requirements-ops.txt (with requirements.txt, which it includes) covers dicomflow/ops and
    the CLI entry, and pins nothing the functions need: that belongs in requirements.txt."""
    ops = {
        str(p.relative_to(ROOT)): p.read_text()
        for p in [*ROOT.glob("dicomflow/ops/*.py"), ROOT / "dicomflow/__main__.py"]
    }
    assert "-r requirements.txt" in OPS_REQUIREMENTS.read_text().splitlines()
    pinned = pins(REQUIREMENTS) | pins(OPS_REQUIREMENTS)
    imported = third_party(ops)
    assert "rich" in imported
    assert {d: sorted(by) for d, by in imported.items() if d not in pinned} == {}
    assert sorted(set(pins(OPS_REQUIREMENTS)) - set(imported)) == []
    assert set(pins(OPS_REQUIREMENTS)) & set(pins(REQUIREMENTS)) == set()


def test_third_party_maps_namespace_packages_and_flags_the_unknown() -> None:
    found = third_party(
        {
            "dicomflow/x.py": (
                "import json\nfrom dicomflow import clock\nfrom google.cloud import storage\n"
                "from google.api_core import exceptions\nimport rich.table\nimport nosuchthing\n"
            )
        }
    )
    assert set(found) == {"google-cloud-storage", "google-api-core", "rich", "? nosuchthing"}
