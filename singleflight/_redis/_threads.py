"""The threads I/O style of the tier: runs the protocol steps with a sync redis-py client."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from redis.exceptions import NoScriptError

from .._group import Codec
from ._core import BUSY, Core, KeyTrouble, RedisDown, classify, discard_sync
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
from ._pubsub_threads import ThreadListener, ThreadSubscriptions
from ._scripts import SCRIPTS

__all__ = ("FleetWaitTimeout", "Threads")

log = logging.getLogger("singleflight.redis")


class FleetWaitTimeout(TimeoutError):
    """The caller's budget ran out while it waited for another process's flight.

    ``singleflight_reelect``: the Group hands the local flight to a follower, which waits with
    its own budget, instead of failing every local caller with this one's timeout.
    """

    singleflight_reelect = True


class Threads:
    """Threads drives a tier's steps from any thread: one subscriber and one renewer thread.

    A blocking Redis call cannot be cancelled: its time is bounded by the client's
    ``socket_timeout`` and ``retry`` (docs/redis.md), ``timeout`` bounds waiting for a pooled
    connection.
    """

    def __init__(self, core: Core, client: Any) -> None:
        self._core = core
        self._client = client
        settings = core.settings
        self._budget = math.inf if settings.timeout is None else settings.timeout
        self._subs = ThreadSubscriptions(client, settings.poll_max, core.cluster)
        self._renewer = _Renewer(self, settings.lease_ttl / 3)
        self._freed = threading.Condition()  # notified when a command ends, for pool waiters
        self._pool_waiters = 0
        self._refreshers: set[threading.Thread] = set()
        self._closed = False

    def run(
        self,
        key: Hashable,
        produce: Callable[[], Any],
        codec: Codec[Any] | None,
        cacheable: Callable[[Any], bool] | None,
        wait: float | None = None,
    ) -> tuple[Any, str]:
        codec = DEFAULT_CODEC if codec is None else codec
        core = self._core
        keys = Keys.of(core.settings.namespace, key_digest(key))
        if core.down_until and core.skipping():
            return produce(), "leader"
        try:
            got = MISS
            if not core.settings.stale_ttl:
                got = hit(core, self.op(Get(keys.value)), codec)
                if got is not MISS and got is not UNREADABLE:
                    return got, "shared"
            deadline = math.inf if wait is None else time.monotonic() + wait
            decision = self._drive(lookup(core, keys, codec, got), deadline)
        except RedisDown as down:
            core.went_down(down)
            core.fallbacks += 1
            return produce(), "leader"
        except KeyTrouble as trouble:
            core.key_trouble(trouble)
            core.fallbacks += 1
            return produce(), "leader"
        kind = type(decision)
        if kind is Served:
            return decision.value, decision.role
        if kind is Lead:
            return self._lead(decision.lease, produce, codec, cacheable), "leader"
        if kind is Refresh:
            self._refresh(decision.lease, produce, codec, cacheable)
            return decision.value, "stale"
        return produce(), "leader"  # ALONE

    # -- running the steps ------------------------------------------------------------------

    def _drive(self, steps: Steps, deadline: float = math.inf) -> Any:
        listener: ThreadListener | None = None
        result: Any = None
        try:
            while True:
                try:
                    op = steps.send(result)
                except StopIteration as stop:
                    return stop.value
                if isinstance(op, (Eval, Get)):
                    result = self.op(op)
                elif isinstance(op, Wait):
                    assert listener is not None
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise FleetWaitTimeout(
                            "waited the caller's budget for another process's flight"
                        )
                    result = listener.wait(min(op.seconds, left))
                elif isinstance(op, Listen):
                    try:
                        listener = self._subs.listen(op.channel)
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

    def op(self, op: Get | Eval) -> Any:
        """One Redis command; errors become RedisDown or KeyTrouble."""
        try:
            result = self._attempt(op)
        except Exception as exc:
            trouble = classify(exc)
            if trouble is None:
                raise
            raise trouble from exc
        finally:
            if self._pool_waiters:  # someone waits for a pooled connection: one is free now
                with self._freed:
                    self._freed.notify_all()
        if self._core.backoff:
            self._core.answered()
        return result

    def _attempt(self, op: Get | Eval) -> Any:
        deadline = time.monotonic() + self._budget
        while True:
            try:
                if isinstance(op, Get):
                    return self._client.get(op.name)
                return self._eval(op)
            except BUSY:
                # The pool is exhausted: back-pressure, not an outage. Wait for one of our
                # commands to end (or 50 ms, for the pool's other users), within the budget.
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                with self._freed:
                    self._pool_waiters += 1
                    try:
                        self._freed.wait(min(0.05, left))
                    finally:
                        self._pool_waiters -= 1

    def _eval(self, op: Eval) -> Any:
        script = SCRIPTS[op.script]
        client = self._client
        try:
            return client.evalsha(script.sha, len(op.keys), *op.keys, *op.args)
        except NoScriptError:
            # A fresh server or a just-promoted replica: load it on this key's node only.
            if self._core.cluster:
                node = client.get_node_from_key(op.keys[0])
                client.execute_command("SCRIPT LOAD", script.text, target_nodes=node)
            else:
                client.script_load(script.text)
            return client.evalsha(script.sha, len(op.keys), *op.keys, *op.args)

    # -- leading ----------------------------------------------------------------------------

    def _lead(
        self,
        lease: Lease,
        produce: Callable[[], Any],
        codec: Codec[Any],
        cacheable: Callable[[Any], bool] | None,
    ) -> Any:
        core = self._core
        core.fleet_leads += 1
        self._renewer.add(lease)
        try:
            value = produce()
        except BaseException:
            self._renewer.remove(lease)
            self._settle(lease, bare(core, "err"), quiet=True)
            raise
        self._renewer.remove(lease)
        try:
            try:
                settled = outcome(core, value, codec, cacheable)
            except BaseException:
                self._settle(lease, bare(core, "unshared"), quiet=True)
                raise
            self._settle(lease, settled)
        except BaseException:
            discard_sync(value)  # e.g. KeyboardInterrupt while settling: nobody gets it
            raise
        return value

    def renew(self, lease: Lease) -> bool:
        """One renewal (the renewer thread's); False if the lease is not ours any more."""
        try:
            return bool(self.op(extend(self._core, lease)))
        except (RedisDown, KeyTrouble) as down:
            log.debug("singleflight: lease renewal failed: %r", down.__cause__)
            return True

    def lost(self, lease: Lease) -> None:
        self._core.lost(lease)

    def _settle(
        self, lease: Lease, settled: tuple[str, bytes, int], *, quiet: bool = False
    ) -> None:
        core = self._core
        try:
            mine = self.op(finish(core, lease, settled))
        except (RedisDown, KeyTrouble) as down:
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

    def _refresh(
        self,
        lease: Lease,
        produce: Callable[[], Any],
        codec: Codec[Any],
        cacheable: Callable[[Any], bool] | None,
    ) -> None:
        # Stale-while-revalidate in a daemon thread of the tier (joined, bounded, by close):
        # the one piece of work that outlives its caller.
        self._core.refreshes += 1

        def refresh() -> None:
            try:
                value = self._lead(lease, produce, codec, cacheable)
            except Exception as exc:
                log.debug("singleflight: stale-while-revalidate refresh failed: %r", exc)
            else:
                discard_sync(value)  # not shareable (Set-Cookie, too big): nobody reads it
            finally:
                self._refreshers.discard(thread)

        thread = threading.Thread(target=refresh, name="sf-redis-refresh", daemon=True)
        self._refreshers.add(thread)
        thread.start()

    # -- lifecycle --------------------------------------------------------------------------

    def join_refreshes(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for background refreshes to end."""
        deadline = time.monotonic() + timeout
        for thread in list(self._refreshers):
            thread.join(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        self.join_refreshes(timeout)
        self._renewer.close()
        self._subs.close()


class _Renewer:
    """One thread renews every lease this tier holds, each every ``period`` seconds."""

    def __init__(self, threads: Threads, period: float) -> None:
        self._threads = threads
        self._period = period
        self._due: dict[int, tuple[float, Lease]] = {}  # id(lease) -> (next renewal, lease)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._due[id(lease)] = (time.monotonic() + self._period, lease)
            self._cond.notify()
            if (self._thread is None or not self._thread.is_alive()) and not self._stop:
                self._thread = threading.Thread(
                    target=self._run, name="sf-redis-renew", daemon=True
                )
                self._thread.start()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._due.pop(id(lease), None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    now = time.monotonic()
                    due = [lease for at, lease in self._due.values() if at <= now]
                    if due:
                        break
                    nxt = min((at for at, _ in self._due.values()), default=None)
                    self._cond.wait(None if nxt is None else nxt - now)
                for lease in due:
                    self._due[id(lease)] = (now + self._period, lease)
            for lease in due:
                if not self._threads.renew(lease):
                    with self._cond:  # still ours to renew (not finished meanwhile): lost
                        if self._due.pop(id(lease), None) is None:
                            continue
                    self._threads.lost(lease)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(5.0)
