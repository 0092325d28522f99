"""A schema-only Terraform provider: serves one provider schema (JSON, see schema.py) over the
plugin protocol (v6), through the go-plugin handshake of the PyPI package ``tf``.

Terraform runs it as the provider binary from a filesystem mirror. It answers what ``terraform
init`` and ``terraform validate`` ask (metadata, schema, config validation) and refuses the rest,
so a plan or apply against it fails instead of pretending.

Usage: ``python serve.py compile SCHEMA.json SCHEMA.pb`` once (building the message for a thousand
resources takes seconds), then ``python serve.py SCHEMA.pb`` as the provider executable.
This file runs in its own virtualenv (``tf`` needs protobuf < 6); it imports only ``tf``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import tf.provider
from tf.gen import tfplugin_pb2 as pb
from tf.runner import run_provider

_NESTING = {
    "single": pb.Schema.NestedBlock.SINGLE,
    "list": pb.Schema.NestedBlock.LIST,
    "set": pb.Schema.NestedBlock.SET,
    "map": pb.Schema.NestedBlock.MAP,
}


def _block(spec: dict[str, Any]) -> Any:
    attributes = [
        pb.Schema.Attribute(
            name=name,
            type=json.dumps(attr["type"]).encode(),
            required=attr.get("required", False),
            optional=attr.get("optional", False),
            computed=attr.get("computed", False),
        )
        for name, attr in sorted(spec.get("attributes", {}).items())
    ]
    blocks = [
        pb.Schema.NestedBlock(
            type_name=name,
            block=_block(nested["block"]),
            nesting=_NESTING[nested["nesting_mode"]],
            min_items=nested.get("min_items", 0),
            max_items=nested.get("max_items", 0),
        )
        for name, nested in sorted(spec.get("block_types", {}).items())
    ]
    return pb.Schema.Block(attributes=attributes, block_types=blocks)


def _schema(spec: dict[str, Any] | None) -> Any:
    return pb.Schema(block=_block((spec or {}).get("block", {})))


def compile_schema(schema: dict[str, Any]) -> bytes:
    """The GetProviderSchema answer for a schema in `terraform providers schema -json` shape."""
    answer: bytes = pb.GetProviderSchema.Response(
        provider=_schema(schema.get("provider")),
        provider_meta=_schema(None),
        resource_schemas={k: _schema(v) for k, v in schema["resource_schemas"].items()},
        data_source_schemas={k: _schema(v) for k, v in schema["data_source_schemas"].items()},
    ).SerializeToString()
    return answer


class SchemaServicer(tf.provider.ProviderServicer):  # type: ignore[misc]
    """Answers from the compiled schema; validation beyond the schema is Terraform's own."""

    schema: Any = None

    def GetMetadata(self, request: Any, context: Any) -> Any:
        return pb.GetMetadata.Response(
            server_capabilities=pb.ServerCapabilities(),
            resources=[
                pb.GetMetadata.ResourceMetadata(type_name=k) for k in self.schema.resource_schemas
            ],
            data_sources=[
                pb.GetMetadata.DataSourceMetadata(type_name=k)
                for k in self.schema.data_source_schemas
            ],
        )

    def GetProviderSchema(self, request: Any, context: Any) -> Any:
        return self.schema

    def ValidateProviderConfig(self, request: Any, context: Any) -> Any:
        return pb.ValidateProviderConfig.Response()

    def ValidateResourceConfig(self, request: Any, context: Any) -> Any:
        return pb.ValidateResourceConfig.Response()

    def ValidateDataResourceConfig(self, request: Any, context: Any) -> Any:
        return pb.ValidateDataResourceConfig.Response()

    def GetFunctions(self, request: Any, context: Any) -> Any:
        return pb.GetFunctions.Response()

    def _refuse(self, request: Any, context: Any) -> Any:
        import grpc

        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "schema-only provider (tests/tfvalidate): it validates, it cannot plan or apply",
        )

    ConfigureProvider = _refuse
    ReadResource = _refuse
    PlanResourceChange = _refuse
    ApplyResourceChange = _refuse
    ImportResourceState = _refuse
    ReadDataSource = _refuse


class _Named:
    def __init__(self, full_name: str) -> None:
        self._full_name = full_name

    def full_name(self) -> str:
        return self._full_name


def main(argv: list[str]) -> None:
    if argv[1] == "compile":
        with open(argv[2]) as f:
            compiled = compile_schema(json.load(f))
        with open(argv[3], "wb") as out:
            out.write(compiled)
        return
    with open(argv[1], "rb") as f:
        SchemaServicer.schema = pb.GetProviderSchema.Response.FromString(f.read())
    tf.provider.ProviderServicer = SchemaServicer
    run_provider(_Named(argv[2]), argv[:1])


if __name__ == "__main__":
    main(sys.argv)
