"""Read endpoints served from the model snapshot: a user's recommendations, an item's neighbours."""

from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel

from app.api.deps import KeysDep, ReadAuth, RedisDep, SettingsDep
from app.errors import InvalidInput, NotFound, Unavailable
from app.services.recommend import RecommendQuery, similar_items
from app.services.serving import ServingManager

router = APIRouter(tags=["recommendations"])


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendationsOut(BaseModel):
    user_id: str
    items: list[ScoredItem]
    model_version: int | None
    strategy: Literal["personalized", "cold_start", "popular"]
    recommendation_id: str


class SimilarItemsOut(BaseModel):
    item_id: str
    items: list[ScoredItem]
    model_version: int


async def _manager(request: Request) -> ServingManager:  # async: no worker-thread hop
    manager: ServingManager = request.app.state.serving
    return manager


ManagerDep = Annotated[ServingManager, Depends(_manager)]


def json_response(body: object) -> Response:
    """The body serialised once by orjson, skipping a second validation of a known shape."""
    return Response(orjson.dumps(body), media_type="application/json")


def split_ids(values: list[str]) -> tuple[str, ...]:
    """Item ids from a repeated query parameter whose values may also be comma-separated."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _check_id(name: str, value: str, max_chars: int) -> None:
    if not value or len(value) > max_chars:
        raise InvalidInput(f"{name}: must be 1 to {max_chars} characters, got {len(value)}")


@router.get(
    "/users/{user_id}/recommendations",
    dependencies=[ReadAuth],
    response_model=RecommendationsOut,
)
async def get_recommendations(
    user_id: str,
    manager: ManagerDep,
    client: RedisDep,
    settings: SettingsDep,
    k: Annotated[int, Query(ge=1, le=500, description="how many items")] = 20,
    exclude_seen: Annotated[bool, Query(description="leave out items the user saw")] = True,
    exclude: Annotated[
        list[str], Query(description="item ids to leave out: repeated or comma-separated")
    ] = [],  # noqa: B006 (FastAPI copies query defaults)
    category: Annotated[str | None, Query(description="only items of this category")] = None,
) -> Response:
    """The k best items for a user now, with the strategy that produced them."""
    _check_id("user_id", user_id, settings.max_id_chars)
    query = RecommendQuery(user_id, k, exclude_seen, split_ids(exclude), category or None)
    answer = await manager.recommender.recommend(client, manager.current, query)
    return json_response(answer.to_body())


@router.get("/items/{item_id}/similar", dependencies=[ReadAuth], response_model=SimilarItemsOut)
async def get_similar_items(
    item_id: str,
    manager: ManagerDep,
    client: RedisDep,
    keys: KeysDep,
    k: Annotated[int, Query(ge=1, le=500, description="how many items")] = 20,
) -> Response:
    """The items nearest to one item by cosine on the served model's item embeddings."""
    snapshot = manager.current
    if snapshot is None:
        raise Unavailable(f"item_id: no model version is served yet, so {item_id!r} has none")
    item_row = snapshot.item_rows.get(item_id)
    if item_row is None:
        raise NotFound(f"item_id: {item_id!r} is not in the served model (v{snapshot.version})")

    filters = manager.recommender.filters
    hidden = await filters.hidden_ids(client, keys, int(await client.get(keys.items_version) or 0))
    values, rows = similar_items(snapshot, item_row, k, filters.rows(snapshot, "hidden", hidden))

    items = [
        {"item_id": snapshot.item_ids[row], "score": score}
        for row, score in zip(rows.tolist(), values.tolist(), strict=True)
    ]
    return json_response({"item_id": item_id, "items": items, "model_version": snapshot.version})
