"""Validates our responses against OpenAI's official OpenAPI document (shared/reference), so
that a client written for OpenAI reads ours unchanged."""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.support import REPO

SPEC_PATH = REPO.parent / "shared" / "reference" / "openai-openapi.yaml"
_BASE = "urn:openai-openapi"


@functools.cache
def _registry() -> Registry[Any]:
    with SPEC_PATH.open() as f:
        document = yaml.load(f, Loader=yaml.CSafeLoader)
    resource = Resource.from_contents(_nullable(document), default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(_BASE, resource)
    return registry


def _nullable(node: Any) -> Any:
    """The document mixes in OpenAPI 3.0's `nullable: true`; say it in JSON Schema terms."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable(value) for key, value in node.items()}
    if out.pop("nullable", False) is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


@functools.cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"{_BASE}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def validate(schema_name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError unless `instance` matches the named schema."""
    errors = sorted(_validator(schema_name).iter_errors(instance), key=lambda e: e.path)
    if errors:
        raise errors[0]
