"""The JSON Schema of the configuration file, derived from the models: `mcpbalancer schema` prints
it and config/schema.json is a copy (a test keeps the two equal). Editors that know JSON Schema
(the YAML language server: `# yaml-language-server: $schema=...`) complete and check a file with it.
"""

from __future__ import annotations

import json
from typing import Any, Final

from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import CoreSchema

from mcpbalancer.config.loading import FILE

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


class _Generator(GenerateJsonSchema):
    """pydantic's generator without a title per key ("Store Prefix" for store_prefix): the key is
    its own name, the description says the rest."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


def json_schema() -> dict[str, Any]:
    schema = FILE.json_schema(schema_generator=_Generator)
    return {"$schema": DIALECT, **schema, "title": "mcpbalancer configuration"}


def schema_text() -> str:
    """The schema as committed: two-space indents, keys in the models' order, a final newline."""
    return json.dumps(json_schema(), indent=2) + "\n"
