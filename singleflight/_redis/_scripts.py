"""The Lua scripts of the Redis tier: each step that must be atomic is one script, one round trip.

Every script touches only the names of one key (``<ns>:{<digest>}:...``), which share a hash
tag, so they also run on Redis Cluster. Times are the server's: freshness is read with PTTL, so
the workers' clocks never matter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, final

__all__ = ("CHECK", "EXTEND", "FINISH", "LOOKUP", "SCRIPTS", "Script")

LOOKUP: Final = """
-- KEYS: value, lease   ARGV: token, lease_ms, stale_ms, skip_value ('1': ignore the value)
-- Returns {'fresh', v} | {'stale', v} (someone else refreshes) | {'stale_lead', v} (we refresh)
--       | {'lead'} (we hold the lease now) | {'follow', holder_token}
if ARGV[4] ~= '1' then
  local v = redis.call('GET', KEYS[1])
  if v then
    local pttl = redis.call('PTTL', KEYS[1])
    local stale_ms = tonumber(ARGV[3])
    if pttl == -1 or pttl > stale_ms then
      return {'fresh', v}
    end
    if stale_ms > 0 then
      if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
        return {'stale_lead', v}
      end
      return {'stale', v}
    end
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'lead'}
end
return {'follow', redis.call('GET', KEYS[2])}
"""

CHECK: Final = """
-- KEYS: value, lease, result:<holder>   ARGV: holder token
-- A follower's re-check. Returns {'value', v} | {'result', r} | {'wait'} | {'gone', token|''}
local v = redis.call('GET', KEYS[1])
if v then return {'value', v} end
local r = redis.call('GET', KEYS[3])
if r then return {'result', r} end
local cur = redis.call('GET', KEYS[2])
if cur == ARGV[1] then return {'wait'} end
return {'gone', cur or ''}
"""

EXTEND: Final = """
-- KEYS: lease   ARGV: token, lease_ms.  Renews the lease only while it is still ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

FINISH: Final = """
-- KEYS: value, lease, result:<token>
-- ARGV: token, mode ('value' | 'result'), record, px, channel, 'PUBLISH' | 'SPUBLISH'
-- Stores the outcome, drops the lease if it is still ours, and tells the followers (sharded
-- pub/sub on a cluster: the channel shares the keys' hash tag, so its slot is this node's).
-- Returns 1 if we still held the lease, 0 if we had lost it.
local mine = redis.call('GET', KEYS[2]) == ARGV[1]
if ARGV[2] == 'value' then
  if mine then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  else
    -- Lost the lease (it expired and another process took over): never overwrite a value a
    -- newer flight may have written.
    redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[4])
  end
else
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
end
if mine then redis.call('DEL', KEYS[2]) end
redis.call(ARGV[6], ARGV[5], ARGV[1])
return mine and 1 or 0
"""


@final
@dataclass(frozen=True, slots=True)
class Script:
    """One script's text and its SHA1 (what EVALSHA names; loaded on the key's node on NOSCRIPT)."""

    name: str
    text: str
    sha: str

    @classmethod
    def of(cls, name: str, text: str) -> Script:
        return cls(name, text, hashlib.sha1(text.encode()).hexdigest())  # noqa: S324


SCRIPTS: Final = {
    name: Script.of(name, text)
    for name, text in (("lookup", LOOKUP), ("check", CHECK), ("extend", EXTEND), ("finish", FINISH))
}
