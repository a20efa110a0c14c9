"""The @singleflight decorator: a Group per decorated function, keyed by its arguments."""

from __future__ import annotations

import asyncio
import functools
import inspect
import warnings
from collections.abc import Callable, Hashable, MutableMapping
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

from cachetools import TTLCache
from cachetools.keys import hashkey

from ._calls import caller as _caller
from ._group import Group, Stats, Tier
from ._keys import by_identity, unhashable_error
from ._options import (
    check_cache,
    check_maxsize,
    check_tier,
    check_ttl,
    check_ttl_options,
    fail_type,
)

__all__ = ("Singleflight", "singleflight")

P = ParamSpec("P")
R = TypeVar("R")


def _mark_coroutine_function(obj: Any) -> None:
    """Let frameworks that ask ``iscoroutinefunction`` (FastAPI…) see an async callable."""
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:  # Python 3.12+
        mark(obj)
    else:  # Python 3.10/3.11: asyncio.iscoroutinefunction reads this marker
        obj._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]


def _is_async(fn: Callable[..., Any]) -> bool:
    """An async function, or a callable object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method itself, not callable()
    )


def _never_called(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover - replaced at once
    raise AssertionError("a Singleflight's func is set in _setup")


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none
        return inspect.Signature()


class Singleflight(functools.partial[R], Generic[P, R]):
    """A function wrapped by ``@singleflight``: one run per key at a time.

    Calls with equal keys (by default: equal arguments; on a method the instance is one of
    them unless ``ignore_self=True``) that overlap share one run. ``forget(*args, **kwargs)``
    and ``cache_pop(...)`` let the next call with those arguments start afresh;
    ``cache_clear()`` drops cached values; ``stats`` and ``group`` expose the ``Group``.
    """

    # A functools.partial of a closure (``_caller``): calling it costs no Python frame of its
    # own, and it still carries forget/cache_pop/stats, binds to instances and pickles.

    def __new__(
        cls,
        fn: Callable[P, R],
        *,
        key: Callable[..., Hashable] | None,
        group: Group[Any],
        ignore_self: bool = False,
    ) -> Singleflight[P, R]:
        self = super().__new__(cls, _never_called)
        self._setup(fn, key, group, ignore_self)
        return self

    if TYPE_CHECKING:

        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def _setup(
        self,
        fn: Callable[..., Any],
        key: Callable[..., Hashable] | None,
        group: Group[Any],
        ignore_self: bool,
    ) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._key = key
        self._skip = 1 if ignore_self else 0  # leading arguments left out of the key
        self._group = group
        # A shared tier is shared by every decorated function: the default key names the
        # function, or get_user(1) and get_post(1) would share one entry. A key= is the user's
        # own key space and is used as it is.
        shared = group.tier is not None and key is None
        self._prefix = f"{fn.__module__}.{fn.__qualname__}" if shared else None
        # The plain default key of a call without keyword arguments is its args tuple itself.
        self._plain = key is None and not shared and not ignore_self
        self._warned = False  # the identity-hash warning is given once per function
        params = list(_signature(fn).parameters)
        self._self_args = 1 if ignore_self or params[:1] in (["self"], ["cls"]) else 0
        self._is_async = _is_async(fn)
        self._qualname = fn.__qualname__
        call = _caller(self, fn, group)
        # partial's own way to set its func (read-only otherwise), keeping our __dict__.
        cast(Any, self).__setstate__((call, (), {}, self.__dict__))
        if self._is_async:
            _mark_coroutine_function(self)
            _mark_coroutine_function(call)  # frameworks unwrap partials to their func

    @property
    def group(self) -> Group[Any]:
        """The Group behind this function (its flights, cache and counters)."""
        return self._group

    def _make_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        if self._key is not None:
            k = self._key(*args, **kwargs)
        else:
            k = hashkey(*args[self._skip :], **kwargs)
        try:
            hash(k)
        except TypeError:
            if self._key is not None:
                raise TypeError(
                    f"@singleflight {self._qualname}: key= returned {k!r:.60} "
                    f"({type(k).__name__}), which is not hashable; return a tuple, str or int "
                    "instead"
                ) from None
            raise unhashable_error(self._fn, args, kwargs) from None
        return k if self._prefix is None else (self._prefix, k)

    def _check_identity(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Warn once if the key holds an argument that hashes by identity (a Request…).

        Checked only when a call leads while another flight of this function runs: such
        arguments make every call its own key, so nothing is ever shared, silently. A
        method's ``self``/``cls`` is left alone (per instance is the documented default).
        """
        if self._key is not None:
            return
        named = [(f"positional argument {i}", a) for i, a in enumerate(args)]
        named += [(f"argument {name}=", a) for name, a in kwargs.items()]
        for i, (where, value) in enumerate(named):
            if i < self._self_args or not by_identity(value):
                continue
            self._warned = True
            fix = "pass key=lambda ...: <what identifies the call> to the decorator"
            warnings.warn(
                f"@singleflight {self._qualname}: {where} ({type(value).__name__}) hashes by "
                "identity, so calls with it never share a run; " + fix,
                RuntimeWarning,
                stacklevel=3,
            )
            return

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return _BoundSingleflight(self, obj)

    def __reduce__(self) -> str:
        """Pickle by reference, as ``functools.lru_cache`` does (ProcessPoolExecutor.submit)."""
        return self._qualname

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
        return f"<singleflight {self._fn.__module__}.{self._qualname}>"


class _BoundSingleflight(functools.partial[Any]):
    """A ``Singleflight`` accessed on an instance: a partial with the instance first."""

    _sf: Singleflight[..., Any]
    _obj: object

    def __new__(cls, sf: Singleflight[..., Any], obj: object) -> _BoundSingleflight:
        self = super().__new__(cls, sf.func, obj)
        self._sf = sf
        self._obj = obj
        if sf._is_async:
            _mark_coroutine_function(self)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return getattr, (self._obj, self._sf.__name__)

    def forget(self, *args: Any, **kwargs: Any) -> None:
        self._sf.forget(self._obj, *args, **kwargs)

    def cache_pop(self, *args: Any, **kwargs: Any) -> None:
        self._sf.cache_pop(self._obj, *args, **kwargs)

    def cache_clear(self) -> None:
        self._sf.cache_clear()

    @property
    def stats(self) -> Stats:
        return cast(Stats, self._sf.stats)

    @property
    def group(self) -> Group[Any]:
        return cast("Group[Any]", self._sf.group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sf, name)

    def __repr__(self) -> str:
        return f"<bound singleflight {self._sf._qualname} of {self._obj!r:.60}>"


@overload
def singleflight(fn: Callable[P, R], /) -> Singleflight[P, R]: ...


@overload
def singleflight(
    *,
    key: Callable[..., Hashable] | None = None,
    ttl: float | None = None,
    maxsize: int | None = None,
    cache: MutableMapping[Any, Any] | None = None,
    tier: Tier | None = None,
    ignore_self: bool = False,
    stale_ttl: float | None = None,
) -> Callable[[Callable[P, R]], Singleflight[P, R]]: ...


def singleflight(
    fn: Callable[P, R] | None = None,
    /,
    *,
    key: Callable[..., Hashable] | None = None,
    ttl: float | None = None,
    maxsize: int | None = None,
    cache: MutableMapping[Any, Any] | None = None,
    tier: Tier | None = None,
    ignore_self: bool = False,
    stale_ttl: float | None = None,
) -> Singleflight[P, R] | Callable[[Callable[P, R]], Singleflight[P, R]]:
    """singleflight makes overlapping calls with equal arguments share one run.

    Use it bare (``@singleflight``) or with options. Works on async and sync functions and on
    methods. Every caller of a run gets the same result object (share it, do not mutate it).

    Args:
        key: callable taking the function's arguments and returning the hashable key; default:
            all the arguments (so they must be hashable, and hash by value).
        ttl: also reuse a completed result for ``ttl`` seconds from its completion (a
            ``cachetools.TTLCache`` of ``maxsize`` entries). Exceptions are never cached.
        maxsize: the most results kept when ``ttl`` is set (default 1024).
        cache: your own mapping of results instead of ``ttl``/``maxsize``.
        tier: a shared tier (``singleflight.redis.RedisTier``), sync or async like the function.
        ignore_self: for methods: leave the first argument (``self``/``cls``) out of the key,
            so calls on every instance share (aiocache's ``noself``).
        stale_ttl: with ``ttl``: for ``stale_ttl`` more seconds after ``ttl`` the old result
            is returned at once while one background refresh runs (stale-while-revalidate);
            a failing refresh keeps it served until then (stale-if-error).
    """
    if key is not None and not callable(key):
        raise fail_type(
            "key",
            "a callable returning a hashable key",
            key,
            "pass e.g. key=lambda user_id: user_id",
        )
    ttl = check_ttl(ttl)
    if maxsize is not None:
        maxsize = check_maxsize(maxsize)
        if ttl is None:
            raise ValueError(
                f"maxsize={maxsize} sizes the ttl cache, but ttl= is not set; pass ttl= too, "
                "or drop maxsize="
            )
    if cache is not None and (ttl is not None or maxsize is not None):
        raise ValueError("pass either ttl=/maxsize= or cache=, not both")
    check_ttl_options(ttl, stale_ttl, maxsize, None, None)  # stale_ttl: a number, with ttl=
    check_cache(cache)
    check_tier(tier)
    if not isinstance(ignore_self, bool):
        raise fail_type("ignore_self", "True or False", ignore_self, "pass ignore_self=True")

    def decorate(f: Callable[P, R]) -> Singleflight[P, R]:
        if not callable(f):
            raise TypeError(f"@singleflight decorates a function, got {f!r:.80}")
        if inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f):
            raise TypeError(
                f"@singleflight cannot share {f.__qualname__}: it is a generator, and every "
                "caller must iterate a generator of its own; decorate a function that returns "
                "the items instead (e.g. a list)"
            )
        check = getattr(tier, "require", None)  # sync tier (issue 14)
        if check is not None:  # the tier says which work it serves, naming the client to pass
            check(_is_async(f), f"@singleflight {f.__qualname__}")
        elif tier is not None and not _is_async(f) and not hasattr(tier, "run_sync"):
            raise TypeError(
                f"@singleflight(tier=...) on sync {f.__qualname__} needs an async function or "
                "a tier with run_sync(); this one serves async work only: make the function "
                "async or drop tier="
            )
        if ignore_self and not _signature(f).parameters:
            raise TypeError(
                f"@singleflight(ignore_self=True) leaves the first argument out of the key, "
                f"but {f.__qualname__} takes none; drop ignore_self="
            )
        if stale_ttl is not None:
            group: Group[Any] = Group(ttl=ttl, stale_ttl=stale_ttl, maxsize=maxsize, tier=tier)
        else:
            store = cache
            if store is None and ttl is not None:
                store = TTLCache(maxsize or 1024, ttl)
            group = Group(store, tier=tier)
        return Singleflight(f, key=key, group=group, ignore_self=ignore_self)

    if fn is not None:
        return decorate(fn)
    return decorate
