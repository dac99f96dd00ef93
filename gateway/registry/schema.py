"""The JSON Schema of `models.yaml`, generated from the models that validate it.

Editors read it (through the `yaml-language-server` comment atop `models.yaml`) to
complete keys, show each one's description and default, and flag mistakes as they are
typed. It says what one key alone may hold; what spans keys (`default_model` names a
model, `max_memory` names each GPU of `devices`, `generation.max_new_tokens` within
`limits.max_new_tokens`) only `llm-gateway check` knows.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from gateway.registry.config import Registry

DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _RegistrySchema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: core_schema.CoreSchema) -> bool:
        # Titles made from key names ("Idle Unload S") say less than the key itself.
        return False


def registry_schema() -> dict[str, Any]:
    schema = Registry.model_json_schema(schema_generator=_RegistrySchema)
    return {"$schema": DIALECT, **schema}


def render() -> str:
    """The schema as `docs/models.schema.json` holds it."""
    return json.dumps(registry_schema(), indent=2, ensure_ascii=False) + "\n"
