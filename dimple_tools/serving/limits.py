"""What an exposed endpoint needs before a request reaches the worker: an API key and a bound on the body.

`dimple-serve --api-key KEY` (or the `DIMPLE_API_KEY` environment variable) makes every route but `/health` ask for
`Authorization: Bearer KEY`, as OpenAI clients send it (`openai.OpenAI(api_key=KEY)`): `/v1/*`, `/metrics`, `/docs`
and `/openapi.json` alike. `--max-body-bytes` refuses a body whose `Content-Length` is larger (413) before it is
read. Both answer in OpenAI's error format, naming the limit.
"""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi.responses import JSONResponse

from dimple_tools.serving.errors import error_body

#: Routes a load balancer polls without credentials.
OPEN_ROUTES = ("/health",)
#: Default bound of a request body: a few large images as base64 fit, a 50 MB text does not.
MAX_BODY_BYTES = 16 * 2**20


def add_limits(app, api_key: Optional[str], max_body_bytes: int) -> None:
    """Install the API-key check and the body bound on LitServe's FastAPI `app`."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def limits(request, call_next):
        if expected is not None and request.url.path not in OPEN_ROUTES:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse(
                    error_body("a valid API key is required: send `Authorization: Bearer <key>` (the openai client's "
                               "api_key)", 401, None, "invalid_api_key"), status_code=401,
                    headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return JSONResponse(
                error_body(f"the request body is larger than this server's limit of {max_body_bytes} bytes "
                           "(--max-body-bytes)", 413, None, "body_too_large"), status_code=413)
        return await call_next(request)
