"""pytest plugin: every httpx Client/AsyncClient of httpx's own suite sends through singleflight."""

# Loaded with -p sf_foreign_httpx (scripts/foreign/run.sh puts this folder on PYTHONPATH).
# SF_FOREIGN_MODE picks how each client's transport and mounts are wrapped:
#   plain     nothing wrapped (the suite's own baseline)
#   default   SingleflightTransport(inner) / AsyncSingleflightTransport(inner)
#   ttl       the same with ttl=30
#   follower  each request is preceded by an identical concurrent "decoy" that leads the flight,
#             so the suite's own request is served as a follower (see _Pairing)
# sf_foreign_results reports the summed Stats of every wrapped transport.

from __future__ import annotations

import contextvars
import os
import threading
import time
from typing import Any

import anyio
import httpx
import pytest
from sf_foreign_results import STATS, touch

from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport

__all__ = ("MODE",)

MODE = os.environ.get("SF_FOREIGN_MODE", "default")
if MODE not in ("plain", "default", "ttl", "follower"):
    raise ValueError(f"SF_FOREIGN_MODE={MODE!r}: use plain, default, ttl or follower")

_WRAPPED: list[Any] = []  # every singleflight transport made, for the stats
_COUNTS = {"requests": 0, "follower": 0, "not_followed": 0, "decoy_aborted": 0}
_JOIN_WAIT = 1.0  # seconds a decoy waits for the suite's request to join its flight


class _DecoyAborted(Exception):
    """The suite's request went upstream itself, so the decoy must not send a second one."""


class _Pairing:
    """One suite request and its decoy: the decoy leads, the suite's request should follow."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.base = transport.stats.followers
        self.real_arrived = False  # the suite's request reached the inner transport itself
        self.decoy_in = threading.Event()  # the decoy leads (reached the inner) or is done

    def joined(self) -> bool:
        return self.transport.stats.followers > self.base

    def should_abort(self) -> bool:
        if self.real_arrived:
            _COUNTS["decoy_aborted"] += 1
            return True
        return False


# Who the current task/thread is sending for: (pairing, "decoy" | "real").
_ROLE: contextvars.ContextVar[tuple[_Pairing, str] | None] = contextvars.ContextVar(
    "sf_foreign_role", default=None
)


class _Gate(httpx.BaseTransport):
    """Inner side: holds the decoy's upstream call until the suite's request has joined."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        role = _ROLE.get()
        if role is not None:
            pairing, who = role
            if who == "real":
                pairing.real_arrived = True
            else:
                pairing.decoy_in.set()
                deadline = time.monotonic() + _JOIN_WAIT
                while not (pairing.real_arrived or pairing.joined()):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.0005)
                if pairing.should_abort():
                    raise _DecoyAborted
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> _Gate:
        self.inner.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self.inner.__exit__(*args)


class _AsyncGate(httpx.AsyncBaseTransport):
    """The async twin of _Gate (asyncio and trio, through anyio)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        role = _ROLE.get()
        if role is not None:
            pairing, who = role
            if who == "real":
                pairing.real_arrived = True
            else:
                pairing.decoy_in.set()
                deadline = time.monotonic() + _JOIN_WAIT
                turns = 0
                while not (pairing.real_arrived or pairing.joined()):
                    if time.monotonic() > deadline:
                        break
                    turns += 1
                    await anyio.sleep(0 if turns < 100 else 0.0005)
                if pairing.should_abort():
                    raise _DecoyAborted
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> _AsyncGate:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.inner.__aexit__(*args)


def _count(response: httpx.Response) -> None:
    _COUNTS["requests"] += 1
    if response.extensions.get("singleflight") == "follower":
        _COUNTS["follower"] += 1
    else:
        _COUNTS["not_followed"] += 1


class _Follower(httpx.BaseTransport):
    """Sends each request twice at once through one SingleflightTransport: decoy first."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.sf = SingleflightTransport(_Gate(inner))
        _WRAPPED.append(self.sf)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        pairing = _Pairing(self.sf)

        def decoy() -> None:
            _ROLE.set((pairing, "decoy"))
            try:
                self.sf.handle_request(request).close()
            except BaseException:
                pass  # the suite's request gets the same outcome, or sends itself
            finally:
                pairing.decoy_in.set()

        thread = threading.Thread(target=decoy, name="sf-decoy", daemon=True)
        thread.start()
        pairing.decoy_in.wait(10)
        token = _ROLE.set((pairing, "real"))
        try:
            response = self.sf.handle_request(request)
        finally:
            _ROLE.reset(token)
            thread.join(10)
        _count(response)
        return response

    def close(self) -> None:
        self.sf.close()

    def __enter__(self) -> _Follower:
        self.sf.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self.sf.__exit__(*args)


class _AsyncFollower(httpx.AsyncBaseTransport):
    """The async twin of _Follower: the decoy is a sibling task."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.sf = AsyncSingleflightTransport(_AsyncGate(inner))
        _WRAPPED.append(self.sf)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pairing = _Pairing(self.sf)
        ready = anyio.Event()

        async def decoy() -> None:
            _ROLE.set((pairing, "decoy"))
            try:
                response = await self.sf.handle_async_request(request)
                await response.aclose()
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException:  # KeyboardInterrupt from a stream reaches the suite's too
                pass  # the suite's request gets the same outcome, or sends itself
            finally:
                ready.set()

        async def watch() -> None:  # the decoy leads (reached the gate) or is done
            while not pairing.decoy_in.is_set() and not ready.is_set():
                await anyio.sleep(0)

        response: httpx.Response | None = None
        error: BaseException | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(decoy)
            await watch()
            token = _ROLE.set((pairing, "real"))
            try:
                response = await self.sf.handle_async_request(request)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:  # raised bare below, not in the task group's group
                error = exc
            finally:
                _ROLE.reset(token)
        if error is not None:
            raise error
        assert response is not None
        _count(response)
        return response

    async def aclose(self) -> None:
        await self.sf.aclose()

    async def __aenter__(self) -> _AsyncFollower:
        await self.sf.__aenter__()
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.sf.__aexit__(*args)


def _wrapper(sync: bool) -> Any:
    """A wrap(transport) for one client: the same inner object gets the same wrapper."""
    made: dict[int, Any] = {}
    options: dict[str, Any] = {"ttl": 30} if MODE == "ttl" else {}

    def wrap(inner: Any) -> Any:
        if inner is None:
            return None
        if id(inner) not in made:
            if MODE == "follower":
                made[id(inner)] = _Follower(inner) if sync else _AsyncFollower(inner)
            else:
                cls = SingleflightTransport if sync else AsyncSingleflightTransport
                made[id(inner)] = cls(inner, **options)
                _WRAPPED.append(made[id(inner)])
        return made[id(inner)]

    return wrap


def _patch(cls: type[Any], sync: bool) -> None:
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        touch()
        wrap = _wrapper(sync)
        self._transport = wrap(self._transport)
        self._mounts = {pattern: wrap(t) for pattern, t in self._mounts.items()}

    cls.__init__ = __init__


if MODE != "plain":
    _patch(httpx.Client, sync=True)
    _patch(httpx.AsyncClient, sync=False)


def _totals() -> dict[str, Any]:
    keys = ("calls", "leaders", "followers", "cache_hits", "errors", "reelections", "bypasses")
    totals = {key: 0 for key in keys}
    for transport in _WRAPPED:
        stats = transport.stats
        for key in keys:
            totals[key] += getattr(stats, key)
    totals["transports"] = len(_WRAPPED)
    if MODE == "follower":
        totals.update(("suite_" + key, value) for key, value in _COUNTS.items())
    return totals


STATS.append(_totals)


@pytest.hookimpl(tryfirst=True)
def pytest_report_header() -> str:
    return f"singleflight foreign-suite plugin: httpx {httpx.__version__}, mode {MODE}"
