"""Live: one flight's body as it arrives, kept for its readers, each reading at its own pace.

A ``Log`` holds the chunks of one upstream body in order, with the readers' positions in it.
Readers ``join`` (from byte 0), ``take`` the next chunk they have not seen, and ``leave``; an
adapter's puller ``append``s what the upstream sends and ``finish``es it (EOF or an error, which
each reader meets where it reads). While the body is within ``limit`` every chunk is kept, so a
late joiner replays from the start; past it, joiners are refused (they make their own request)
and chunks every reader has passed are dropped: memory is bounded by the slowest reader's lag,
not by the number of readers. ``cond`` guards it all (readers may be threads); nothing blocks
while holding it. The registry (``live_of``) lets a later caller of the same key find the log
while it still admits joiners. Client-independent: the httpx adapter reads with it; aiohttp can.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any, final

__all__ = ("Log", "Reader", "live_of", "publish", "unpublish")


@final
class Reader:
    """One caller's place in a Log: the absolute index of its next chunk."""

    __slots__ = ("open", "pos")

    def __init__(self) -> None:
        self.pos = 0
        self.open = True


@final
class Log:
    """Log is one flight's body as it arrives (see the module docstring)."""

    __slots__ = ("_base", "_chunks", "_readers", "closed", "cond", "done", "error", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.cond = threading.Condition()
        self.limit = limit
        self.size = 0
        self.done = False  # the upstream body ended (EOF)
        self.error: BaseException | None = None  # ... or failed: each reader meets it in turn
        self.closed = False  # the last reader left before the end: the upstream is closed
        self._chunks: list[bytes] = []
        self._base = 0  # absolute index of _chunks[0] (chunks before it were dropped)
        self._readers: list[Reader] = []

    @property
    def admitting(self) -> bool:
        """May a new reader join (every byte from the start is still here)?"""
        return (
            not self.closed and self.error is None and self._base == 0 and self.size <= self.limit
        )

    @property
    def ended(self) -> bool:
        return self.done or self.error is not None or self.closed

    def join(self) -> Reader | None:
        """A new reader from byte 0, or None if the log no longer admits joiners."""
        with self.cond:
            if not self.admitting:
                return None
            reader = Reader()
            self._readers.append(reader)
            return reader

    def take(self, reader: Reader) -> bytes | None:
        """The reader's next chunk, or None if it has all that arrived so far."""
        with self.cond:
            i = reader.pos - self._base
            if i >= len(self._chunks):
                return None
            reader.pos += 1
            chunk = self._chunks[i]
            if not self.admitting:
                self._trim()
            return chunk

    def mark(self) -> int:
        """How many chunks have arrived: grows while the upstream sends."""
        return self._base + len(self._chunks)

    def append(self, chunk: bytes) -> None:
        with self.cond:
            self._chunks.append(chunk)
            self.size += len(chunk)
            if not self.admitting:
                self._trim()
            self.cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        """The upstream body ended (``error`` None) or failed."""
        with self.cond:
            if error is None:
                self.done = True
            else:
                self.error = error
            self.cond.notify_all()

    def leave(self, reader: Reader) -> bool:
        """The reader closed its response. True if it was the last one and the body goes on."""
        with self.cond:
            if not reader.open:
                return False
            reader.open = False
            self._readers.remove(reader)
            if not self._readers and not self.ended:
                self.closed = True
                self.cond.notify_all()
                return True
            if not self.admitting:
                self._trim()
            return False

    @property
    def readers(self) -> int:
        return len(self._readers)

    def body(self) -> bytes | None:
        """The whole body, if it ended cleanly and every byte is still here."""
        with self.cond:
            if not self.done or self._base != 0 or self.error is not None:
                return None
            return b"".join(self._chunks)

    def _trim(self) -> None:
        """Drop the chunks every reader has passed (no joiner will ever need them)."""
        low = min((r.pos for r in self._readers), default=self.mark())
        drop = low - self._base
        if drop > 0:
            del self._chunks[:drop]
            self._base = low


_LIVE: dict[tuple[int, Hashable], Any] = {}
_LIVE_LOCK = threading.Lock()


def publish(group: object, key: Hashable, live: Any) -> None:
    """Make ``live`` (an adapter's live response around a Log) findable by later callers."""
    with _LIVE_LOCK:
        _LIVE[(id(group), key)] = live


def unpublish(group: object, key: Hashable, live: Any) -> None:
    """Forget ``live`` (if it is still the one published for ``key``)."""
    with _LIVE_LOCK:
        if _LIVE.get((id(group), key)) is live:
            del _LIVE[(id(group), key)]


def live_of(group: object, key: Hashable) -> Any:
    """The live response published for ``key`` in ``group``, or None."""
    if not _LIVE:  # the common case: nothing streams live now (no tuple, no key hash)
        return None
    return _LIVE.get((id(group), key))
