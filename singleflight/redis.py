"""Redis tier: one upstream call per key for a whole fleet of processes, and a shared cache.

```python
import redis, redis.asyncio
from singleflight.redis import RedisTier

tier = RedisTier(redis.asyncio.Redis(), namespace="sf", ttl=30.0)  # async work
client = httpx.AsyncClient(transport=AsyncSingleflightTransport(tier=tier))
group = Group(tier=tier)  # await group.do(...); values: bytes, str or JSON (or pass codec=)

sync_tier = RedisTier(redis.Redis(socket_timeout=2))  # threads: do_sync, sync transport
client = httpx.Client(transport=SingleflightTransport(tier=sync_tier))
```

``redis.asyncio.RedisCluster`` / ``redis.RedisCluster`` work the same (one slot per key,
sharded pub/sub). See docs/redis.md for the design: lease, pub/sub + polling, crash takeover,
stale values, fallback when Redis is down, and why the value format is JSON + bytes and never
pickle.
"""

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "singleflight.redis needs the redis package (redis-py >= 8.1): "
        'pip install "singleflight-http[redis]"'
    ) from exc

from ._redis._format import DefaultCodec
from ._redis._tier import RedisTier, RedisTierStats

__all__ = ("DefaultCodec", "RedisTier", "RedisTierStats")

for _obj in (DefaultCodec, RedisTier, RedisTierStats):
    _obj.__module__ = __name__
del _obj
