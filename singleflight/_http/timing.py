"""Timing: how far a flight's response has come (Progress), and a follower's own read Deadline."""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Hashable
from typing import Any, final

__all__ = (
    "Deadline",
    "Progress",
    "progress_of",
)


@final
class Progress:
    """Progress says how far a flight's upstream response has come, across its leaders.

    Each leader calls ``start()``, then counts what arrives: ``advance()`` for the headers and
    each chunk, or ``follow()`` a reader whose ``total_bytes`` grows (aiohttp). A waiting
    follower compares ``mark()``s: the furthest any leader of the flight got. It moves only when
    the response gets further than ever before, so a re-elected leader's fresh start (headers
    again) is not news, and a chain of leaders that each stall cannot keep followers waiting.
    While the mark moves the shared request is not silent, so a follower's read timeout starts
    over, as a lone caller's would with each read. Shared per flight through ``progress_of``.
    """

    __slots__ = ("__weakref__", "_best", "_count", "_reader")

    def __init__(self) -> None:
        self._best = 0  # the furthest an earlier leader got
        self._count = 0  # what the current leader counted
        self._reader: Any = None  # ... plus what this reader received

    def start(self) -> None:
        """A (new) leader sends the request: it counts from zero."""
        self._best = self.mark()
        self._count = 0
        self._reader = None

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units (bytes, or 1 for the headers) received by the leader."""
        self._count += n

    def follow(self, reader: Any) -> None:
        """Count what ``reader`` (an object whose ``total_bytes`` grows) receives, too."""
        self._reader = reader

    def mark(self) -> int:
        """The furthest any leader of the flight got; grows when the response moves on."""
        reader = self._reader
        count = self._count if reader is None else self._count + reader.total_bytes
        return count if count > self._best else self._best


_PROGRESS: weakref.WeakValueDictionary[tuple[int, Hashable], Progress] = (
    weakref.WeakValueDictionary()
)


def progress_of(group: object, key: Hashable) -> Progress:
    """The Progress of ``key``'s flight in ``group``: made on first use, shared by every
    adapter on that group (leader and followers alike), dropped when nobody holds it."""
    ref = (id(group), key)
    progress = _PROGRESS.get(ref)
    if progress is None:
        progress = _PROGRESS.setdefault(ref, Progress())
    return progress


@final
class Deadline:
    """A follower's own read timeout on asyncio: cancels its task unless disarmed.

    Both adapters arm one while a caller waits on someone else's flight: the leader's timeouts
    govern the shared request, not the follower's. It fires when the shared response has been
    silent for ``budget`` seconds (its ``Progress`` did not move in that time; without one, at
    ``budget``), and is disarmed the moment the caller leads, when the client library's own
    timeouts take over. Like ``asyncio.timeout`` (3.11+ only): cancel the task, then tell our
    cancellation from anyone else's with ``uncancel``. Setting ``deadline = math.inf`` disarms
    it (the same spelling as ``anyio.CancelScope``, so the httpx transport's ``fetch`` serves
    both).
    """

    __slots__ = ("_budget", "_fired", "_handle", "_mark", "_progress", "_task")

    def __init__(self, budget: float, progress: Progress | None = None) -> None:
        self._task = asyncio.current_task()
        self._fired = False
        self._budget = budget
        self._progress = progress
        self._mark = 0 if progress is None else progress.mark()
        self._handle = asyncio.get_running_loop().call_later(budget, self._fire)

    def _fire(self) -> None:
        progress = self._progress
        if progress is not None and progress.mark() != self._mark:
            # The shared response moved on within the last budget: a fresh read timeout.
            self._mark = progress.mark()
            self._handle = asyncio.get_running_loop().call_later(self._budget, self._fire)
        elif self._task is not None:
            self._fired = True
            self._task.cancel()

    @property
    def deadline(self) -> float:
        return math.inf if self._handle.cancelled() else self._handle.when()

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._handle.cancel()  # only ever disarmed

    def expired(self) -> bool:
        """True if our timer cancelled the task and nobody else did (then it is undone)."""
        if not self._fired or self._task is None:
            return False
        uncancel = getattr(self._task, "uncancel", None)
        return uncancel is None or uncancel() == 0  # Python 3.10 cannot tell: ours
