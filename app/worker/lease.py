"""A leader lease in Redis: one worker at a time processes slots.

The holder SETs the key with a random token (NX, PX = the lease length) and renews it with a
compare-and-set script before it runs out. The holder trusts its lease only until the last
successful renewal (timed from when the request was sent) plus the lease length, so it stops
working before a second worker can have taken over, even when Redis stops answering.
"""

import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from app.ingestion.lua import LuaScript

_RENEW = LuaScript(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)

_RELEASE = LuaScript(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)


class LeaseLost(Exception):
    """The lease ran out or another worker holds it: stop before the next write."""


class RedisLease:
    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        lease_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.key = key
        self.lease_ms = max(1, int(lease_s * 1000))
        self.token = secrets.token_hex(16)
        self._clock = clock
        self._valid_until_s = 0.0

    @property
    def held(self) -> bool:
        return self._clock() < self._valid_until_s

    @property
    def renew_every_s(self) -> float:
        return self.lease_ms / 3000

    def check(self) -> None:
        if not self.held:
            raise LeaseLost(f"the lease {self.key} is no longer held")

    async def acquire(self) -> bool:
        sent_s = self._clock()
        taken = await self.redis.set(self.key, self.token, nx=True, px=self.lease_ms)
        if taken:
            self._valid_until_s = sent_s + self.lease_ms / 1000
        return bool(taken)

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) when another worker has it."""
        sent_s = self._clock()
        renewed = await _RENEW.run(self.redis, [self.key], [self.token, self.lease_ms])
        if renewed:
            self._valid_until_s = sent_s + self.lease_ms / 1000
        else:
            self._valid_until_s = 0.0
        return bool(renewed)

    async def release(self) -> None:
        self._valid_until_s = 0.0
        await _RELEASE.run(self.redis, [self.key], [self.token])
