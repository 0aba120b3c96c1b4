"""The lease's own bookkeeping: how long it trusts itself (a stand-in Redis, a fake clock)."""

import asyncio
from typing import Any

import pytest

from app.worker.lease import LeaseLost, RedisLease


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class AnsweringRedis:
    """Answers SET NX and the renew script with preset replies."""

    def __init__(self, *, set_reply: bool = True, script_reply: int = 1) -> None:
        self.set_reply = set_reply
        self.script_reply = script_reply
        self.set_calls: list[dict[str, Any]] = []

    async def set(self, key: str, value: str, **options: Any) -> bool:
        self.set_calls.append({"key": key, "value": value, **options})
        return self.set_reply

    async def evalsha(self, sha: str, numkeys: int, *args: Any) -> int:
        return self.script_reply


def test_an_acquired_lease_is_trusted_for_its_length_from_the_request() -> None:
    clock, redis = FakeClock(), AnsweringRedis()
    lease = RedisLease(redis, "lease", 3.0, clock=clock)  # type: ignore[arg-type]

    assert asyncio.run(lease.acquire())

    assert redis.set_calls == [{"key": "lease", "value": lease.token, "nx": True, "px": 3000}]
    clock.now_s += 2.99
    assert lease.held
    clock.now_s += 0.02
    assert not lease.held
    with pytest.raises(LeaseLost):
        lease.check()


def test_a_renewal_extends_trust_and_a_refused_one_ends_it() -> None:
    clock, redis = FakeClock(), AnsweringRedis()
    lease = RedisLease(redis, "lease", 3.0, clock=clock)  # type: ignore[arg-type]
    asyncio.run(lease.acquire())

    clock.now_s += 2.0
    assert asyncio.run(lease.renew())
    clock.now_s += 2.0
    assert lease.held

    redis.script_reply = 0
    assert not asyncio.run(lease.renew())
    assert not lease.held


def test_a_lease_held_elsewhere_is_not_trusted() -> None:
    lease = RedisLease(AnsweringRedis(set_reply=False), "lease", 3.0)  # type: ignore[arg-type]

    assert not asyncio.run(lease.acquire())
    assert not lease.held
    assert lease.renew_every_s == pytest.approx(1.0)


def test_two_leases_have_different_tokens() -> None:
    redis = AnsweringRedis()
    assert RedisLease(redis, "k", 1.0).token != RedisLease(redis, "k", 1.0).token  # type: ignore[arg-type]
