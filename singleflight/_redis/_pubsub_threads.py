"""Threads: one shared PubSub per tier (sharded on a cluster), read by one subscriber thread."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, final

from redis.exceptions import RedisClusterException, RedisError

__all__ = ("ThreadListener", "ThreadSubscriptions")

log = logging.getLogger("singleflight.redis")


@final
class ThreadListener:
    """One waiting thread's view of a channel: ``wait`` returns on a message or a timeout."""

    __slots__ = ("channel", "_event")

    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self._event = threading.Event()

    def notify(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """True when notified since the last wait, False after ``timeout`` (caller re-checks)."""
        notified = self._event.wait(timeout)
        self._event.clear()
        return notified


@final
class ThreadSubscriptions:
    """ThreadSubscriptions multiplexes every waiting thread of a tier onto one PubSub.

    redis-py's PubSub is not thread-safe, so: every SUBSCRIBE/UNSUBSCRIBE is sent under one
    lock (the first opens the connection, under it too), and only the subscriber thread reads.
    ``listen`` returns after Redis acknowledged the SUBSCRIBE (or ``ack_timeout``), so the
    caller's re-check cannot miss a PUBLISH sent in between. After a read error every listener
    is woken to re-check. The thread starts with the first ``listen`` and ends in ``close``.
    """

    def __init__(
        self, client: Any, ack_timeout: float, sharded: bool, *, name: str = "sf-redis-sub"
    ) -> None:
        self._client = client
        self._ack_timeout = ack_timeout
        self._sharded = sharded
        # redis-py 8.2 holds a shard's lock while it polls it: poll briefly on a cluster.
        self._poll = 0.05 if sharded else 0.5
        self._kinds = (
            ("smessage", "ssubscribe", "sunsubscribe")
            if sharded
            else ("message", "subscribe", "unsubscribe")
        )
        self._name = name
        self._pubsub: Any = None
        self._lock = threading.Lock()  # every PubSub write, and the maps below
        self._listeners: dict[bytes, set[ThreadListener]] = {}
        self._acks: dict[bytes, deque[threading.Event]] = {}  # FIFO of SUBSCRIBEs sent
        self._ready: dict[bytes, threading.Event] = {}  # per channel: SUBSCRIBE acked
        self._idle: set[bytes] = set()  # released channels, unsubscribed by the reader
        self._stop = threading.Event()
        self._work = threading.Event()  # set by listen() and close(): the reader has work
        self._thread: threading.Thread | None = None

    @property
    def channels(self) -> int:
        return len(self._listeners)

    def listen(self, channel: bytes) -> ThreadListener:
        """listen subscribes (once per channel per tier) and returns after the ack."""
        listener = ThreadListener(channel)
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("the RedisTier is closed")
            listeners = self._listeners.setdefault(channel, set())
            listeners.add(listener)
            ready = self._ready.get(channel)
            if ready is None:
                ready = threading.Event()
                acks = self._acks.setdefault(channel, deque())
                acks.append(ready)
                try:
                    if self._pubsub is None:
                        self._pubsub = self._client.pubsub()
                    if self._sharded:
                        self._pubsub.ssubscribe(channel)
                    else:
                        self._pubsub.subscribe(channel)
                except BaseException:
                    acks.remove(ready)
                    self._drop(listener)
                    raise
                self._ready[channel] = ready
                if self._thread is None or not self._thread.is_alive():  # (or lost to a fork)
                    self._thread = threading.Thread(target=self._read, name=self._name, daemon=True)
                    self._thread.start()
        self._work.set()
        # Bounded: an ack lost to a reconnect must not hang the caller, who polls anyway.
        ready.wait(self._ack_timeout)
        return listener

    def release(self, listener: ThreadListener) -> None:
        """release drops a listener; the subscriber thread unsubscribes a channel left idle.

        Not this thread: redis-py 8.2 holds a shard's lock while the subscriber polls it, so an
        SUNSUBSCRIBE sent from here would wait for the poll (~0.1 s measured).
        """
        with self._lock:
            if self._drop(listener):
                self._idle.add(listener.channel)

    def _flush_idle(self) -> None:  # on the subscriber thread, between polls
        with self._lock:
            for channel in self._idle:
                if channel not in self._listeners:
                    self._unsubscribe(channel)
            self._idle.clear()

    def _unsubscribe(self, channel: bytes) -> None:  # under self._lock
        if self._pubsub is None:
            return
        try:
            if self._sharded:
                self._pubsub.sunsubscribe(channel)
            else:
                self._pubsub.unsubscribe(channel)
        except (RedisError, OSError) as exc:
            # The connection is gone: Redis dropped its subscriptions with it.
            log.debug("singleflight: UNSUBSCRIBE failed: %r", exc)

    def _drop(self, listener: ThreadListener) -> bool:
        listeners = self._listeners.get(listener.channel)
        if listeners is None:
            return False
        listeners.discard(listener)
        if listeners:
            return False
        del self._listeners[listener.channel]
        self._ready.pop(listener.channel, None)
        self._acks.pop(listener.channel, None)  # a late ack finds nobody: unsubscribed again
        return True

    def _read(self) -> None:
        pubsub = self._pubsub
        read = pubsub.get_sharded_message if self._sharded else pubsub.get_message
        message, subscribe, unsubscribe = self._kinds
        while not self._stop.is_set():
            if self._idle:
                self._flush_idle()
            if not self._listeners and not self._acks:
                # Nobody waits: sleep until a listen() (redis-py 8.1's sharded read returns at
                # once with nothing subscribed; polling here would spin).
                self._work.wait(1.0)
                self._work.clear()
                continue
            try:
                msg = read(timeout=self._poll)
            except (RedisError, RedisClusterException, OSError, ValueError, AttributeError) as exc:
                # redis-py reconnects and re-subscribes on the next read; messages sent
                # meanwhile are lost, so wake everyone to re-check now. (ValueError,
                # AttributeError: a socket closed under the read by close().)
                if self._stop.is_set():
                    break
                log.debug("singleflight: pub/sub connection lost: %r", exc)
                self._wake_all()
                self._stop.wait(0.1)
                continue
            if msg is None:
                continue
            kind, channel = msg["type"], msg["channel"]
            with self._lock:
                if kind == message or (kind == unsubscribe and channel in self._listeners):
                    for listener in tuple(self._listeners.get(channel, ())):
                        listener.notify()
                elif kind == subscribe:
                    acks = self._acks.get(channel)
                    if acks:
                        acks.popleft().set()
                        if not acks:
                            del self._acks[channel]
                    elif channel in self._listeners:  # re-subscribed after a reconnect
                        for listener in self._listeners[channel]:
                            listener.notify()
                    else:  # re-subscribed to a channel nobody listens to: drop it again
                        self._unsubscribe(channel)
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
        try:
            pubsub.close()  # after the last read, on the reading thread
        except (RedisError, OSError) as exc:
            log.debug("singleflight: closing the pub/sub connection failed: %r", exc)

    def _wake_all(self) -> None:
        with self._lock:
            for listeners in self._listeners.values():
                for listener in tuple(listeners):
                    listener.notify()

    def close(self, timeout: float = 2.0) -> None:
        """close stops the subscriber thread (within about one poll) and closes its PubSub."""
        with self._lock:
            self._stop.set()
            self._work.set()
            thread = self._thread
            if thread is None and self._pubsub is not None:
                pubsub, self._pubsub = self._pubsub, None
                pubsub.close()
        if thread is not None:
            thread.join(timeout)
        self._wake_all()
