"""The core's shared vocabulary: Role, Stats, Unshared, and the Tier and Codec protocols."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, final

__all__ = ("Codec", "Role", "Stats", "Tier", "Unshared")

T = TypeVar("T")
V = TypeVar("V")

#: How a call was served.
Role = Literal["leader", "follower", "cache", "shared", "remote", "stale"]


class Codec(Protocol[V]):
    """Turns values into bytes and back, for a shared tier (never pickle)."""

    def encode(self, value: V, /) -> bytes: ...

    def decode(self, data: bytes, /) -> V: ...


class Tier(Protocol):
    """A shared tier (e.g. ``singleflight.redis.RedisTier``) the local leader goes through."""

    async def run(
        self,
        key: Hashable,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any] | None,
        cacheable: Callable[[Any], bool] | None,
    ) -> tuple[Any, str]: ...

    def run_sync(  # sync tier (issue 14)
        self,
        key: Hashable,
        produce: Callable[[], Any],
        codec: Codec[Any] | None,
        cacheable: Callable[[Any], bool] | None,
        wait: float | None = None,
    ) -> tuple[Any, str]: ...


@final
@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a Group's counters.

    ``calls == leaders + followers + cache_hits``: every call is counted once, by how it
    ended up being served. ``errors`` counts flights whose work raised (cancellations and
    re-elections excluded); ``reelections`` counts flights a leader handed to a follower
    (cancelled, timed out); ``bypasses`` counts requests an HTTP adapter let straight through.
    A background refresh of a stale value (``stale_ttl``) counts as a call that led.
    """

    calls: int
    leaders: int
    followers: int
    cache_hits: int
    errors: int
    reelections: int = 0
    bypasses: int = 0


@final
class Unshared(Generic[T]):
    """Returned by a leader's work: give ``value`` to the leader only.

    Every follower of that flight then runs its own work, alone. Used by the HTTP adapters for
    responses that must not be shared (Set-Cookie, event streams, oversized bodies).
    """

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value
