"""pytest plugin: every aiohttp ClientSession of aiohttp's own tests has SingleflightMiddleware."""

# Loaded with -p sf_foreign_aiohttp (scripts/foreign/run.sh puts this folder on PYTHONPATH).
# SF_FOREIGN_MODE picks what each ClientSession gets, after its own middlewares (innermost, so
# it keys the request the session's middlewares built, as a user's would be):
#   plain     nothing (the suite's own baseline)
#   default   SingleflightMiddleware()
#   ttl       SingleflightMiddleware(ttl=30)
#   follower  each request is preceded by an identical concurrent "decoy" that leads the flight,
#             so the suite's own request is served as a follower (see _Pairing)
# A per-request middlewares= replaces the session's list in aiohttp, ours included: as for users.
# sf_foreign_results reports the summed Stats of every middleware and which tests made a session.

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from typing import Any

import aiohttp
import pytest
from sf_foreign_results import STATS, touch

from singleflight.aiohttp import SingleflightMiddleware, served

__all__ = ("MODE",)

MODE = os.environ.get("SF_FOREIGN_MODE", "default")
if MODE not in ("plain", "default", "ttl", "follower"):
    raise ValueError(f"SF_FOREIGN_MODE={MODE!r}: use plain, default, ttl or follower")

_MADE: list[SingleflightMiddleware] = []
_COUNTS = {"requests": 0, "follower": 0, "not_followed": 0, "decoy_aborted": 0}
_JOIN_WAIT = 1.0  # seconds a decoy waits for the suite's request to join its flight


class _DecoyAborted(Exception):
    """The suite's request went upstream itself, so the decoy must not send a second one."""


class _Pairing:
    """One suite request and its decoy: the decoy leads, the suite's request should follow."""

    def __init__(self, middleware: SingleflightMiddleware) -> None:
        self.middleware = middleware
        self.base = middleware.stats.followers
        self.real_arrived = False  # the suite's request reached the network side itself
        self.decoy_in = asyncio.Event()  # the decoy leads (reached the gate) or is done

    def joined(self) -> bool:
        return self.middleware.stats.followers > self.base


_ROLE: contextvars.ContextVar[tuple[_Pairing, str] | None] = contextvars.ContextVar(
    "sf_foreign_role", default=None
)


async def _gate(req: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
    """Innermost: holds the decoy's upstream call until the suite's request has joined."""
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
                await asyncio.sleep(0 if turns < 100 else 0.0005)
            if pairing.real_arrived:
                _COUNTS["decoy_aborted"] += 1
                raise _DecoyAborted
    return await handler(req)


def _forcer(middleware: SingleflightMiddleware) -> Any:
    """Outside ours: a GET/HEAD is preceded by a decoy, an identical request of the same session.

    The decoy is a request of its own (its own ClientRequest, timer and connection, one hop:
    allow_redirects=False), as a concurrent caller's would be. It carries the headers the
    session's middlewares already set and passes only ours and the gate, so those middlewares
    and raise_for_status see the suite's request alone. It leads the flight, so the suite's
    request joins it as a follower. Per-request parser limits (max_line_size...) and timeouts
    are not on the ClientRequest: the decoy has the session's.
    """

    async def force(req: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
        if _ROLE.get() is not None or req.method not in ("GET", "HEAD"):
            return await handler(req)  # the decoy itself, or a request that is never shared
        pairing = _Pairing(middleware)

        async def decoy() -> None:
            _ROLE.set((pairing, "decoy"))
            try:
                response = await req.session.request(
                    req.method,
                    req.url,
                    headers=req.headers,
                    allow_redirects=False,
                    raise_for_status=False,  # the session's callback sees the suite's only
                    middlewares=(middleware, _gate),  # not the session's own: they saw req
                    ssl=req.ssl,
                    server_hostname=req.server_hostname,
                    proxy=req.proxy,
                    proxy_auth=req.proxy_auth,
                    proxy_headers=req.proxy_headers,
                )
                response.release()
            except asyncio.CancelledError:
                raise
            except BaseException:
                pass  # the suite's request gets the same outcome, or sends itself
            finally:
                pairing.decoy_in.set()

        task = asyncio.create_task(decoy())
        try:
            await pairing.decoy_in.wait()
            token = _ROLE.set((pairing, "real"))
            try:
                response = await handler(req)
            finally:
                _ROLE.reset(token)
            await asyncio.wait_for(asyncio.shield(task), 10)
        finally:
            if not task.done():
                task.cancel()
        _COUNTS["requests"] += 1
        _COUNTS["follower" if served(response) == "follower" else "not_followed"] += 1
        return response

    return force


def _ours() -> tuple[Any, ...]:
    middleware = SingleflightMiddleware(ttl=30) if MODE == "ttl" else SingleflightMiddleware()
    _MADE.append(middleware)
    if MODE == "follower":
        return (_forcer(middleware), middleware, _gate)
    return (middleware,)


if MODE != "plain":
    _original_init = aiohttp.ClientSession.__init__

    def _init(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        _original_init(self, *args, **kwargs)
        touch()
        self._middlewares = (*self._middlewares, *_ours())

    aiohttp.ClientSession.__init__ = _init  # type: ignore[method-assign]


def _totals() -> dict[str, Any]:
    keys = ("calls", "leaders", "followers", "cache_hits", "errors", "reelections", "bypasses")
    totals = {key: 0 for key in keys}
    for middleware in _MADE:
        stats = middleware.stats
        for key in keys:
            totals[key] += getattr(stats, key)
    totals["sessions"] = len(_MADE)
    if MODE == "follower":
        totals.update(("suite_" + key, value) for key, value in _COUNTS.items())
    return totals


STATS.append(_totals)


@pytest.hookimpl(tryfirst=True)
def pytest_report_header() -> str:
    return f"singleflight foreign-suite plugin: aiohttp {aiohttp.__version__}, mode {MODE}"
