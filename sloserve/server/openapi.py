"""The OpenAPI document at /openapi.json, with the request bodies the routes parse themselves."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


def install_openapi(app: FastAPI, bodies: dict[str, type[BaseModel]], narrowed: dict[str, dict]) -> None:
    """Routes read raw bytes (so every parse failure is a clean 400); their body schemas are added here.

    `narrowed` (field -> JSON Schema keywords, in any body or nested schema) states this server's
    own limits (its model names, the max_tokens cap, the template's roles), so a client, or a
    fuzzer, sees what a valid request is.
    """

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in bodies.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
                }
            for component in components.values():
                for name, keywords in narrowed.items():
                    if name in component.get("properties", {}):
                        _narrow(component["properties"][name], keywords)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _narrow(prop: dict, keywords: dict) -> None:
    """Apply `keywords` to the field's non-null alternative (pydantic writes `X | None` as anyOf)."""
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    for branch in branches:
        if "enum" in keywords:
            branch.pop("type", None)
        branch.update(keywords)
