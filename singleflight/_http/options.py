"""HTTPOptions: the options both adapters take, checked at construction, and their Group."""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Callable, Hashable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

if TYPE_CHECKING:
    from singleflight._group import Group

from singleflight._options import check_ttl, fail_type  # one rule, one message

from .headers import HeaderPairs
from .key import (
    CREDENTIAL_HEADERS,
    DEFAULT_IGNORE_HEADERS,
    HeaderFilter,
    _split_url,
    key_from_parts,
)
from .rules import DEFAULT_MAX_BODY_SIZE, DEFAULT_METHODS, ClientClosed
from .snapshot import SNAPSHOT_CODEC, _snapshot_is_cacheable
from .stale import StalePolicy, check_stale

__all__ = ("HTTPOptions", "http_group")


_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token (method names)


_KeyFn = Callable[[Any], "Hashable | None"]


def _check_methods(methods: object) -> frozenset[str]:
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Iterable):
        raise fail_type(
            "methods", "a collection of method names", methods, 'pass e.g. methods=("GET", "HEAD")'
        )
    out = set()
    for m in methods:
        if not isinstance(m, str) or not _TOKEN.fullmatch(m):
            raise ValueError(
                f"methods must hold HTTP method names such as 'GET', got {m!r} in {methods!r}; "
                'pass e.g. methods=("GET", "HEAD")'
            )
        out.add(m.upper())
    return frozenset(out)


def _check_tier(tier: object) -> None:
    if tier is not None and not callable(getattr(tier, "run", None)):
        raise fail_type(
            "tier",
            "a shared tier such as singleflight.redis.RedisTier (an object with async run())",
            tier,
            "pass e.g. tier=RedisTier(redis.asyncio.Redis()), or tier=None",
        )


# Every Group an HTTP adapter uses was built here: it stores only cacheable Snapshots and
# re-elects on the client libraries' timeouts. A hand-built Group is refused (make_group).
_HTTP_GROUPS: weakref.WeakSet[Any] = weakref.WeakSet()


def _client_timeouts() -> tuple[type[BaseException], ...]:
    """The exceptions that end only a leader's own attempt, for every client library present.

    A Group may be shared by httpx transports and aiohttp middlewares alike, so each re-elects
    on all of them: httpx's timeouts, aiohttp's (``asyncio.TimeoutError``), a closed client.
    """
    found: list[type[BaseException]] = [ClientClosed, asyncio.TimeoutError]
    try:
        import httpx
    except ImportError:  # pragma: no cover - aiohttp without httpx
        pass
    else:
        found.append(httpx.TimeoutException)
    return tuple(found)


def _check_maxsize(maxsize: object) -> int:
    if isinstance(maxsize, bool) or not isinstance(maxsize, int):
        raise fail_type("maxsize", "an int", maxsize, "pass e.g. maxsize=1024")
    if maxsize < 1:
        raise ValueError(f"maxsize must be >= 1, got {maxsize}; pass ttl=None to disable caching")
    return maxsize


def _check_ignore_headers(ignore_headers: object) -> HeaderFilter:
    if isinstance(ignore_headers, HeaderFilter):
        return ignore_headers
    if isinstance(ignore_headers, (str, bytes)) or not isinstance(ignore_headers, Iterable):
        raise fail_type(
            "ignore_headers",
            "a collection of header names",
            ignore_headers,
            'pass e.g. ignore_headers=DEFAULT_IGNORE_HEADERS | {"x-my-trace"}',
        )
    names = list(ignore_headers)
    for n in names:
        if not isinstance(n, str) or not n or n == "*":
            raise ValueError(
                f"ignore_headers must hold header names (a trailing * matches a prefix), got {n!r}"
            )
    result = HeaderFilter(names)
    leaked = sorted(h for h in CREDENTIAL_HEADERS if h in result)
    if leaked:
        raise ValueError(
            f"ignore_headers would leave credentials out of the key ({', '.join(leaked)}): callers "
            "with different credentials would share responses; if that is really wanted, pass "
            "key= (a callable request -> hashable) instead"
        )
    return result


def _check_max_body_size(max_body_size: object) -> int:
    if isinstance(max_body_size, bool) or not isinstance(max_body_size, int):
        raise fail_type(
            "max_body_size", "an int number of bytes", max_body_size, "pass e.g. 16 * 1024 * 1024"
        )
    if max_body_size < 0:
        raise ValueError(
            f"max_body_size must be >= 0, got {max_body_size}; pass e.g. 16 * 1024 * 1024"
        )
    return max_body_size


@final
@dataclass(frozen=True, slots=True)
class HTTPOptions:
    """HTTPOptions holds the validated options both adapters take, and builds their Group.

    Build it with ``HTTPOptions.build(...)``, which checks each option at construction and raises
    ``TypeError``/``ValueError`` naming the parameter, the bad value and the fix.
    """

    methods: frozenset[str]
    ttl: float | None
    maxsize: int
    cache: MutableMapping[Any, Any] | None
    key: _KeyFn | None
    ignore_headers: HeaderFilter
    max_body_size: int
    stale: StalePolicy | None = None  # stale_ttl= or ttl="headers" (issue 13)

    @classmethod
    def build(
        cls,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        ttl: float | str | None = None,
        maxsize: int = 1024,
        cache: MutableMapping[Any, Any] | None = None,
        key: _KeyFn | None = None,
        ignore_headers: Iterable[str] = DEFAULT_IGNORE_HEADERS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        stale_ttl: float | None = None,
        max_ttl: float | None = None,
    ) -> HTTPOptions:
        """build validates every option and returns the options object."""
        ttl, stale = check_stale(ttl, stale_ttl, max_ttl, cache)
        if cache is not None and not isinstance(cache, MutableMapping):
            raise fail_type(
                "cache", "a MutableMapping or None", cache, "pass e.g. cachetools.TTLCache(1024, 5)"
            )
        if cache is not None and ttl is not None:
            raise ValueError(
                f"pass either cache= or ttl=, not both (got ttl={ttl!r} and a cache); "
                "the cache decides its own expiry"
            )
        if key is not None and not callable(key):
            raise fail_type(
                "key",
                "a callable request -> hashable (or None to bypass)",
                key,
                "pass e.g. key=lambda request: str(request.url), or key=None for the default",
            )
        return cls(
            methods=_check_methods(methods),
            ttl=check_ttl(ttl),
            maxsize=_check_maxsize(maxsize),
            cache=cache,
            key=key,
            ignore_headers=_check_ignore_headers(ignore_headers),
            max_body_size=_check_max_body_size(max_body_size),
            stale=stale,
        )

    def make_cache(self) -> MutableMapping[Any, Any] | None:
        """make_cache returns ``cache``, or a ``cachetools.TTLCache(maxsize, ttl)`` if ttl is set.

        The Group stores a value when its flight completes, so the TTL counts from completion.
        """
        if self.cache is not None:
            return self.cache
        if self.ttl is None:
            return None
        from cachetools import TTLCache

        return TTLCache(maxsize=self.maxsize, ttl=self.ttl)

    def make_group(
        self,
        *,
        group: Group[Any] | None = None,
        tier: Any = None,
        reelect_on: tuple[type[BaseException], ...] = (),
    ) -> Group[Any]:
        """make_group returns ``group`` as given, or a new Group with this cache and policy.

        A new Group stores only cacheable Snapshots (``cache_if``), re-elects on ``reelect_on``
        and on every client library's timeout and closed client, and stores Snapshots in
        ``tier`` with ``SNAPSHOT_CODEC``. A given ``group`` must have been built here (another
        adapter's ``.group``, or ``http_group()``): a hand-built Group would cache 5xx and
        ``no-store`` responses. It keeps its own cache and tier, so ``ttl``/``cache``/``tier``
        alongside it are refused.
        """
        from singleflight._group import Group

        _check_tier(tier)
        if group is not None:
            if not isinstance(group, Group):
                raise fail_type(
                    "group",
                    "a singleflight.Group",
                    group,
                    "pass another transport's .group, http_group(...) or group=None",
                )
            if self.ttl is not None or self.cache is not None or tier is not None or self.stale:
                raise ValueError(
                    "group= brings its own cache and tier: pass ttl=/cache=/tier= to "
                    "http_group(ttl=..., tier=...) when you build it, or drop group="
                )
            if group not in _HTTP_GROUPS:
                raise ValueError(
                    "group= must be built for HTTP: a hand-built Group would cache 5xx and "
                    "no-store responses and share a leader's timeout; pass another transport's "
                    "or middleware's .group, or build it with http_group(ttl=..., tier=...) "
                    "from singleflight.httpx or singleflight.aiohttp"
                )
            return group
        reelect = tuple(dict.fromkeys(reelect_on + _client_timeouts()))
        built: Group[Any]
        if self.stale is not None:  # stale-while-revalidate: the Group's own ttl cache
            built = Group(
                cache_if=_snapshot_is_cacheable,
                reelect_on=reelect,
                tier=tier,
                codec=SNAPSHOT_CODEC,
                maxsize=self.maxsize,
                **self.stale.group_options(),
            )
        else:
            built = Group(
                self.make_cache(),
                cache_if=_snapshot_is_cacheable,
                reelect_on=reelect,
                tier=tier,
                codec=SNAPSHOT_CODEC,
            )
        _HTTP_GROUPS.add(built)
        return built

    def key_for(
        self,
        request: object,
        method: str,
        url: str,
        headers: HeaderPairs,
        extra: tuple[Hashable, ...] = (),
        *,
        userinfo: str | None = None,
    ) -> Hashable | None:
        """key_for returns the Group key of a request, or None when it must bypass.

        With ``key=`` set, ``key(request)`` replaces the default policy (None means bypass), and
        the method and ``extra`` are still added, so a HEAD never shares with a GET and raw bodies
        never mix with decoded ones. Otherwise it is ``request_key(...)`` with ``ignore_headers``;
        pass ``userinfo`` (``""`` if none) when ``url`` is already normalised (see
        ``key_from_parts``).
        """
        if self.key is not None:
            custom = self.key(request)
            if custom is None:
                return None
            return ("key", method.upper(), custom, extra)
        if userinfo is None:
            url, userinfo = _split_url(url)
        return key_from_parts(
            method, url, userinfo, headers, ignore=self.ignore_headers, extra=extra
        )


def http_group(
    *,
    ttl: float | None = None,
    maxsize: int = 1024,
    cache: MutableMapping[Any, Any] | None = None,
    tier: Any = None,
) -> Group[Any]:
    """http_group builds a Group for the HTTP adapters' ``group=``, with their rules built in.

    It stores only responses an HTTP cache may keep (never a 5xx, ``no-store``, ``Set-Cookie``
    ...), re-elects a follower when a leader's own timeout fires or its client closes, and keeps
    Snapshots in ``tier`` (e.g. ``singleflight.redis.RedisTier``) with the safe codec. Options
    are checked as the adapters check them: ``ttl`` seconds (None: no cache), ``maxsize``, or
    your own ``cache`` mapping. The only way to hand a Group of your own to ``group=``.
    """
    options = HTTPOptions.build(ttl=ttl, maxsize=maxsize, cache=cache)
    return options.make_group(tier=tier)
