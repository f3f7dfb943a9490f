"""What an exposed endpoint needs before a request reaches the worker: an API key and a bound on the body.

`dimple-serve --api-key KEY` (or the `DIMPLE_API_KEY` environment variable) makes every route but `/health` ask for
`Authorization: Bearer KEY`, as OpenAI clients send it (`openai.OpenAI(api_key=KEY)`): `/v1/*`, `/metrics`, `/docs`
and `/openapi.json` alike. `--max-body-bytes` refuses a body whose `Content-Length` is larger (413) before it is
read. `--max-pending-requests` bounds the chat completions one HTTP server holds at once (decoding or waiting
for the worker): one more is refused at once with 429 and `Retry-After` (`--retry-after` seconds), instead of
queueing until it times out. All answer in OpenAI's error format, naming the limit.
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
#: Default bound of the chat completions held at once (decoding or waiting), and the Retry-After of a 429.
MAX_PENDING_REQUESTS = 256
RETRY_AFTER_SECONDS = 1
#: The routes that queue work for the worker.
QUEUED_ROUTES = ("/v1/chat/completions",)


def add_limits(app, api_key: Optional[str], max_body_bytes: int, max_pending: int = MAX_PENDING_REQUESTS,
               retry_after: int = RETRY_AFTER_SECONDS) -> None:
    """Install the API-key check, the body bound and the bound on pending requests on LitServe's FastAPI `app`."""
    expected = f"Bearer {api_key}".encode() if api_key else None
    pending = [0]  # this HTTP server's chat completions from admission to the end of their response

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
        if request.url.path not in QUEUED_ROUTES or request.method != "POST":
            return await call_next(request)
        if pending[0] >= max_pending:
            return JSONResponse(
                error_body(f"the server holds its limit of {max_pending} pending requests (--max-pending-requests): "
                           f"retry after {retry_after} s", 429, None, "too_many_pending_requests"),
                status_code=429, headers={"Retry-After": str(retry_after)})
        pending[0] += 1
        try:
            response = await call_next(request)
        except BaseException:
            pending[0] -= 1
            raise
        body = response.body_iterator

        async def counted():  # a streamed answer is pending until its last chunk is sent
            try:
                async for chunk in body:
                    yield chunk
            finally:
                pending[0] -= 1

        response.body_iterator = counted()
        return response
