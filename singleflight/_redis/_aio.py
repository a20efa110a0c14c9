"""The asyncio I/O style of the tier: runs the protocol steps with a redis.asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, final

from redis.exceptions import NoScriptError

from .._group import Codec
from ._core import BUSY, Core, KeyTrouble, RedisDown, classify, discard_async
from ._format import DEFAULT_CODEC, Keys, key_digest
from ._protocol import (
    MISS,
    UNLISTEN,
    UNREADABLE,
    Eval,
    Get,
    Lead,
    Lease,
    Listen,
    Refresh,
    Served,
    Steps,
    Wait,
    bare,
    extend,
    finish,
    hit,
    lookup,
    outcome,
)
from ._pubsub import Listener, Subscriptions
from ._scripts import SCRIPTS

__all__ = ("AsyncIO",)

log = logging.getLogger("singleflight.redis")


@final
@dataclass(slots=True)
class _Orphan:
    lease: Lease
    handle: asyncio.TimerHandle


class AsyncIO:
    """AsyncIO drives a tier's steps on one event loop (the client's), with tasks for renewals."""

    def __init__(self, core: Core, client: Any) -> None:
        self._core = core
        self._client = client
        settings = core.settings
        self._timeout = settings.timeout if sys.version_info >= (3, 11) else None
        self._subs = Subscriptions(
            client, ack_timeout=settings.poll_max, send_timeout=settings.timeout,
            sharded=core.cluster,
        )  # fmt: skip
        # How long a cancelled leader's lease waits for a local re-elected leader to adopt it.
        self._grace = min(0.1, settings.lease_ttl / 4)
        # Below: touched only on the event loop's thread.
        self._orphans: dict[str, _Orphan] = {}  # lease name -> lease of a cancelled leader
        self.tasks: set[asyncio.Task[Any]] = set()  # renewals and SWR refreshes
        self._cleanups: set[asyncio.Task[Any]] = set()  # lease releases (awaited on aclose)
        self._freed: asyncio.Event | None = None  # set when a command ends, for pool waiters
        # Test hook: awaited between a failed LOOKUP and SUBSCRIBE (the subscribe race).
        self.before_subscribe: Callable[[], Awaitable[None]] | None = None

    async def run(
        self,
        key: Hashable,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any] | None,
        cacheable: Callable[[Any], bool] | None,
    ) -> tuple[Any, str]:
        codec = DEFAULT_CODEC if codec is None else codec
        core = self._core
        keys = Keys.of(core.settings.namespace, key_digest(key))
        orphan = self._orphans.pop(keys.lease, None)
        if orphan is not None:
            # A cancelled leader of this process left its lease a moment ago (DESIGN.md:
            # re-election): the re-elected local leader carries on with it.
            orphan.handle.cancel()
            return await self._lead(orphan.lease, produce, codec, cacheable), "leader"
        if core.down_until and core.skipping():
            return await produce(), "leader"
        try:
            got = MISS
            if not core.settings.stale_ttl:
                got = hit(core, await self._op(Get(keys.value)), codec)
                if got is not MISS and got is not UNREADABLE:
                    return got, "shared"
            decision = await self._drive(lookup(core, keys, codec, got))
        except RedisDown as down:
            core.went_down(down)
            core.fallbacks += 1
            return await produce(), "leader"
        except KeyTrouble as trouble:
            core.key_trouble(trouble)
            core.fallbacks += 1
            return await produce(), "leader"
        kind = type(decision)
        if kind is Served:
            return decision.value, decision.role
        if kind is Lead:
            return await self._lead(decision.lease, produce, codec, cacheable), "leader"
        if kind is Refresh:
            self._refresh(decision.lease, produce, codec, cacheable)
            return decision.value, "stale"
        return await produce(), "leader"  # ALONE

    # -- running the steps ------------------------------------------------------------------

    async def _drive(self, steps: Steps) -> Any:
        listener: Listener | None = None
        result: Any = None
        try:
            while True:
                try:
                    op = steps.send(result)
                except StopIteration as stop:
                    return stop.value
                if isinstance(op, (Eval, Get)):
                    result = await self._op(op)
                elif isinstance(op, Wait):
                    assert listener is not None
                    result = await listener.wait(op.seconds)
                elif isinstance(op, Listen):
                    if self.before_subscribe is not None:
                        await self.before_subscribe()
                    try:
                        listener = await self._subs.listen(op.channel)
                    except Exception as exc:
                        trouble = classify(exc)
                        if trouble is None:
                            raise
                        raise trouble from exc
                    result = None
                elif op is UNLISTEN:
                    if listener is not None:
                        self._subs.release(listener)
                    listener = result = None
        finally:
            if listener is not None:
                self._subs.release(listener)
            steps.close()

    async def _op(self, op: Get | Eval) -> Any:
        """One Redis command within ``timeout``; errors become RedisDown or KeyTrouble."""
        try:
            if self._timeout is None or sys.version_info < (3, 11):
                result = await self._attempt(op)
            else:
                async with asyncio.timeout(self._timeout):
                    try:  # the first attempt inline: one coroutine less on an L2 hit
                        if isinstance(op, Get):
                            result = await self._client.get(op.name)
                        else:
                            result = await self._eval(op)
                    except BUSY:
                        result = await self._attempt(op)
        except Exception as exc:
            trouble = classify(exc)
            if trouble is None:
                raise
            raise trouble from exc
        finally:
            freed = self._freed
            if freed is not None:  # someone waits for a pooled connection: one is free now
                self._freed = None
                freed.set()
        if self._core.backoff:
            self._core.answered()
        return result

    async def _attempt(self, op: Get | Eval) -> Any:
        loop = asyncio.get_running_loop()
        budget = self._core.settings.timeout  # (3.10 has no asyncio.timeout around us)
        deadline = math.inf if budget is None else loop.time() + budget
        while True:
            try:
                if isinstance(op, Get):
                    return await self._client.get(op.name)
                return await self._eval(op)
            except BUSY:
                # The pool is exhausted: back-pressure, not an outage. Wait for one of our
                # commands to end (or 50 ms, for the pool's other users), within the budget.
                if loop.time() >= deadline:
                    raise
                if self._freed is None:
                    self._freed = asyncio.Event()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), 0.05)

    async def _eval(self, op: Eval) -> Any:
        script = SCRIPTS[op.script]
        client = self._client
        try:
            return await client.evalsha(script.sha, len(op.keys), *op.keys, *op.args)
        except NoScriptError:
            # A fresh server or a just-promoted replica. Load it on this key's node only (a
            # cluster client's SCRIPT LOAD goes to every primary and fails if one is down).
            if self._core.cluster:
                node = client.get_node_from_key(op.keys[0])
                await client.execute_command("SCRIPT LOAD", script.text, target_nodes=node)
            else:
                await client.script_load(script.text)
            return await client.evalsha(script.sha, len(op.keys), *op.keys, *op.args)

    # -- leading ----------------------------------------------------------------------------

    async def _lead(
        self,
        lease: Lease,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any],
        cacheable: Callable[[Any], bool] | None,
    ) -> Any:
        core = self._core
        core.fleet_leads += 1
        renewal = self._spawn(self._renew(lease), self.tasks)
        try:
            value = await produce()
        except asyncio.CancelledError:
            renewal.cancel()
            self._park(lease)
            raise
        except BaseException:
            renewal.cancel()
            await self._settle(lease, bare(core, "err"), quiet=True)
            raise
        renewal.cancel()
        try:
            try:
                settled = outcome(core, value, codec, cacheable)
            except BaseException:
                # Not storable: let the followers make their own calls, and tell our caller why.
                await self._settle(lease, bare(core, "unshared"), quiet=True)
                raise
            await self._settle(lease, settled)
        except BaseException:
            await discard_async(value)  # e.g. cancelled while settling: nobody gets it
            raise
        return value

    async def _renew(self, lease: Lease) -> None:
        period = self._core.settings.lease_ttl / 3
        while True:
            await asyncio.sleep(period)
            try:
                ok = await self._op(extend(self._core, lease))
            except (RedisDown, KeyTrouble) as down:
                log.debug("singleflight: lease renewal failed: %r", down.__cause__)
                continue
            if not ok:
                self._core.lost(lease)
                return

    async def _settle(
        self, lease: Lease, settled: tuple[str, bytes, int], *, quiet: bool = False
    ) -> None:
        """FINISH. ``quiet``: never raise, even with ``fail_open=False`` (error and cleanup
        paths, where the caller's own exception, or none, must win)."""
        core = self._core
        try:
            mine = await self._op(finish(core, lease, settled))
        except (RedisDown, KeyTrouble) as down:
            # Followers find the lease gone once it expires and take over (or fall back).
            if quiet:
                core.redis_errors += 1
                log.debug("singleflight: FINISH failed: %r", down.__cause__)
            elif isinstance(down, RedisDown):
                core.went_down(down)
            else:
                core.key_trouble(down)
            return
        if not mine:
            core.lost(lease)

    def _park(self, lease: Lease) -> None:
        # Our run was cancelled. The Group re-elects a local follower, which calls run() again
        # at once: keep the lease for it (it adopts the orphan). If nobody does within the
        # grace period, release the lease and publish "abandon" so another process takes over
        # now rather than after lease_ttl.
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self._grace, self._abandon, lease)
        self._orphans[lease.keys.lease] = _Orphan(lease, handle)

    def _abandon(self, lease: Lease) -> None:
        orphan = self._orphans.get(lease.keys.lease)
        if orphan is not None and orphan.lease is lease:
            del self._orphans[lease.keys.lease]
            self._spawn(
                self._settle(lease, bare(self._core, "abandon"), quiet=True), self._cleanups
            )

    def _refresh(
        self,
        lease: Lease,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any],
        cacheable: Callable[[Any], bool] | None,
    ) -> None:
        # Stale-while-revalidate: the caller gets the stale value now; this process won the
        # fleet-wide refresh lease, so it refreshes in a task of the tier (cancelled by
        # aclose). Trade-off: this is the one piece of work that outlives its caller, which
        # SWR requires; its produce() must not depend on the caller still being there.
        self._core.refreshes += 1

        async def refresh() -> None:
            try:
                value = await self._lead(lease, produce, codec, cacheable)
            except Exception as exc:
                log.debug("singleflight: stale-while-revalidate refresh failed: %r", exc)
                return
            await discard_async(value)  # not shareable (Set-Cookie, too big): nobody reads it

        self._spawn(refresh(), self.tasks)

    # -- lifecycle --------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any], into: set[asyncio.Task[Any]]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        into.add(task)
        task.add_done_callback(into.discard)
        return task

    async def aclose(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for orphan in list(self._orphans.values()):
            orphan.handle.cancel()
            self._orphans.pop(orphan.lease.keys.lease, None)
            await self._settle(orphan.lease, bare(self._core, "abandon"), quiet=True)
        await asyncio.gather(*list(self._cleanups), return_exceptions=True)
        await self._subs.aclose()
