"""Recommendations, similar items and the model endpoints through the real app, real Redis and SQL.

Versions are published with `model_store.publish_version` exactly as the worker does; the app
notices them through pub/sub and the pointer, and the tests watch `GET /v1/models/current`.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa
import torch
from fastapi import FastAPI

from app.api.main import create_app
from app.errors import Conflict
from app.keys import RedisKeys
from app.services.model_store import publish_version, version_dir
from app.settings import Settings
from app.storage import repo
from app.storage.db import make_engine
from models.serving import ServingModel
from models.synthetic import toy_serving_model

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

ADMIN_KEY = "admin-secret"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Served:
    app: FastAPI
    http: httpx.AsyncClient
    settings: Settings
    keys: RedisKeys
    sync_redis: redis.Redis
    engine: sa.Engine
    version_base: int  # the session's database is shared: each test publishes its own range

    def publish(self, offset: int, model: ServingModel) -> int:
        version = self.version_base + offset
        publish_version(
            engine=self.engine,
            client=self.sync_redis,
            keys=self.keys,
            store_path=self.settings.model_store_path,
            version=version,
            model=model,
            trained_through_slot=version,
            metrics={"recall_at_20": 0.1 * offset},
        )
        return version

    async def wait_served(self, version: int, timeout_s: float = 10.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while True:
            body = (await self.http.get("/v1/models/current")).json()
            if body["served"] == version or time.monotonic() > deadline:
                return body  # type: ignore[no-any-return]
            await asyncio.sleep(0.05)


@pytest.fixture
def sync_redis(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    for key in client.scan_iter(match=f"{redis_prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
async def served(
    redis_url: str,
    migrated_database_url: str,
    redis_prefix: str,
    sync_redis: redis.Redis,
    tmp_path: Path,
) -> AsyncIterator[Served]:
    settings = Settings(
        redis_url=redis_url,
        database_url=migrated_database_url,
        redis_prefix=redis_prefix,
        data_dir=tmp_path,
        model_store_path=tmp_path / "models",
        model_poll_s=0.2,
        slot_seconds=3600,
        admin_api_keys=[ADMIN_KEY],
        device="cpu",
    )
    engine = make_engine(migrated_database_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Served(
                app,
                http,
                settings,
                RedisKeys(redis_prefix),
                sync_redis,
                engine,
                version_base=uuid.uuid4().int % 10_000_000 * 100 + 1_000_000,
            )
    engine.dispose()


def toy(seed: int = 0, n_items: int = 200) -> ServingModel:
    return toy_serving_model(n_users=30, n_items=n_items, embedding_dim=16, seed=seed)


def item_ids(body: dict[str, object]) -> list[str]:
    return [entry["item_id"] for entry in body["items"]]  # type: ignore[attr-defined, index]


def expected_top(
    model: ServingModel, user_vector: torch.Tensor, k: int, masked: set[str]
) -> list[str]:
    scores = model.item_matrix @ user_vector
    order = torch.argsort(scores, descending=True).tolist()
    return [model.item_ids[row] for row in order if model.item_ids[row] not in masked][:k]


# before any version exists


async def test_popular_from_the_slot_buffers_before_any_model(served: Served) -> None:
    keys, r = served.keys, served.sync_redis
    r.zadd(keys.slots_index, {"100": 100, "101": 101})
    for slot_id, item_id, count in [(100, "old", 9), (101, "a", 5), (101, "b", 3), (101, "c", 1)]:
        for _ in range(count):
            r.xadd(keys.slot_stream(slot_id), {"user_id": "x", "item_id": item_id, "ts": "1"})

    body = (await served.http.get("/v1/users/nobody/recommendations", params={"k": 3})).json()
    assert body["strategy"] == "popular" and body["model_version"] is None
    assert item_ids(body) == ["old", "a", "b"]
    assert [entry["score"] for entry in body["items"]] == [9.0, 5.0, 3.0]
    assert len(body["recommendation_id"]) == 32

    r.sadd(keys.items_hidden, "old")
    r.sadd(keys.item_category("letters"), "a", "c")
    r.incr(keys.items_version)
    params = {"k": 5, "category": "letters", "exclude": "a"}
    body = (await served.http.get("/v1/users/nobody/recommendations", params=params)).json()
    assert item_ids(body) == ["c"]

    ready = await served.http.get("/readyz")
    assert ready.status_code == 200, ready.text


# a served version


async def test_publish_swaps_and_warm_users_are_ranked_exactly(served: Served) -> None:
    model = toy(seed=1)
    version = served.publish(1, model)
    assert (await served.wait_served(version))["served"] == version
    assert (version_dir(served.settings.model_store_path, version) / "serving.json").is_file()

    served.sync_redis.sadd(served.keys.user_seen("u4"), "i0", "i1", "i2")
    body = (await served.http.get("/v1/users/u4/recommendations", params={"k": 10})).json()
    assert body["strategy"] == "personalized" and body["model_version"] == version
    assert item_ids(body) == expected_top(model, model.user_matrix[4], 10, {"i0", "i1", "i2"})

    params = {"k": 10, "exclude_seen": "false", "exclude": ["i3,i4", "i5"]}
    body = (await served.http.get("/v1/users/u4/recommendations", params=params)).json()
    assert item_ids(body) == expected_top(model, model.user_matrix[4], 10, {"i3", "i4", "i5"})

    newer = toy(seed=2)
    version2 = served.publish(2, newer)
    assert (await served.wait_served(version2))["served"] == version2
    body = (await served.http.get("/v1/users/u4/recommendations", params={"k": 10})).json()
    assert body["model_version"] == version2
    assert item_ids(body) == expected_top(newer, newer.user_matrix[4], 10, {"i0", "i1", "i2"})


async def test_new_user_goes_from_popular_to_cold_start_through_events(served: Served) -> None:
    model = toy(seed=3)
    version = served.publish(1, model)
    await served.wait_served(version)

    before = (await served.http.get("/v1/users/newcomer/recommendations")).json()
    assert before["strategy"] == "popular"
    popular_order = torch.argsort(model.popularity, descending=True)[:20].tolist()
    assert item_ids(before) == [model.item_ids[row] for row in popular_order]

    events = [{"user_id": "newcomer", "item_id": f"i{n}"} for n in (11, 22, 33)]
    posted = await served.http.post(
        "/v1/events", json={"events": events}, headers={"X-API-Key": ADMIN_KEY}
    )
    assert posted.status_code == 202, posted.text

    after = (await served.http.get("/v1/users/newcomer/recommendations")).json()
    assert after["strategy"] == "cold_start"
    assert not {"i11", "i22", "i33"} & set(item_ids(after))
    assert item_ids(after) != item_ids(before)


async def test_hidden_and_category_apply_at_once(served: Served) -> None:
    model = toy(seed=4)
    await served.wait_served(served.publish(1, model))
    first = item_ids(
        (await served.http.get("/v1/users/u7/recommendations", params={"k": 5})).json()
    )

    served.sync_redis.sadd(served.keys.items_hidden, first[0])
    served.sync_redis.incr(served.keys.items_version)
    body = (await served.http.get("/v1/users/u7/recommendations", params={"k": 5})).json()
    assert first[0] not in item_ids(body) and item_ids(body)[:4] == first[1:]

    members = {f"i{n}" for n in range(0, 200, 10)}
    served.sync_redis.sadd(served.keys.item_category("tens"), *members)
    served.sync_redis.incr(served.keys.items_version)
    params = {"k": 50, "category": "tens"}
    body = (await served.http.get("/v1/users/u7/recommendations", params=params)).json()
    expected = [
        i for i in expected_top(model, model.user_matrix[7], 200, {first[0]}) if i in members
    ]
    assert item_ids(body) == expected


async def test_similar_items_and_their_errors(served: Served) -> None:
    missing = await served.http.get("/v1/items/i1/similar")
    assert missing.status_code == 503 and "item_id" in missing.json()["detail"]

    model = toy(seed=5)
    await served.wait_served(served.publish(1, model))
    body = (await served.http.get("/v1/items/i1/similar", params={"k": 5})).json()
    embeddings = model.item_matrix[:, :16]
    cosine = torch.nn.functional.cosine_similarity(embeddings, embeddings[1][None], dim=1)
    cosine[1] = -2.0
    assert item_ids(body) == [model.item_ids[r] for r in torch.topk(cosine, 5).indices.tolist()]

    unknown = await served.http.get("/v1/items/nope/similar")
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "not_found" and "'nope'" in unknown.json()["detail"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": 501}, "k"),
        ({"k": "many"}, "k"),
        ({"exclude_seen": "maybe"}, "exclude_seen"),
    ],
)
async def test_invalid_queries_are_422_naming_the_field(
    served: Served, params: dict[str, object], field: str
) -> None:
    response = await served.http.get("/v1/users/u1/recommendations", params=params)
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_input"
    assert f"query.{field}" in response.json()["detail"]


async def test_overlong_user_id_is_refused(served: Served) -> None:
    response = await served.http.get(f"/v1/users/{'u' * 129}/recommendations")
    assert response.status_code == 422 and response.json()["detail"].startswith("user_id:")


# the registry, pinning and failed loads


async def test_models_listing_pin_and_unpin(served: Served) -> None:
    versions = [served.publish(offset, toy(seed=offset)) for offset in (1, 2, 3)]
    await served.wait_served(versions[-1])

    listed = (await served.http.get("/v1/models", params={"limit": 1000})).json()["versions"]
    mine = [row for row in listed if row["version"] in versions]
    assert [row["version"] for row in mine] == versions[::-1]
    assert mine[-1]["trained_through_slot"] == versions[0] and mine[-1]["published"] is True
    assert mine[0]["metrics"] == {"recall_at_20": pytest.approx(0.3)}

    admin = {"X-API-Key": ADMIN_KEY}
    refused = await served.http.post(f"/v1/models/{versions[0]}/activate")
    assert refused.status_code == 401
    absent = await served.http.post(f"/v1/models/{versions[0] + 99}/activate", headers=admin)
    assert absent.status_code == 404 and str(versions[0] + 99) in absent.json()["detail"]

    pinned = await served.http.post(f"/v1/models/{versions[0]}/activate", headers=admin)
    assert pinned.status_code == 200 and pinned.json()["pinned"] == versions[0]
    current = await served.wait_served(versions[0])
    assert current["served"] == versions[0] and current["following"] == "pinned"

    # a newer version does not move a pinned API
    newest = served.publish(4, toy(seed=4))
    await asyncio.sleep(0.6)
    current = (await served.http.get("/v1/models/current")).json()
    assert (current["current"], current["served"]) == (newest, versions[0])
    body = (await served.http.get("/v1/users/u1/recommendations")).json()
    assert body["model_version"] == versions[0]

    unpinned = await served.http.delete("/v1/models/pin", headers=admin)
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is None
    assert (await served.wait_served(newest))["following"] == "newest"


async def test_a_version_that_fails_to_load_keeps_the_old_snapshot(served: Served) -> None:
    good = served.publish(1, toy(seed=6))
    await served.wait_served(good)

    broken = served.version_base + 2
    broken_dir = served.settings.model_store_path / "broken"
    broken_dir.mkdir(parents=True)
    (broken_dir / "serving.json").write_text("{ not json")
    repo.register_model_version(
        served.engine, version=broken, trained_through_slot=broken, path=str(broken_dir), metrics={}
    )
    served.sync_redis.set(served.keys.model_current, broken)
    served.sync_redis.publish(served.keys.model_channel, str(broken))

    await asyncio.sleep(0.6)
    current = (await served.http.get("/v1/models/current")).json()
    assert (current["current"], current["served"]) == (broken, good)
    body = (await served.http.get("/v1/users/u2/recommendations")).json()
    assert body["model_version"] == good and body["strategy"] == "personalized"


async def test_publishing_the_same_version_again_is_harmless(served: Served) -> None:
    model = toy(seed=7)
    version = served.publish(1, model)
    assert served.publish(1, model) == version
    assert served.sync_redis.get(served.keys.model_current) == str(version)
    assert repo.get_model_version(served.engine, version) is not None


async def test_the_pointer_never_moves_back_and_versions_do_not_change_meaning(
    served: Served,
) -> None:
    newer = served.publish(5, toy(seed=8))
    older = served.publish(3, toy(seed=9))
    assert served.sync_redis.get(served.keys.model_current) == str(newer)
    assert (await served.wait_served(newer))["served"] == newer
    assert older < newer

    with pytest.raises(Conflict, match=f"version: {newer} cannot be registered"):
        publish_version(
            engine=served.engine,
            client=served.sync_redis,
            keys=served.keys,
            store_path=served.settings.model_store_path,
            version=newer,
            model=toy(seed=8),
            trained_through_slot=newer + 1,
            metrics={},
        )
    leftovers = [p.name for p in served.settings.model_store_path.iterdir() if "partial" in p.name]
    assert leftovers == []


async def test_a_version_announced_before_its_row_loads_once_it_is_published(
    served: Served,
) -> None:
    version = served.version_base + 1
    served.sync_redis.set(served.keys.model_current, version)  # e.g. a pointer left by a crash
    served.sync_redis.publish(served.keys.model_channel, str(version))
    await asyncio.sleep(0.5)
    assert (await served.http.get("/v1/models/current")).json()["served"] is None

    served.publish(1, toy(seed=10))
    assert (await served.wait_served(version, timeout_s=3.0))["served"] == version
