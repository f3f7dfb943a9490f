"""Client errors in OpenAI's error format (`{"error": {message, type, param, code}}`)."""

from __future__ import annotations

from typing import Optional


from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class RequestError(Exception):
    """A request the server refuses: status 400 (unless told), a message naming the field (`param`)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def as_dict(self) -> dict:
        return {"message": self.message, "param": self.param, "code": self.code, "status": self.status}

    @classmethod
    def from_dict(cls, values: dict) -> "RequestError":
        return cls(values["message"], values.get("param"), values.get("code"), values.get("status", 400))


def error_body(message: str, status: int, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.status, error.param, error.code), status_code=error.status)


async def request_error_handler(request, error: RequestError):
    return error_response(error)


async def validation_error_handler(request, error: RequestValidationError):
    """FastAPI's 422 for a body that does not fit the schema, as OpenAI's 400 naming the field."""
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request body"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else f"invalid request body: {first.get('msg')}"
    return error_response(RequestError(message, param, "invalid_value"))


async def http_error_handler(request, error: StarletteHTTPException):
    return JSONResponse(error_body(str(error.detail), error.status_code), status_code=error.status_code,
                        headers=getattr(error, "headers", None))
