"""Terraform provider schemas, read from the jsii bundle of a prebuilt CDK for Terraform provider.

The PyPI packages ``cdktf-cdktf-provider-google``, ``cdktn-provider-google`` and
``cdktf-cdktf-provider-archive`` ship their generated JavaScript in a jsii tarball. That code was
generated from the provider's ``terraform providers schema -json``, and keeps what ``terraform
validate`` needs of it: for each resource, data source and the provider itself, the argument names,
whether each is a block (and nested how), its type, whether it is required, and the computed
attributes a reference may read. ``extract`` turns it back into that JSON shape.

What the bundle does not keep, and so this schema does not check: an attribute of object type that
is not a block is typed ``dynamic`` (``string`` inside set-nested blocks, where Terraform allows no
dynamic type), and so is a computed nested object; ``optional`` and ``computed`` are not told apart
for arguments; descriptions are dropped.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any

Block = dict[str, Any]

_PRIMITIVE = {"string": "string", "number": "number", "boolean": "bool"}
_ENTRY = re.compile(
    r"(\w+): \{\s*value: (.*?),\s*isBlock: (true|false),\s*type: \"(\w+)\",\s*"
    r"storageClassType: \"(\w+)\",\s*\}",
    re.S,
)
_SEGMENT = re.compile(r"^(?:class (\w+) |function (\w+)\()", re.M)
_STRUCT_FN = re.compile(r"(?<![.\w])([a-z]\w*)ToHclTerraform\b")
_PROP = re.compile(r"(?:this\._|struct\.)(\w+)")
_FLAGS = re.compile(
    r"// (\w+) - computed: (true|false), optional: (true|false), required: (true|false)\n"
    r"\s*(.*)\n\s*(.*)\n"
)
_TYPE_NAME = re.compile(r"^(\w+)\.tfResourceType = \"(\w+)\";", re.M)
_GETTER_TYPES = {
    "getStringAttribute": "string",
    "getNumberAttribute": "number",
    "getBooleanAttribute": "bool",
    "getListAttribute": ["list", "string"],
    "getNumberListAttribute": ["list", "number"],
    "getStringMapAttribute": ["map", "string"],
    "getNumberMapAttribute": ["map", "number"],
    "getBooleanMapAttribute": ["map", "bool"],
    "StringMap(": ["map", "string"],
    "NumberMap(": ["map", "number"],
    "BooleanMap(": ["map", "bool"],
}


def _segments(js: str) -> dict[str, str]:
    """Top-level classes and functions of one generated module, by name."""
    js = js.split("\n//# sourceMappingURL=", 1)[0]
    marks = list(_SEGMENT.finditer(js))
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(js)
        out[m.group(1) or m.group(2)] = js[m.start() : end]
    return out


def _computed(segment: str) -> dict[str, Any]:
    """Computed-only attributes (the ones a reference may read but config may not set)."""
    found: dict[str, Any] = {}
    for name, computed, optional, required, line1, line2 in _FLAGS.findall(segment):
        if computed != "true" or optional == "true" or required == "true":
            continue
        text = line1 + line2
        kind: Any = "dynamic"
        for marker, cty in _GETTER_TYPES.items():
            if marker in text:
                kind = cty
                break
        found[name] = {"type": kind, "computed": True}
    return found


def _block_flags(segment: str) -> dict[str, bool]:
    """Blocks: name -> required, from the generator's flag comments."""
    return {
        name: required == "true"
        for name, _computed, _optional, required, _l1, _l2 in _FLAGS.findall(segment)
    }


def _block(entries: str, owner: str, segments: dict[str, str], in_set: bool = False) -> Block:
    """One schema block from an `attrs = {...}` literal; `owner` is the class holding resets.

    Terraform rejects dynamic attributes inside set-nested blocks; there they become strings."""
    attributes: dict[str, Any] = {}
    blocks: dict[str, Any] = {}
    flags = _block_flags(owner)
    entries = entries[: entries.find("};") + 1]
    for name, value, is_block, kind, storage in _ENTRY.findall(entries):
        fns = _STRUCT_FN.findall(value)
        if is_block == "true":
            inner = in_set or kind == "set"
            nested = (
                _struct(fns[0], segments, inner) if fns else {"attributes": {}, "block_types": {}}
            )
            spec: dict[str, Any] = {"block": nested}
            if kind == "struct":
                spec["nesting_mode"] = "single"
            else:
                spec["nesting_mode"] = "set" if kind == "set" else "list"
                if "listMapperHcl" not in value:
                    spec["max_items"] = 1
                if flags.get(name):
                    spec["min_items"] = 1
            blocks[name] = spec
            continue
        if kind == "simple":
            cty: Any = _PRIMITIVE.get(storage, "dynamic")
        elif (
            storage.endswith(("List", "Map"))
            and storage[: -4 if storage.endswith("List") else -3] in _PRIMITIVE
        ):
            base = storage[:-4] if storage.endswith("List") else storage[:-3]
            cty = [kind if kind in ("list", "set", "map") else "list", _PRIMITIVE[base]]
        else:
            cty = "dynamic"
        prop = _PROP.search(value)
        reset = "reset" + (prop.group(1)[:1].upper() + prop.group(1)[1:]) if prop else ""
        optional = not prop or f"{reset}()" in owner
        attributes[name] = (
            {"type": cty, "optional": True} if optional else {"type": cty, "required": True}
        )
    for name, spec in _computed(owner).items():
        if name not in attributes and name not in blocks:
            attributes[name] = spec
    if in_set:
        for spec in attributes.values():
            if spec["type"] == "dynamic":
                spec["type"] = "string"
    return {"attributes": attributes, "block_types": blocks}


def _struct(fn: str, segments: dict[str, str], in_set: bool) -> Block:
    body = segments.get(f"{fn}ToHclTerraform", "")
    owner = segments.get(fn[:1].upper() + fn[1:] + "OutputReference", "")
    start = body.find("const attrs = {")
    return _block(body[start:] if start >= 0 else "", owner, segments, in_set)


def _module(js: str) -> tuple[str, str, Block] | None:
    """(kind, type name, schema) of one generated module, or None for index files."""
    named = _TYPE_NAME.search(js)
    if not named:
        return None
    cls, type_name = named.groups()
    segments = _segments(js)
    owner = segments.get(cls, "")
    start = owner.find("synthesizeHclAttributes()")
    start = owner.find("const attrs = {", start)
    block = _block(owner[start:], owner, segments)
    if "extends cdktf.TerraformProvider" in owner or "extends cdktn.TerraformProvider" in owner:
        block["attributes"].pop("alias", None)
        return "provider", type_name, block
    if "TerraformDataSource" in owner.split("\n", 1)[0]:
        return "data", type_name, block
    return "resource", type_name, block


def extract(wheel: Path) -> dict[str, Any]:
    """The provider schema held by one prebuilt-provider wheel, and the provider's name/version."""
    with zipfile.ZipFile(wheel) as zf:
        bundle = next(n for n in zf.namelist() if n.endswith(".jsii.tgz"))
        data = zf.read(bundle)
    schema: dict[str, Any] = {"resource_schemas": {}, "data_source_schemas": {}}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            if member.name == "package/package.json":
                meta = json.load(tar.extractfile(member))  # type: ignore[arg-type]
                provider = (meta.get("cdktn") or meta["cdktf"])["provider"]
                schema["source"] = provider["name"]
                schema["version"] = provider["version"]
            elif member.name.startswith("package/lib/") and member.name.endswith("/index.js"):
                found = _module(tar.extractfile(member).read().decode())  # type: ignore[union-attr]
                if found is None:
                    continue
                kind, type_name, block = found
                if kind == "provider":
                    schema["provider"] = {"block": block}
                else:
                    key = "resource_schemas" if kind == "resource" else "data_source_schemas"
                    schema[key][type_name] = {"block": block}
    return schema
