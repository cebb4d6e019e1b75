"""GET /docs: the OpenAPI description as one self-contained HTML page.

FastAPI's Swagger UI and ReDoc pages load their JavaScript and CSS from a CDN, and no
installed package ships those assets; the service serves no network asset, so /docs is
rendered here from /openapi.json: every operation with its roles, parameters and body
schema, and links to the raw /openapi.json and /asyncapi.json. No script, no external asset.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

router = APIRouter(include_in_schema=False)

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.op{border:1px solid #ddd;border-radius:6px;margin:.8rem 0;padding:.6rem .8rem}
.m{display:inline-block;min-width:4.5rem;font-weight:bold;font-family:monospace}
.get{color:#1565c0}.post{color:#2e7d32}
code,pre{font-family:monospace;background:#f6f6f6}pre{padding:.5rem;overflow:auto;font-size:.85rem}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;font-size:.9rem}
"""


def _schema_ref(schema: dict[str, Any]) -> str:
    ref = schema.get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[-1]
        return f'<a href="#schema-{escape(name)}">{escape(name)}</a>'
    return f"<code>{escape(json.dumps(schema, separators=(',', ':')))}</code>"


def render_docs(spec: dict[str, Any]) -> str:
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{escape(spec['info']['title'])} API</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(spec['info']['title'])} HTTP API <small>{escape(spec['info']['version'])}</small></h1>",
        (
            "<p>Every endpoint except <code>/healthz</code>, <code>/readyz</code> and these docs needs "
            "<code>Authorization: Bearer &lt;token&gt;</code> (<code>decision-router tokens create</code>). "
            'Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI) and '
            '<a href="/asyncapi.json">/asyncapi.json</a> (the stream contracts, AsyncAPI).</p>'
        ),
    ]
    for path, operations in spec.get("paths", {}).items():
        for method, op in operations.items():
            parts.append(f'<div class=op><span class="m {method}">{method.upper()}</span> <code>{escape(path)}</code>')
            parts.append(f"<p>{escape(op.get('summary', ''))}</p>")
            params = op.get("parameters", [])
            if params:
                parts.append(
                    "<table><tr><th>parameter</th><th>in</th><th>required</th><th>schema</th><th>description</th></tr>"
                )
                for p in params:
                    parts.append(
                        f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p['in'])}</td>"
                        f"<td>{'yes' if p.get('required') else 'no'}</td><td>{_schema_ref(p.get('schema', {}))}</td>"
                        f"<td>{escape(p.get('description', ''))}</td></tr>"
                    )
                parts.append("</table>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                parts.append(f"<p>JSON body: {_schema_ref(body.get('schema', {}))}</p>")
            parts.append("</div>")
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        parts.append("<h2>Schemas</h2>")
        for name, schema in schemas.items():
            parts.append(f'<h3 id="schema-{escape(name)}">{escape(name)}</h3>')
            parts.append(f"<pre>{escape(json.dumps(schema, indent=2))}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


@router.get("/docs", response_class=HTMLResponse)
async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(render_docs(request.app.openapi()))


@router.get("/asyncapi.json")
async def asyncapi(request: Request) -> JSONResponse:
    from decision_router.asyncapi import asyncapi_document

    return JSONResponse(asyncapi_document())
