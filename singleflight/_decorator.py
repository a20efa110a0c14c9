"""The @singleflight decorator: a Group per decorated function, keyed by its arguments."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

from cachetools import TTLCache
from cachetools.keys import hashkey

from ._group import Group, Stats, Tier

__all__ = ("Singleflight", "singleflight")

P = ParamSpec("P")
R = TypeVar("R")


def _unhashable_error(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> TypeError:
    """Name the first argument that cannot be part of a key."""
    where = "an argument"
    for i, a in enumerate(args):
        try:
            hash(a)
        except TypeError:
            where = f"positional argument {i} ({type(a).__name__} {a!r:.60})"
            break
    else:
        for name, a in kwargs.items():
            try:
                hash(a)
            except TypeError:
                where = f"argument {name}= ({type(a).__name__} {a!r:.60})"
                break
    return TypeError(
        f"@singleflight {fn.__qualname__}: {where} is not hashable, so it cannot be part of the "
        "key; pass key=lambda *args, **kwargs: ... returning something hashable "
        "(e.g. a tuple or a str) that identifies the call"
    )


def _mark_coroutine_function(obj: Any) -> None:
    """Let frameworks that ask ``iscoroutinefunction`` (FastAPI…) see an async callable."""
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:  # Python 3.12+
        mark(obj)
    else:  # Python 3.10/3.11: asyncio.iscoroutinefunction reads this marker
        obj._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]


class Singleflight(Generic[P, R]):
    """A function wrapped by ``@singleflight``: one run per key at a time.

    Calls with equal keys (by default: equal arguments; on a method the instance is one of
    them) that overlap share one run. ``forget(*args, **kwargs)`` lets the next call with
    those arguments start afresh; ``cache_clear()`` drops cached values; ``stats`` and
    ``group`` expose the underlying ``Group``.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        key: Callable[..., Hashable] | None,
        group: Group[Any],
    ) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._key = key
        self.group = group
        # A shared tier is shared by every decorated function: the default key names the
        # function, or get_user(1) and get_post(1) would share one entry. A key= is the user's
        # own key space and is used as it is.
        shared = group.tier is not None and key is None
        self._prefix = f"{fn.__module__}.{fn.__qualname__}" if shared else None
        self._is_async = inspect.iscoroutinefunction(fn)
        if self._is_async:
            _mark_coroutine_function(self)

    def _make_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        if self._key is not None:
            k = self._key(*args, **kwargs)
        else:
            k = hashkey(*args, **kwargs)
        try:
            hash(k)
        except TypeError:
            if self._key is not None:
                raise TypeError(
                    f"@singleflight {self._fn.__qualname__}: key= returned {k!r:.60}, which is "
                    "not hashable; return a tuple, str or int instead"
                ) from None
            raise _unhashable_error(self._fn, args, kwargs) from None
        return k if self._prefix is None else (self._prefix, k)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        k = self._make_key(args, kwargs)
        if self._is_async:
            return cast(R, self.group.do(k, self._fn, *args, **kwargs))  # type: ignore[arg-type]
        return cast(R, self.group.do_sync(k, self._fn, *args, **kwargs))

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return _BoundSingleflight(self, obj)

    def forget(self, *args: Any, **kwargs: Any) -> None:
        """The next call with these arguments runs afresh: its cached result is dropped, and
        a run in progress keeps its value for its own callers but does not cache it."""
        self.group.forget(self._make_key(args, kwargs))

    def cache_pop(self, *args: Any, **kwargs: Any) -> None:
        """Invalidate the result for these arguments (async-lru's ``cache_invalidate``)."""
        self.group.cache_pop(self._make_key(args, kwargs))

    def cache_clear(self) -> None:
        """Drop every cached result; runs in progress will not cache theirs."""
        self.group.cache_clear()

    @property
    def stats(self) -> Stats:
        """The Group's counters."""
        return self.group.stats

    def __repr__(self) -> str:
        return f"<singleflight {self._fn.__module__}.{self._fn.__qualname__}>"


class _BoundSingleflight:
    """A ``Singleflight`` accessed on an instance: the instance is the first argument."""

    __slots__ = ("__dict__", "_obj", "_sf")

    def __init__(self, sf: Singleflight[..., Any], obj: object) -> None:
        self._sf = sf
        self._obj = obj
        if sf._is_async:
            _mark_coroutine_function(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._sf(self._obj, *args, **kwargs)

    def forget(self, *args: Any, **kwargs: Any) -> None:
        self._sf.forget(self._obj, *args, **kwargs)

    def cache_pop(self, *args: Any, **kwargs: Any) -> None:
        self._sf.cache_pop(self._obj, *args, **kwargs)

    def cache_clear(self) -> None:
        self._sf.cache_clear()

    @property
    def stats(self) -> Stats:
        return self._sf.stats

    @property
    def group(self) -> Group[Any]:
        return self._sf.group

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sf, name)


@overload
def singleflight(fn: Callable[P, R], /) -> Singleflight[P, R]: ...


@overload
def singleflight(
    *,
    key: Callable[..., Hashable] | None = None,
    ttl: float | None = None,
    maxsize: int = 1024,
    cache: MutableMapping[Any, Any] | None = None,
    tier: Tier | None = None,
) -> Callable[[Callable[P, R]], Singleflight[P, R]]: ...


def singleflight(
    fn: Callable[P, R] | None = None,
    /,
    *,
    key: Callable[..., Hashable] | None = None,
    ttl: float | None = None,
    maxsize: int = 1024,
    cache: MutableMapping[Any, Any] | None = None,
    tier: Tier | None = None,
) -> Singleflight[P, R] | Callable[[Callable[P, R]], Singleflight[P, R]]:
    """singleflight makes overlapping calls with equal arguments share one run.

    Use it bare (``@singleflight``) or with options. Works on async and sync functions and on
    methods.

    Args:
        key: callable taking the function's arguments and returning the hashable key; default:
            all the arguments (so they must be hashable).
        ttl: also reuse a completed result for ``ttl`` seconds from its completion (a
            ``cachetools.TTLCache`` of ``maxsize`` entries). Exceptions are never cached.
        maxsize: the most results kept when ``ttl`` is set.
        cache: your own mapping of results instead of ``ttl``/``maxsize``.
        tier: a shared tier (``singleflight.redis.RedisTier``); async functions only.
    """
    if key is not None and not callable(key):
        raise TypeError(f"key must be a callable returning a hashable key, got {key!r}")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            raise TypeError(f"ttl must be a number of seconds, got {ttl!r}")
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}; pass ttl=None to disable caching")
        if cache is not None:
            raise ValueError("pass either ttl=/maxsize= or cache=, not both")
    if isinstance(maxsize, bool) or not isinstance(maxsize, int):
        raise TypeError(f"maxsize must be an int, got {maxsize!r}")
    if maxsize < 1:
        raise ValueError(f"maxsize must be >= 1, got {maxsize}; pass ttl=None to disable caching")
    if cache is not None and not isinstance(cache, MutableMapping):
        raise TypeError(
            "cache must be a MutableMapping such as cachetools.TTLCache, "
            f"got {type(cache).__name__}"
        )

    def decorate(f: Callable[P, R]) -> Singleflight[P, R]:
        if not callable(f):
            raise TypeError(f"@singleflight decorates a function, got {f!r}")
        if tier is not None and not inspect.iscoroutinefunction(f):
            raise TypeError(
                f"@singleflight(tier=...) needs an async function, {f.__qualname__} is sync; "
                "drop tier= or make it async"
            )
        store = (
            cache if cache is not None else (TTLCache(maxsize, ttl) if ttl is not None else None)
        )
        return Singleflight(f, key=key, group=Group(store, tier=tier))

    if fn is not None:
        return decorate(fn)
    return decorate
