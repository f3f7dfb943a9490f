"""Client errors in OpenAI's error format (`{"error": {message, type, param, code}}`)."""

from __future__ import annotations

import re
from typing import Optional


from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class RequestError(Exception):
    """A request the server refuses: status 400 (unless told), a message naming the field (`param`); `kind` is
    OpenAI's `type` (default: invalid_request_error below 500, server_error from 500)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400,
                 kind: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def as_dict(self) -> dict:
        return {"message": self.message, "param": self.param, "code": self.code, "status": self.status,
                "kind": self.kind}

    @classmethod
    def from_dict(cls, values: dict) -> "RequestError":
        return cls(values["message"], values.get("param"), values.get("code"), values.get("status", 400),
                   values.get("kind"))


# `<_io.BytesIO object at 0x7f...>`, `<PIL.PngImagePlugin.PngImageFile ...>`, `<class 'X'>`: the server's insides
_REPR = re.compile(r"<[^<>]*(?: object at 0x[0-9a-fA-F]+|class '[^']*')[^<>]*>")


def public_text(message: str) -> str:
    """A message as a client may see it: no object or class reprs (they come from library exceptions), and
    lone surrogates escaped (a client's text echoed back must still encode as UTF-8 JSON)."""
    message = _REPR.sub("the input", message)
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, status: int, param: Optional[str] = None, code: Optional[str] = None,
               kind: Optional[str] = None) -> dict:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": public_text(message), "type": kind, "param": param, "code": code}}


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.status, error.param, error.code, error.kind),
                        status_code=error.status)


async def request_error_handler(request, error: RequestError):
    return error_response(error)


def field_path(loc) -> Optional[str]:
    """pydantic's error location as OpenAI names a field: ('body', 'messages', 0, 'content', 'str') ->
    'messages[0].content'. Union members in the location (a type such as 'str', 'list[...]' or a model class
    'TextContent') are left out: they are pydantic's, not the request's."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "body" and not path:
            continue
        elif "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "dict", "list", "none"):
            continue
        else:
            path += f".{part}" if path else part
    return path or None


async def validation_error_handler(request, error: RequestValidationError):
    """FastAPI's 422 for a body that does not fit the schema, as OpenAI's 400 naming the field. Of a union's
    several failures, the one deepest in the request is told (content[0].text missing, rather than content
    not being a string)."""
    problems = error.errors() or [{"loc": (), "msg": "invalid request body"}]
    if problems[0].get("type") == "json_invalid":
        detail = (problems[0].get("ctx") or {}).get("error", "")
        position = problems[0].get("loc", ("body", None))[-1]
        return error_response(RequestError(f"the request body is not valid JSON ({detail} at character {position})",
                                           None, "invalid_json"))
    paths = [field_path(problem.get("loc", ())) for problem in problems]
    depth = [len(re.findall(r"[.\[]", path or "")) + bool(path) for path in paths]
    param = paths[depth.index(max(depth))]
    reasons = list(dict.fromkeys(str(p.get("msg")) for p, path in zip(problems, paths) if path == param))
    reason = "; or ".join(reasons)
    message = f"{param}: {reason}" if param else f"invalid request body: {reason}"
    return error_response(RequestError(message, param, "invalid_value"))


async def http_error_handler(request, error: StarletteHTTPException):
    return JSONResponse(error_body(str(error.detail), error.status_code), status_code=error.status_code,
                        headers=getattr(error, "headers", None))
