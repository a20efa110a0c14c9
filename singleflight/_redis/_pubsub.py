"""asyncio: one shared PubSub per tier (sharded on a cluster) and a task that wakes waiters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, final

from redis.exceptions import RedisClusterException, RedisError

__all__ = ("Listener", "Subscriptions", "deadline")

log = logging.getLogger("singleflight.redis")
_PLAIN = ("message", "subscribe", "unsubscribe")


@contextlib.asynccontextmanager
async def deadline(seconds: float | None) -> AsyncIterator[None]:
    """deadline bounds one Redis command (TimeoutError after ``seconds``; None: unbounded).

    On Python 3.10 (no ``asyncio.timeout``) it does nothing: the client's ``socket_timeout``
    bounds commands there.
    """
    if seconds is None or sys.version_info < (3, 11):
        yield
    else:
        async with asyncio.timeout(seconds):
            yield


@final
class Listener:
    """Listener is one waiter's view of a channel: ``wait`` returns on a message or a timeout."""

    __slots__ = ("channel", "_flag", "_future")

    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self._flag = False  # set by notify(), cleared by wait(); event-loop thread only
        self._future: asyncio.Future[None] | None = None

    def notify(self) -> None:
        self._flag = True
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """wait returns True when notified since the last wait, False after ``timeout``."""
        if not self._flag:
            loop = asyncio.get_running_loop()
            fut = self._future = loop.create_future()
            handle = loop.call_later(timeout, _settle, fut)
            try:
                await fut
            finally:
                handle.cancel()
                self._future = None
        notified, self._flag = self._flag, False
        return notified


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@final
class Subscriptions:
    """Subscriptions multiplexes every waiter of a process onto one PubSub connection.

    One connection per waiter would pin one pooled connection each (redis-py's PubSub holds its
    connection until ``aclose``); here ``listen`` refcounts channels, and a single reader task
    dispatches messages. ``listen`` returns only after Redis acknowledged the SUBSCRIBE, so a
    caller that re-checks state afterwards cannot miss a PUBLISH sent in between (uv #3724:
    register, then re-check). Messages lost during a reconnect are covered by the callers'
    polling; after a reconnect every listener is woken to re-check at once.
    """

    def __init__(
        self, client: Any, ack_timeout: float, send_timeout: float | None, sharded: bool = False
    ) -> None:
        self._client = client
        # Sharded (SSUBSCRIBE, on a cluster): one connection per shard, healed by redis-py
        # after a failover; polled briefly, as redis-py 8.2 holds a shard's lock per poll.
        self._sharded = sharded
        self._poll = 0.05 if sharded else 1.0
        self._kinds = ("smessage", "ssubscribe", "sunsubscribe") if sharded else _PLAIN
        self._ack_timeout = ack_timeout
        self._send_timeout = send_timeout
        self._pubsub: Any = None  # redis.asyncio.client.PubSub, created on first use
        self._lock = asyncio.Lock()  # serialises SUBSCRIBE/UNSUBSCRIBE sends
        # All below: touched on the event loop's thread only.
        self._listeners: dict[bytes, set[Listener]] = {}
        self._ready: dict[bytes, asyncio.Future[None]] = {}  # per channel: SUBSCRIBE acked
        self._acks: dict[bytes, deque[asyncio.Future[None]]] = {}  # FIFO of SUBSCRIBEs sent
        self._subscribed: set[bytes] = set()  # channels we sent SUBSCRIBE for (net)
        self._reader: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    @property
    def channels(self) -> int:
        return len(self._listeners)

    async def listen(self, channel: bytes) -> Listener:
        """listen subscribes (once per channel per process) and returns after the ack."""
        listener = Listener(channel)
        async with self._lock:
            listeners = self._listeners.get(channel)
            if listeners is None:
                listeners = self._listeners[channel] = set()
            listeners.add(listener)
            ready = self._ready.get(channel)
            if ready is None:
                try:
                    ready = await self._subscribe(channel)
                except BaseException:
                    self._drop(listener)
                    raise
        try:
            # Bounded: an ack lost to a reconnect must not hang the caller, who polls anyway.
            await asyncio.wait_for(asyncio.shield(ready), self._ack_timeout)
        except asyncio.TimeoutError:
            pass
        except BaseException:
            self.release(listener)
            raise
        return listener

    async def _subscribe(self, channel: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        self._acks.setdefault(channel, deque()).append(ready)
        try:
            async with deadline(self._send_timeout):
                if self._sharded:
                    await self._pubsub.ssubscribe(channel)
                else:
                    await self._pubsub.subscribe(channel)
        except BaseException:
            self._acks[channel].remove(ready)
            raise
        self._ready[channel] = ready
        self._subscribed.add(channel)
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(
                self._read(self._pubsub), name="singleflight-redis-pubsub"
            )
        return ready

    def release(self, listener: Listener) -> None:
        """release drops a listener; the last one of a channel unsubscribes (soon, in order)."""
        if self._drop(listener):
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    def _drop(self, listener: Listener) -> bool:
        listeners = self._listeners.get(listener.channel)
        if listeners is None:
            return False
        listeners.discard(listener)
        if listeners:
            return False
        del self._listeners[listener.channel]
        self._ready.pop(listener.channel, None)
        return True

    async def _flush(self) -> None:
        # Loops until nothing is idle: channels released while an UNSUBSCRIBE is on its way
        # are not lost (release() starts no second flusher while this one runs).
        async with self._lock:
            while True:
                idle = [c for c in self._subscribed if c not in self._listeners]
                if not idle or self._pubsub is None:  # nothing to do, or closed
                    return
                self._subscribed.difference_update(idle)
                try:
                    async with deadline(self._send_timeout):
                        if self._sharded:
                            await self._pubsub.sunsubscribe(*idle)
                        else:
                            await self._pubsub.unsubscribe(*idle)
                except (RedisError, OSError) as exc:
                    # Redis drops the subscriptions of a dead connection; redis-py would
                    # re-subscribe them on reconnect, and _read() drops them again.
                    log.debug("singleflight: UNSUBSCRIBE failed: %r", exc)

    async def _read(self, pubsub: Any) -> None:
        read = pubsub.get_sharded_message if self._sharded else pubsub.get_message
        message, subscribe, unsubscribe = self._kinds
        backoff = 0.05
        while True:
            try:
                msg = await read(timeout=self._poll)
            except asyncio.CancelledError:
                raise
            except (RedisError, RedisClusterException, OSError) as exc:
                # redis-py reconnects and re-subscribes on the next read; messages sent
                # meanwhile are lost, so wake everyone to re-check now.
                log.debug("singleflight: pub/sub connection lost: %r", exc)
                self._wake_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            except RuntimeError:  # connection not set up (closed under us)
                return
            backoff = 0.05
            if msg is None:
                # Idle and nothing left subscribed (UNSUBSCRIBE acks read): stop; the next
                # listen() starts a new reader. No await between this check and the return.
                if not self._subscribed and not pubsub.subscribed:
                    return
                continue
            kind = msg["type"]
            channel = msg["channel"]
            if kind == message or (kind == unsubscribe and channel in self._listeners):
                # (An unsubscribe while someone listens: the slot moved, or ours crossed a
                # new listen; redis-py re-subscribes, and the listeners re-check now.)
                for listener in tuple(self._listeners.get(channel, ())):
                    listener.notify()
            elif kind == subscribe:
                acks = self._acks.get(channel)
                if acks:
                    _settle(acks.popleft())
                    if not acks:
                        del self._acks[channel]
                elif channel in self._listeners:
                    # An ack nobody waits for: redis-py re-subscribed after a reconnect.
                    for listener in self._listeners[channel]:
                        listener.notify()
                else:
                    # Re-subscribed after a reconnect to a channel nobody listens to any more
                    # (its UNSUBSCRIBE was lost with the connection): drop it again.
                    self._subscribed.add(channel)
                    self._schedule_flush()

    def _wake_all(self) -> None:
        for listeners in self._listeners.values():
            for listener in tuple(listeners):
                listener.notify()

    async def aclose(self) -> None:
        """aclose stops the reader (first: see redis-py #3941) and closes the connection."""
        for task in (self._flusher, self._reader):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reader = self._flusher = None
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
        self._wake_all()
        self._listeners.clear()
        self._ready.clear()
        self._acks.clear()
        self._subscribed.clear()
