"""Running server-side Lua scripts with one round trip: EVALSHA, loading the script only when the
server does not know it yet (after a restart or a SCRIPT FLUSH)."""

import hashlib
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError


class LuaScript:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, redis: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # the server lost its script cache: load it and try once more
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


# Shared by the scripts: read the clock hash, and store a watermark that never moves back.
# Numbers travel as strings with 17 significant digits so no precision is lost on the way.
CLOCK_HELPERS = """
local function fmt(x) return string.format('%.17g', x) end

local function read_clock(clock_key)
  local stored = redis.call('HMGET', clock_key, 'max_event_ts', 'watermark')
  return tonumber(stored[1]), tonumber(stored[2])
end

local function raise_watermark(old_wm, candidate)
  if old_wm ~= nil and old_wm > candidate then return old_wm end
  return candidate
end
"""
