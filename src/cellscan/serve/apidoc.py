"""The API document as plain data for the offline docs page (``/ui/api``): every route, its fields, an example.

BentoML's ``/docs`` loads Swagger UI from a CDN (blank offline) and its document lists only the
``@bentoml.api`` routes; the service merges it with the mounted operations app's routes and
:func:`operations` flattens the result for a server-rendered page.
"""

from __future__ import annotations

import json
from typing import Any

from cellscan.serve.guard import GuardPolicy

METHODS = ("get", "post", "put", "patch", "delete")
EXAMPLE_VALUES = {"string": "...", "integer": 1, "number": 0.5, "boolean": False, "array": [], "object": {}}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the paths and component schemas of ``extra`` that it lacks."""
    out = json.loads(json.dumps(base))
    paths = out.setdefault("paths", {})
    for path, item in (extra.get("paths") or {}).items():
        paths.setdefault(path, item)
    schemas = out.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in ((extra.get("components") or {}).get("schemas") or {}).items():
        schemas.setdefault(name, schema)
    return out


def _resolve(spec: dict[str, Any], schema: dict[str, Any] | None) -> dict[str, Any]:
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 10:
        node: Any = spec
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        schema, seen = node, seen + 1
    return schema or {}


def _type(schema: dict[str, Any]) -> str:
    if "type" in schema:
        t = schema["type"]
        if t == "array":
            item = schema.get("items") or {}
            return f"array of {item.get('format') == 'binary' and 'files' or item.get('type', 'values')}"
        return "file" if schema.get("format") == "binary" else str(t)
    options = schema.get("anyOf") or schema.get("oneOf") or []
    return " | ".join(_type(o) for o in options) or "any"


def _example(field: dict[str, Any]) -> Any:
    if "default" in field and field["default"] is not None:
        return field["default"]
    t = field.get("type") or next((o.get("type") for o in field.get("anyOf", []) if o.get("type") != "null"), "string")
    return EXAMPLE_VALUES.get(t, "...")


def operations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (path, method): summary, parameters, body fields, answers and a curl example."""
    out = []
    for path, item in sorted((spec.get("paths") or {}).items()):
        if not isinstance(item, dict):
            continue
        for method in METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            params = [{"name": p.get("name"), "in": p.get("in"), "type": _type(p.get("schema") or {}),
                       "required": bool(p.get("required")), "description": p.get("description", "")}
                      for p in op.get("parameters") or []]
            content = (op.get("requestBody") or {}).get("content") or {}
            fields, media = [], ""
            for media, body in content.items():
                schema = _resolve(spec, body.get("schema"))
                for name, f in (schema.get("properties") or {}).items():
                    f = _resolve(spec, f)
                    fields.append({"name": name, "type": _type(f), "description": f.get("description", ""),
                                   "example": _example(f), "required": name in (schema.get("required") or [])})
                break
            url = "http://127.0.0.1:3000" + path
            query = [p for p in params if p["in"] == "query" and p["required"]]
            if query:
                url += "?" + "&".join(f"{p['name']}=..." for p in query)
            curl = f"curl -X {method.upper()} '{url}'"
            if method != "get":  # double quotes: the shell puts the key in (single ones would send "$KEY")
                keyed = path in GuardPolicy.protected or "verdict" in path
                curl += ' -H "X-API-Key: $KEY"' if keyed else ""
                if path == "/edge/results":  # a raw JSON body (the rows cellscan-edge writes), no schema
                    media, fields = "application/json", []
                if "multipart" in media:
                    curl += "".join(f" -F '{f['name']}=@scan.png'" if "file" in f["type"] else "" for f in fields)
                    if not any("file" in f["type"] for f in fields):
                        curl += " -F 'image=@scan.png'"
                elif fields or media or path.endswith("/verdict"):
                    example = {f["name"]: f["example"] for f in fields if f["required"] or f["name"] in (
                        "image_url", "verdict", "version", "heatmap")}
                    if path.endswith("/verdict"):
                        example = {"verdict": "false_alarm"}
                    if path == "/edge/results":
                        example = {"host": "line-3", "records": [{"image": "scan.png", "anomaly_score": 2.1,
                                                                  "threshold": 1.5, "is_anomaly": True}]}
                    curl += f" -H 'Content-Type: application/json' -d '{json.dumps(example)}'"
            answers = sorted((str(k), (v or {}).get("description", "")) for k, v in (op.get("responses") or {}).items())
            out.append({"path": path, "method": method.upper(), "summary": op.get("summary") or "",
                        "description": op.get("description") or "", "params": params, "fields": fields,
                        "media": media, "answers": answers, "curl": curl,
                        "anchor": (method + path).replace("/", "-").replace("{", "").replace("}", "")})
    return out
