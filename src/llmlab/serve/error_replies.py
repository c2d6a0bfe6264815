"""Errors as OpenAI's error body: bad input is always a clear 4xx naming the field, never a 5xx."""

from __future__ import annotations

import logging
import re

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.errors import LLMLabError
from llmlab.serve.schemas import ErrorBody

log = logging.getLogger("llmlab.serve")


# the error statuses routes document in the OpenAPI schema
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 408, 413, 429)}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# pydantic names the member of a union it tried ("str", "list[int]", "TextPart"): not part of the field's path
UNION_MEMBER = re.compile(r"^(str|int|float|bool|none)$|\[|^[A-Z]")


def _rank(error: dict) -> int:
    """Which of several validation errors to report: the one a client can act on most directly."""
    kind = error.get("type", "")
    order = ["json_invalid", "extra_forbidden", "missing"]
    if kind in order:
        return order.index(kind)
    return 4 if kind.endswith("_type") else 3  # "too long" says more than "not a string" for a str | list


def validation_error(errors: list[dict], unsupported: dict[str, str]) -> JSONResponse:
    first = min(errors, key=_rank)
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return error_response(400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not UNION_MEMBER.search(str(part))]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        reason = unsupported.get(loc[-1], "this server does not implement it") if loc else "unknown field"
        return error_response(400, f"unsupported field '{param}': {reason}", param=param,
                              code="unsupported_parameter")
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first.get("type") == "missing" and param:
        message = f"'{param}' is required"
    return error_response(400, message, param=param, code="invalid_value")


def install_error_handlers(app, unsupported: dict[str, str]):
    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(LLMLabError)
    async def on_llmlab_error(request, e: LLMLabError):
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        return validation_error(e.errors(), unsupported)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def on_bug(request, e: Exception):
        log.exception("internal error")
        return error_response(500, "internal server error", "server_error")
