"""Idempotency keys for events.

An event's `event_id` is what makes a retry harmless: the write path stores an event only the
first time its id is seen (within `dedup_ttl_s`). A client should send its own ids. When it does
not, the id is derived:

- with a `timestamp`, from a hash of `(user_id, item_id, timestamp, type)`, so the same event
  posted twice (a client retry after a timeout, say) gets the same id and is counted once. The
  timestamp enters as unix seconds, so `1700000000` and `"2023-11-14T22:13:20Z"` are one event.
  `value` is not part of the key: two posts that differ only in value are one event, the first.
- without a `timestamp`, the server clock stamps the event, a retry would get a different time,
  and nothing tells two posts apart: the id is 128 random bits in hex, and every post is a new
  event.
"""

import hashlib
import secrets

import orjson


def derived_event_id(user_id: str, item_id: str, ts_s: float, event_type: str) -> str:
    """A deterministic id from the event's identity (32 hex characters)."""
    identity = orjson.dumps([user_id, item_id, float(ts_s), event_type])
    return hashlib.blake2b(identity, digest_size=16).hexdigest()


def random_event_id() -> str:
    return secrets.token_hex(16)
