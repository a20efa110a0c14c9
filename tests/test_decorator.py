"""The @singleflight decorator: bare and called forms, async and sync, methods, TTL, errors."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

import pytest
from cachetools import TTLCache

from singleflight import Group, Singleflight, Stats, singleflight

from .core_helpers import TIMEOUT, assert_idle, async_wait_until, finish_all, start, wait_until

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    """A timer for cachetools.TTLCache that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _gather(*aws: Any) -> list[Any]:
    async with asyncio.timeout(TIMEOUT):
        return await asyncio.gather(*aws, return_exceptions=True)


# -- forms ---------------------------------------------------------------------------------------


async def test_bare_decorator_on_async_function_shares_overlapping_calls() -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    @singleflight
    async def get_user(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        await gate.wait()
        return {"id": user_id}

    assert isinstance(get_user, Singleflight)
    tasks = [asyncio.create_task(get_user(42)) for _ in range(5)]
    other = asyncio.create_task(get_user(7))
    await async_wait_until(lambda: get_user.stats.followers == 4, "4 followers wait")
    gate.set()
    results = await _gather(*tasks, other)
    assert all(r is results[0] for r in results[:5]) and results[0] == {"id": 42}
    assert results[5] == {"id": 7}
    assert sorted(calls) == [7, 42]
    assert get_user.stats == Stats(calls=6, leaders=2, followers=4, cache_hits=0, errors=0)
    assert_idle(get_user.group)


def test_bare_decorator_on_sync_function_shares_overlapping_calls_across_threads() -> None:
    release = threading.Event()
    calls: list[str] = []

    @singleflight
    def load_config(name: str) -> dict[str, str]:
        calls.append(name)
        assert release.wait(TIMEOUT)
        return {"name": name}

    leader = start(load_config, "app")
    wait_until(lambda: calls == ["app"], "the leader runs")
    followers = [start(load_config, "app") for _ in range(3)]
    wait_until(lambda: load_config.stats.followers == 3, "3 followers wait")
    release.set()
    finish_all([leader, *followers])
    assert all(f.outcome() is leader.outcome() for f in followers)
    assert calls == ["app"]
    assert_idle(load_config.group)


async def test_called_decorator_without_options_works_like_the_bare_form() -> None:
    @singleflight()
    async def f(x: int) -> int:
        return x * 2

    @singleflight()
    def g(x: int) -> int:
        return x * 3

    assert await f(2) == 4
    assert g(2) == 6
    assert isinstance(f.group, Group) and f.group is not g.group


async def test_calls_with_different_arguments_do_not_share() -> None:
    gate = asyncio.Event()

    @singleflight
    async def f(x: int, *, y: int = 0) -> tuple[int, int]:
        await gate.wait()
        return x, y

    tasks = [
        asyncio.create_task(f(1)),
        asyncio.create_task(f(2)),
        asyncio.create_task(f(1, y=1)),
    ]
    await async_wait_until(lambda: f.stats.leaders == 3, "three separate runs")
    gate.set()
    assert await _gather(*tasks) == [(1, 0), (2, 0), (1, 1)]
    assert f.stats.followers == 0


# -- methods ---------------------------------------------------------------------------------


class Repo:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.gate = threading.Event()

    @singleflight
    async def fetch(self, item: int) -> str:
        self.calls += 1
        while not self.gate.is_set():
            await asyncio.sleep(0.001)
        return f"{self.name}:{item}"

    @singleflight(ttl=60)
    def load(self, item: int) -> str:
        self.calls += 1
        return f"{self.name}:{item}"


async def test_method_calls_on_one_instance_share_a_run() -> None:
    repo = Repo("a")
    tasks = [asyncio.create_task(repo.fetch(1)) for _ in range(3)]
    await async_wait_until(lambda: repo.fetch.stats.followers >= 2, "2 followers wait")
    repo.gate.set()
    assert await _gather(*tasks) == ["a:1"] * 3
    assert repo.calls == 1
    assert_idle(repo.fetch.group)


async def test_method_calls_on_two_instances_do_not_share_the_instance_is_in_the_key() -> None:
    a, b = Repo("a"), Repo("b")
    before = Repo.fetch.stats.leaders
    ta = asyncio.create_task(a.fetch(1))
    tb = asyncio.create_task(b.fetch(1))
    await async_wait_until(lambda: Repo.fetch.stats.leaders == before + 2, "two runs")
    a.gate.set()
    b.gate.set()
    assert await _gather(ta, tb) == ["a:1", "b:1"]
    assert (a.calls, b.calls) == (1, 1)
    assert_idle(Repo.fetch.group)


def test_sync_method_with_ttl_caches_per_instance_and_forget_is_per_instance() -> None:
    a, b = Repo("a"), Repo("b")
    assert [a.load(1), a.load(1), b.load(1)] == ["a:1", "a:1", "b:1"]
    assert (a.calls, b.calls) == (1, 1)
    a.load.forget(1)
    assert [a.load(1), b.load(1)] == ["a:1", "b:1"]
    assert (a.calls, b.calls) == (2, 1), "forget on a must not drop b's entry"
    assert isinstance(Repo.__dict__["load"], Singleflight)
    assert a.load.group is Repo.load.group and a.load.stats == Repo.load.stats
    a.load.cache_clear()


# -- TTL ----------------------------------------------------------------------------------


def test_ttl_cache_reuses_a_value_until_ttl_after_completion_then_expires() -> None:
    clock = FakeClock()
    runs: list[int] = []

    @singleflight(cache=TTLCache(maxsize=16, ttl=10.0, timer=clock))
    def value(x: int) -> int:
        runs.append(x)
        clock.now += 5.0  # the work takes 5 "seconds": the TTL starts at completion
        return len(runs)

    assert value(1) == 1  # completes at t = 1005
    clock.now = 1005.0 + 9.9
    assert value(1) == 1 and len(runs) == 1
    assert value.stats.cache_hits == 1
    clock.now = 1005.0 + 10.1
    assert value(1) == 2 and len(runs) == 2
    assert_idle(value.group)


async def test_ttl_cache_works_for_async_functions() -> None:
    clock = FakeClock()
    runs: list[int] = []

    @singleflight(cache=TTLCache(maxsize=16, ttl=10.0, timer=clock))
    async def value(x: int) -> int:
        runs.append(x)
        return len(runs)

    assert [await value(1), await value(1), await value(2)] == [1, 1, 2]
    clock.now += 11
    assert await value(1) == 3
    assert value.stats.cache_hits == 1
    assert_idle(value.group)


def test_ttl_option_reuses_the_completed_value() -> None:
    runs: list[int] = []

    @singleflight(ttl=3600)
    def value(x: int) -> int:
        runs.append(x)
        return len(runs)

    assert [value(1), value(1), value(1)] == [1, 1, 1]
    assert value.stats.cache_hits == 2
    assert isinstance(value.group.cache, TTLCache)
    assert value.group.cache.ttl == 3600


async def test_exceptions_are_never_cached() -> None:
    clock = FakeClock()
    attempts: list[int] = []

    @singleflight(cache=TTLCache(maxsize=16, ttl=10.0, timer=clock))
    async def flaky(x: int) -> str:
        attempts.append(x)
        if len(attempts) == 1:
            raise ConnectionError("first try fails")
        return "ok"

    with pytest.raises(ConnectionError):
        await flaky(1)
    assert await flaky(1) == "ok"
    assert await flaky(1) == "ok"  # now cached
    assert len(attempts) == 2
    assert flaky.stats.errors == 1 and flaky.stats.cache_hits == 1
    assert_idle(flaky.group)


def test_forget_drops_the_cached_value_for_those_arguments_only() -> None:
    runs: list[int] = []

    @singleflight(ttl=3600)
    def value(x: int) -> int:
        runs.append(x)
        return len(runs)

    assert [value(1), value(2)] == [1, 2]
    value.forget(1)
    assert [value(1), value(2)] == [3, 2]


def test_cache_clear_drops_every_cached_value() -> None:
    runs: list[int] = []

    @singleflight(ttl=3600)
    def value(x: int) -> int:
        runs.append(x)
        return len(runs)

    assert [value(1), value(2)] == [1, 2]
    value.cache_clear()
    assert [value(1), value(2)] == [3, 4]


async def test_forget_while_in_flight_starts_a_new_run_for_later_calls() -> None:
    gates = [asyncio.Event(), asyncio.Event()]
    runs: list[int] = []

    @singleflight
    async def f(x: int) -> int:
        n = len(runs)
        runs.append(x)
        await gates[n].wait()
        return n

    first = asyncio.create_task(f(1))
    await async_wait_until(lambda: len(runs) == 1, "the first run started")
    f.forget(1)
    second = asyncio.create_task(f(1))
    await async_wait_until(lambda: len(runs) == 2, "a second run started")
    for gate in gates:
        gate.set()
    assert await _gather(first, second) == [0, 1]
    assert_idle(f.group)


# -- bad input -----------------------------------------------------------------------------


async def test_unhashable_argument_raises_type_error_naming_it_and_suggesting_key() -> None:
    ran: list[object] = []

    @singleflight
    async def f(items: list[int], flag: bool = False) -> int:
        ran.append(items)
        return len(items)

    with pytest.raises(TypeError) as info:
        f([1, 2, 3])  # raised at call time, before any coroutine exists
    message = str(info.value)
    assert "positional argument 0" in message and "[1, 2, 3]" in message
    assert "key=" in message and "f" in message
    with pytest.raises(TypeError, match=r"flag=.*\{\}.*key="):
        f((1,), flag={})  # type: ignore[arg-type]
    assert ran == []
    assert_idle(f.group)


def test_unhashable_argument_of_a_sync_function_raises_type_error() -> None:
    @singleflight
    def g(mapping: dict[str, int]) -> int:
        raise AssertionError("must not run")

    with pytest.raises(TypeError, match=r"\{'a': 1\}.*key="):
        g({"a": 1})
    assert_idle(g.group)


def test_key_returning_an_unhashable_value_raises_type_error() -> None:
    @singleflight(key=lambda x: [x])
    def g(x: int) -> int:
        raise AssertionError("must not run")

    with pytest.raises(TypeError, match=r"key= returned \[1\]"):
        g(1)


async def test_key_option_replaces_the_default_key() -> None:
    gate = asyncio.Event()
    calls: list[tuple[int, object]] = []

    @singleflight(key=lambda user_id, session: user_id)
    async def get_user(user_id: int, session: object) -> int:
        calls.append((user_id, session))
        await gate.wait()
        return user_id

    sessions = [[], {}, object()]  # unhashable ones too: the key ignores them
    tasks = [asyncio.create_task(get_user(1, s)) for s in sessions]
    await async_wait_until(lambda: get_user.stats.followers == 2, "2 followers wait")
    gate.set()
    assert await _gather(*tasks) == [1, 1, 1]
    assert len(calls) == 1
    get_user.forget(1, None)  # forget takes the same arguments
    assert_idle(get_user.group)


@pytest.mark.parametrize("ttl", [0, -1, -0.5, 0.0])
def test_ttl_not_positive_raises_value_error_with_the_value_and_the_fix(ttl: float) -> None:
    with pytest.raises(ValueError) as info:
        singleflight(ttl=ttl)
    message = str(info.value)
    assert "ttl" in message and repr(ttl) in message and "ttl=None" in message


@pytest.mark.parametrize("maxsize", [0, -3])
def test_maxsize_below_one_raises_value_error_with_the_value_and_the_fix(maxsize: int) -> None:
    with pytest.raises(ValueError) as info:
        singleflight(ttl=10, maxsize=maxsize)
    message = str(info.value)
    assert "maxsize" in message and str(maxsize) in message and ">= 1" in message


def test_bad_option_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match="ttl"):
        singleflight(ttl="10")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        singleflight(key="user_id")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache="):
        singleflight(ttl=10, cache={})


# -- the wrapper looks like the function ------------------------------------------------------


def test_wrapper_keeps_name_doc_signature_and_wrapped() -> None:
    async def get_user(user_id: int, *, fresh: bool = False) -> dict[str, int]:
        """Fetch one user."""
        return {"id": user_id}

    wrapped = singleflight(key=lambda user_id, **_: user_id)(get_user)
    assert wrapped.__name__ == "get_user"
    assert wrapped.__qualname__ == get_user.__qualname__
    assert wrapped.__doc__ == "Fetch one user."
    assert wrapped.__module__ == __name__
    assert wrapped.__wrapped__ is get_user
    assert inspect.signature(wrapped) == inspect.signature(get_user)


def test_method_wrapper_keeps_name_and_doc() -> None:
    assert Repo.fetch.__name__ == "fetch"
    assert Repo("x").fetch.__name__ == "fetch"
    assert Repo.fetch.__wrapped__.__qualname__ == "Repo.fetch"


async def test_a_decorated_function_awaiting_itself_raises_reentrancy_error() -> None:
    """The decorator's own flight coroutine leads (it is a flight frame): a call of the same
    arguments from inside its work fails at once, directly or through a helper coroutine;
    other arguments work, and a task of its own (not on the stack) simply follows."""
    from singleflight import ReentrancyError

    async def helper(n: int) -> int:
        return await fetch(n)

    @singleflight(key=lambda n, via="": n)
    async def fetch(n: int, via: str = "") -> int:
        if via == "self":
            return await fetch(n)
        if via == "helper":
            return await helper(n)
        if via == "other":
            return await fetch(n + 1)
        return n

    for via in ("self", "helper"):
        with pytest.raises(ReentrancyError, match="own key"):
            async with asyncio.timeout(TIMEOUT):
                await fetch(1, via=via)  # key 1 leads, and its work awaits key 1
        assert_idle(fetch.group)
    async with asyncio.timeout(TIMEOUT):
        assert await fetch(5, via="other") == 6
    assert_idle(fetch.group)
