"""`POST /v1/events`: validate a batch and store it in the slot buffers in one round trip."""

import time

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.datastructures import State

from app.api.body import read_json_body
from app.api.deps import WriteAuth
from app.errors import Unavailable
from app.ingestion.validation import parse_events_body
from app.ingestion.writer import EventWriter

router = APIRouter(tags=["events"], dependencies=[WriteAuth])


class EventIn(BaseModel):
    """One event as a client sends it (documentation of the body; validation is by hand)."""

    user_id: str | int
    item_id: str | int
    timestamp: float | str | None = None
    value: float = 1.0
    type: str | None = None
    event_id: str | int | None = None


class EventsIn(BaseModel):
    events: list[EventIn]


class EventsAccepted(BaseModel):
    accepted: int
    duplicates: int
    late: int


class ErrorOut(BaseModel):
    detail: str
    code: str


_ERRORS_DOC: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in [
        (401, "write keys are configured and no X-API-Key was sent"),
        (403, "the X-API-Key is not a write or admin key"),
        (413, "the body is over max_body_bytes"),
        (415, "the body is not application/json"),
        (422, "a field is invalid; the detail names it, as events[3].user_id: ..."),
        (503, "Redis is unavailable"),
    ]
}
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": EventsIn.model_json_schema()}},
    }
}


@router.post(
    "/events",
    status_code=202,
    response_model=EventsAccepted,
    responses=_ERRORS_DOC,
    openapi_extra=_BODY_DOC,
)
async def post_events(request: Request) -> Response:
    """Store 1 to `max_events_per_request` events. A repeated `event_id` counts as a duplicate
    and is stored once; an event for an already closed slot is stored late, never dropped."""
    # the shared resources come straight from app.state: on this hot path each further FastAPI
    # dependency costs a measurable share of a single-event request
    state = request.app.state
    settings = state.settings
    body = await read_json_body(request, settings)
    now_s = time.time()
    events = parse_events_body(body, settings, now_s)
    try:
        result = await _event_writer(state).write(events, now_s)
    except RedisError as exc:
        raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    state.metrics.count_ingested(result.accepted, result.duplicates, result.late)
    # the answer is written directly: serializing through the response model costs more
    answer = {"accepted": result.accepted, "duplicates": result.duplicates, "late": result.late}
    return Response(orjson.dumps(answer), status_code=202, media_type="application/json")


def _event_writer(state: State) -> EventWriter:
    """The app's writer, made on first use for the Redis client the app holds now."""
    writer: EventWriter | None = getattr(state, "event_writer", None)
    if writer is None or writer.redis is not state.redis:
        writer = state.event_writer = EventWriter(state.redis, state.keys, state.settings)
    return writer
