"""Named domain errors and the one place that maps them to HTTP answers.

Every error body has the shape `{"detail": ..., "code": ...}` and names the field or id at fault.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class MetarecError(Exception):
    """Base of the errors the domain code raises; `status` and `code` say how HTTP shows it."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(MetarecError):
    status = 422
    code = "invalid_input"


class PayloadTooLarge(MetarecError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(MetarecError):
    status = 415
    code = "unsupported_media_type"


class NotFound(MetarecError):
    status = 404
    code = "not_found"


class Unauthorized(MetarecError):
    status = 401
    code = "unauthorized"


class Forbidden(MetarecError):
    status = 403
    code = "forbidden"


class Conflict(MetarecError):
    status = 409
    code = "conflict"


class Unavailable(MetarecError):
    status = 503
    code = "unavailable"


def error_body(detail: object, code: str) -> dict[str, object]:
    return {"detail": detail, "code": code}


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{location or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MetarecError)
    async def _domain(_: Request, exc: MetarecError) -> JSONResponse:
        return JSONResponse(error_body(exc.detail, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(_validation_detail(exc), "invalid_input"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(exc.detail, code), status_code=exc.status_code, headers=exc.headers
        )
