"""Bad input fails at once, with a message naming the option, the bad value and the fix.

Issue 10 item 5 and issue 16 (the core part): a table of option x bad value x message for
every public constructor and option of the core, then the misuses only a call can reveal
(sync work given to ``do``, async work to ``do_sync``, a forgotten ``await``, arguments that
hash by identity), the method option ``ignore_self``, and pickling decorated functions.
"""

from __future__ import annotations

import asyncio
import gc
import math
import pickle
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from cachetools import TTLCache

from singleflight import Group, OnceMap, singleflight

from .core_helpers import (
    TIMEOUT,
    assert_idle,
    async_wait_until,
    followers_waiting,
    start,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def _gen() -> Iterator[int]:
    yield 1


async def _agen() -> AsyncIterator[int]:
    yield 1


def _sync() -> int:
    return 1


async def _async() -> int:
    return 1


def _no_args() -> int:
    return 1


# (what is called, exception type, fragments the message must hold: option, value, fix)
TABLE: list[tuple[str, Callable[[], Any], type[Exception], tuple[str, ...]]] = [
    ("Group cache=5", lambda: Group(5), TypeError, ("cache must be", "5", "TTLCache", "None")),  # type: ignore[arg-type]
    (
        "Group cache_if=5",
        lambda: Group(cache_if=5),  # type: ignore[arg-type]
        TypeError,
        ("cache_if must be a callable", "5", "cache_if=lambda value"),
    ),
    (
        "Group reelect_on=TimeoutError",
        lambda: Group(reelect_on=TimeoutError),  # type: ignore[arg-type]
        TypeError,
        ("reelect_on must be a tuple", "TimeoutError", "reelect_on=(TimeoutError,)"),
    ),
    (
        "Group reelect_on=(int,)",
        lambda: Group(reelect_on=(int,)),  # type: ignore[arg-type]
        TypeError,
        ("reelect_on must be a tuple of exception types", "int", "reelect_on=("),
    ),
    (
        "Group tier='redis://x'",
        lambda: Group(tier="redis://x"),  # type: ignore[arg-type]
        TypeError,
        ("tier must be", "run()", "'redis://x'", "RedisTier("),
    ),
    (
        "Group tier=42",
        lambda: Group(tier=42),  # type: ignore[arg-type]
        TypeError,
        ("tier must be", "42", "RedisTier("),
    ),
    (
        "Group codec=object()",
        lambda: Group(codec=object()),  # type: ignore[arg-type]
        TypeError,
        ("codec must be", "encode(value)", "decode(data)", "None"),
    ),
    (
        "do_sync_bounded timeout=-1",
        lambda: Group().do_sync_bounded(-1, "k", _sync),
        ValueError,
        ("timeout must be >= 0", "-1"),
    ),
    (
        "do_sync_bounded timeout='1'",
        lambda: Group().do_sync_bounded("1", "k", _sync),  # type: ignore[arg-type]
        TypeError,
        ("timeout must be a number", "'1'", "5.0"),
    ),
    (
        "singleflight key='user_id'",
        lambda: singleflight(key="user_id"),  # type: ignore[arg-type]
        TypeError,
        ("key must be a callable", "'user_id'", "key=lambda"),
    ),
    (
        "singleflight ttl='10'",
        lambda: singleflight(ttl="10"),  # type: ignore[arg-type]
        TypeError,
        ("ttl must be a number", "'10'", "ttl=5.0"),
    ),
    (
        "singleflight ttl=True",
        lambda: singleflight(ttl=True),
        TypeError,
        ("ttl must be a number", "True", "ttl=5.0"),
    ),
    *[
        (
            f"singleflight ttl={bad!r}",
            (lambda bad=bad: singleflight(ttl=bad)),
            ValueError,
            ("ttl must be > 0 and finite", repr(bad), "ttl=None"),
        )
        for bad in (0, -1, math.inf, math.nan)
    ],
    (
        "singleflight maxsize=0",
        lambda: singleflight(ttl=10, maxsize=0),
        ValueError,
        ("maxsize must be >= 1", "got 0", "drop ttl="),
    ),
    (
        "singleflight maxsize=1.5",
        lambda: singleflight(ttl=10, maxsize=1.5),  # type: ignore[arg-type]
        TypeError,
        ("maxsize must be an int", "1.5", "maxsize=1024"),
    ),
    (
        "singleflight maxsize without ttl",
        lambda: singleflight(maxsize=10),
        ValueError,
        ("maxsize=10", "ttl= is not set", "pass ttl="),
    ),
    (
        "singleflight ttl= and cache=",
        lambda: singleflight(ttl=10, cache={}),
        ValueError,
        ("either ttl=/maxsize= or cache=",),
    ),
    (
        "singleflight cache=5",
        lambda: singleflight(cache=5),  # type: ignore[arg-type]
        TypeError,
        ("cache must be", "5", "TTLCache"),
    ),
    (
        "singleflight tier=42",
        lambda: singleflight(tier=42),  # type: ignore[arg-type]
        TypeError,
        ("tier must be", "42", "RedisTier("),
    ),
    (
        "singleflight ignore_self='yes'",
        lambda: singleflight(ignore_self="yes"),  # type: ignore[arg-type]
        TypeError,
        ("ignore_self must be True or False", "'yes'", "ignore_self=True"),
    ),
    (
        "@singleflight on 5",
        lambda: singleflight(5),  # type: ignore[call-overload]
        TypeError,
        ("decorates a function", "5"),
    ),
    (
        "@singleflight on a generator",
        lambda: singleflight(_gen),
        TypeError,
        ("_gen", "generator", "iterate a generator of its own", "returns the items"),
    ),
    (
        "@singleflight on an async generator",
        lambda: singleflight(_agen),
        TypeError,
        ("_agen", "generator", "returns the items"),
    ),
    (
        "@singleflight(tier=) on sync work",
        lambda: singleflight(tier=_FakeTier())(_sync),
        TypeError,
        ("needs an async function", "_sync", "drop tier="),
    ),
    (
        "@singleflight(ignore_self=True) on a function of no arguments",
        lambda: singleflight(ignore_self=True)(_no_args),
        TypeError,
        ("ignore_self=True", "_no_args", "takes none", "drop ignore_self="),
    ),
]


class _FakeTier:
    """Has the tier protocol's one method (never called here)."""

    async def run(self, *args: Any) -> tuple[Any, str]:
        raise AssertionError("not used")


@pytest.mark.parametrize(
    ("what", "call", "exc_type", "fragments"), TABLE, ids=[t[0] for t in TABLE]
)
def test_bad_option_fails_at_construction_naming_option_value_and_fix(
    what: str, call: Callable[[], Any], exc_type: type[Exception], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{what}: {message!r} lacks {missing}"


def test_ttl_inf_one_rule_and_one_message_for_decorator_and_transports() -> None:
    """The decorator refuses ttl=inf as the HTTP transports do, with the same words."""
    httpx_mod = pytest.importorskip("singleflight.httpx")
    with pytest.raises(ValueError) as deco:
        singleflight(ttl=math.inf)
    with pytest.raises(ValueError) as transport:
        httpx_mod.AsyncSingleflightTransport(ttl=math.inf)
    assert str(deco.value) == str(transport.value)


def test_valid_options_are_accepted() -> None:
    Group(TTLCache(4, 1), cache_if=bool, reelect_on=(TimeoutError,), tier=None, codec=None)
    singleflight(ttl=1, maxsize=1)(_sync)
    singleflight(ttl=0.5)(_sync)
    singleflight(cache={}, ignore_self=True)(lambda self: 1)
    assert Group().do_sync_bounded(0, "k", _sync) == (1, "leader")


# -- misuse only a call reveals ------------------------------------------------------------------


@pytest.mark.parametrize("cache", [None, "ttl"])
def test_do_sync_refuses_async_work_naming_do(cache: str | None) -> None:
    """Group({}).do_sync(async_fn) cached one un-awaited coroutine and handed it to everyone."""
    g: Group[Any] = Group(TTLCache(4, 60) if cache else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine is closed: no "never awaited" later
        with pytest.raises(TypeError) as info:
            g.do_sync("k", _async)
        gc.collect()
    message = str(info.value)
    assert "_async is async" in message and "await group.do(key, _async" in message
    assert g.cache is None or len(g.cache) == 0
    assert (g.stats.errors, g.stats.leaders) == (1, 1)
    assert_idle(g)


def test_do_sync_refusal_reaches_followers_too() -> None:
    """Followers of a flight whose leader passed async work get the same TypeError."""
    g: Group[Any] = Group()
    entered, release = threading.Event(), threading.Event()

    def lead() -> Any:
        entered.set()
        assert release.wait(TIMEOUT)
        return _async()

    leader = start(g.do_sync, "k", lead)
    assert entered.wait(TIMEOUT)
    follower = start(g.do_sync, "k", _sync)
    wait_until(followers_waiting(g, 1), "the follower waits")
    release.set()
    for c in (leader, follower):
        c.finish()
        assert isinstance(c.exception, TypeError) and "group.do(" in str(c.exception)
    assert_idle(g)


@pytest.mark.parametrize("cache", [None, "ttl"])
async def test_do_refuses_sync_work_naming_do_sync(cache: str | None) -> None:
    g: Group[Any] = Group(TTLCache(4, 60) if cache else None)
    with pytest.raises(TypeError) as info:
        await g.do("k", _sync)
    message = str(info.value)
    assert "_sync is sync" in message and "group.do_sync(key, _sync" in message
    assert_idle(g)


async def test_a_type_error_raised_by_the_work_itself_is_not_rewritten() -> None:
    """Only our own ``await`` of a non-awaitable is misuse; the work's TypeError is its own."""
    g: Group[Any] = Group()
    own = TypeError("object int can't be used in 'await' expression")

    async def raises_its_own() -> None:
        raise own

    async def awaits_a_number() -> None:
        await 5  # type: ignore[misc]  # the work's own bug, inside the work

    with pytest.raises(TypeError) as info:
        await g.do("k", raises_its_own)
    assert info.value is own
    with pytest.raises(TypeError) as info2:
        await g.do("k", awaits_a_number)
    assert "do_sync" not in str(info2.value)
    assert_idle(g)


def test_forgetting_await_names_the_users_function() -> None:
    @singleflight
    async def fetch_profile(user_id: int) -> int:
        return user_id

    with pytest.warns(RuntimeWarning, match=r"coroutine '.*fetch_profile' was never awaited"):
        fetch_profile(1)  # type: ignore[unused-coroutine]  # the mistake under test
        gc.collect()
    assert_idle(fetch_profile.group)


def test_key_returning_a_list_names_key_and_the_value() -> None:
    @singleflight(key=lambda x: [x])
    def g(x: int) -> int:
        raise AssertionError("must not run")

    with pytest.raises(TypeError) as info:
        g(1)
    message = str(info.value)
    assert "key= returned [1] (list)" in message and "tuple" in message


# -- identity-hashed arguments ------------------------------------------------------------------


class Request:
    """Like a Starlette Request: no __eq__, so it hashes by identity."""

    def __init__(self, path: str) -> None:
        self.path = path


async def test_identity_hashed_argument_warns_once_naming_it_and_key() -> None:
    """Issue 16: @singleflight on an endpoint taking a Request made 300 upstream calls for 300
    requests, silently. Overlapping calls with such an argument warn once."""
    gate = asyncio.Event()
    runs: list[str] = []

    @singleflight
    async def endpoint(request: Request, user_id: int) -> int:
        runs.append(request.path)
        await gate.wait()
        return user_id

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = asyncio.create_task(endpoint(Request("/a"), 1))
        await async_wait_until(lambda: len(runs) == 1, "the first call runs")
        assert caught == []  # uncontended: nothing checked, nothing said
        more = [asyncio.create_task(endpoint(Request("/a"), 1)) for _ in range(3)]
        await async_wait_until(lambda: len(runs) == 4, "every call ran its own work")
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, *more), TIMEOUT) == [1] * 4
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 1, messages
    assert "endpoint" in messages[0] and "positional argument 0 (Request)" in messages[0]
    assert "hashes by identity" in messages[0] and "key=" in messages[0]
    assert caught[0].filename == __file__  # points at the caller's line
    assert_idle(endpoint.group)


async def test_no_identity_warning_for_value_keys_key_option_or_a_methods_self() -> None:
    gate = asyncio.Event()

    class Service:
        @singleflight
        async def get(self, user_id: int) -> int:
            await gate.wait()
            return user_id

    @singleflight(key=lambda request, user_id: user_id)
    async def keyed(request: Request, user_id: int) -> int:
        await gate.wait()
        return user_id

    @singleflight
    async def by_value(user_id: int, fn: Callable[..., Any] = _sync) -> int:
        await gate.wait()
        return user_id

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks = [asyncio.create_task(Service().get(i)) for i in range(3)]
        tasks += [asyncio.create_task(keyed(Request("/"), i)) for i in range(3)]
        tasks += [asyncio.create_task(by_value(i)) for i in range(3)]
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT) == [0, 1, 2] * 3


# -- ignore_self -----------------------------------------------------------------------------------


class Repo:
    """A service object hashed by identity: each request makes a new one."""

    runs = 0
    gate: asyncio.Event

    @singleflight(ignore_self=True)
    async def user(self, user_id: int) -> dict[str, int]:
        Repo.runs += 1
        await Repo.gate.wait()
        return {"id": user_id}


async def test_ignore_self_shares_a_run_across_instances() -> None:
    Repo.runs, Repo.gate = 0, asyncio.Event()
    tasks = [asyncio.create_task(Repo().user(7)) for _ in range(5)]
    other = asyncio.create_task(Repo().user(8))
    await async_wait_until(followers_waiting(Repo.user.group, 4), "4 followers joined")
    Repo.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, other), TIMEOUT)
    assert all(r is results[0] for r in results[:5]) and results[5] == {"id": 8}
    assert Repo.runs == 2
    # Unbound calls and forget agree: the instance is never part of the key.
    Repo.runs = 0
    assert await Repo.user(Repo(), 9) == {"id": 9}
    Repo().user.forget(9)
    Repo.user.cache_pop(Repo(), 9)
    assert_idle(Repo.user.group)


# -- pickling ------------------------------------------------------------------------------------


@singleflight
def square(x: int) -> int:
    return x * x


@singleflight(ttl=60)
async def afetch(x: int) -> int:
    return x


class Holder:
    def __init__(self, n: int) -> None:
        self.n = n

    @singleflight
    def times(self, k: int) -> int:
        return self.n * k


def test_decorated_functions_pickle_by_reference() -> None:
    assert pickle.loads(pickle.dumps(square)) is square
    assert pickle.loads(pickle.dumps(afetch)) is afetch
    assert pickle.loads(pickle.dumps(Holder.times)) is Holder.times
    bound = pickle.loads(pickle.dumps(Holder(3).times))
    assert bound(2) == 6


def test_decorated_function_runs_in_a_real_process_pool() -> None:
    """ProcessPoolExecutor.submit(decorated, ...) works, as with functools.lru_cache."""
    with ProcessPoolExecutor(max_workers=1) as pool:
        assert pool.submit(square, 7).result(timeout=60) == 49
        assert pool.submit(Holder(5).times, 2).result(timeout=60) == 10
        assert list(pool.map(square, [1, 2, 3], timeout=60)) == [1, 4, 9]


def test_oncemap_has_no_options_to_misuse() -> None:
    """OnceMap() takes nothing; a bad call says so (the table covers every other entry)."""
    with pytest.raises(TypeError):
        OnceMap(5)  # type: ignore[call-arg]
