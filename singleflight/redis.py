"""Redis tier: one upstream call per key for a whole fleet of processes, and a shared cache.

```python
import redis.asyncio as redis
from singleflight.redis import RedisTier

tier = RedisTier(redis.Redis(), namespace="sf", ttl=30.0, stale_ttl=0.0, lease_ttl=10.0)
client = httpx.AsyncClient(transport=AsyncSingleflightTransport(tier=tier))
group = Group(tier=tier)  # async do() only; values: bytes, str or JSON (or pass codec=)
```

See docs/redis.md for the design: lease, pub/sub + polling, crash takeover, stale values,
fallback when Redis is down, and why the value format is JSON + bytes and never pickle.
"""

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "singleflight.redis needs the redis package (redis-py >= 5): "
        "pip install singleflight-http[redis]"
    ) from exc

from ._redis._format import DefaultCodec
from ._redis._tier import RedisTier, RedisTierStats

__all__ = ("DefaultCodec", "RedisTier", "RedisTierStats")

for _obj in (DefaultCodec, RedisTier, RedisTierStats):
    _obj.__module__ = __name__
del _obj
