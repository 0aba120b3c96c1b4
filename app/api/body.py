"""Reading a JSON request body within the size limit, before anything parses it.

The limit (`max_body_bytes`) is checked against Content-Length when the client sends one and
again while the body streams in, so a chunked or lying client cannot make the server hold more.
"""

from typing import Annotated

from fastapi import Depends, Request

from app.api.deps import SettingsDep
from app.errors import PayloadTooLarge, UnsupportedMediaType


async def read_json_body(request: Request, settings: SettingsDep) -> bytes:
    limit_bytes = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLarge(
            f"body: {int(declared)} bytes is over the limit of {limit_bytes} bytes"
        )
    _check_content_type(request.headers.get("content-type"))

    chunks: list[bytes] = []
    received_bytes = 0
    async for chunk in request.stream():
        received_bytes += len(chunk)
        if received_bytes > limit_bytes:
            raise PayloadTooLarge(f"body: over the limit of {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_content_type(header: str | None) -> None:
    media_type = (header or "").split(";", 1)[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    shown = media_type or "none"
    raise UnsupportedMediaType(f"content-type: {shown} is not supported; send application/json")


JsonBody = Annotated[bytes, Depends(read_json_body)]
