"""Re-entrancy: a flight whose own work waits on its key fails at once instead of deadlocking."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Hashable
from types import FrameType
from typing import Any, TypeVar

from ._errors import ReentrancyError
from ._waiters import Flight

__all__ = ("SYNC_LEADERS", "is_reentrant", "reentrancy_error", "runs_flight")


# ids of the code objects of functions that lead flights. Ids, not the code objects: hashing a
# code object hashes its whole bytecode, which would cost more than the rest of the walk.
_FLIGHT_CODES: set[int] = set()


_F = TypeVar("_F", bound=Callable[..., Any])


def runs_flight(fn: _F) -> _F:
    """Register a function whose local ``flight`` is the flight it is leading (re-entrancy)."""
    _FLIGHT_CODES.add(id(fn.__code__))  # the function lives as long as the module
    return fn


#: How many ``do_sync`` leaders run now, in any thread (guarded by the GIL: one-statement
#: updates). While it is 0, an async follower only needs to walk its own coroutine frames.
SYNC_LEADERS = [0]
_CO_ASYNC = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR


def is_reentrant(flight: Flight, *, whole_stack: bool = False, depth: int = 2) -> bool:
    """True if the current call stack is already leading ``flight`` (it would wait on itself).

    Leaders pay nothing for this: only a follower walks its own stack, looking for a frame that
    leads the very flight it is about to wait on. An async follower stops at the first frame
    that is not a coroutine (the edge of its task) unless a sync leader is running somewhere.
    A child task spawned by the work is not on this stack, so it is not caught (documented
    in how-it-works). ``depth``: the frames to skip (this one, the caller's own, ...): reading
    a frame's locals is the expensive part, and the follower's own frames never lead.
    """
    frame: FrameType | None = sys._getframe(depth)
    whole_stack = whole_stack or SYNC_LEADERS[0] > 0
    codes = _FLIGHT_CODES
    while frame is not None:
        code = frame.f_code
        if id(code) in codes and frame.f_locals.get("flight") is flight:
            return True
        if not whole_stack and not code.co_flags & _CO_ASYNC:
            return False
        frame = frame.f_back
    return False


def reentrancy_error(key: Hashable) -> ReentrancyError:
    return ReentrancyError(
        f"the work for key {key!r} waited on its own key, which would deadlock; "
        "give the inner call a different key, or call the function directly"
    )
