"""Errors singleflight raises on its own behalf, and how it tells an outcome from a give-up.

Hierarchy::

    Exception
    └── SingleflightError
        ├── ReentrancyError (also a RuntimeError): a flight waited on its own key
        └── FlightAbandoned: the leader gave up; call ``register`` again (OnceMap only)

Errors raised by the work itself are never wrapped: every caller of a flight gets the
leader's own exception object.
"""

from __future__ import annotations

import asyncio
from types import CodeType

__all__ = (
    "AWAITS",
    "FlightAbandoned",
    "ReentrancyError",
    "SingleflightError",
    "hash_error",
    "is_cancellation",
    "misused_do",
)


class SingleflightError(Exception):
    """Base class of the errors singleflight raises on its own behalf."""


class ReentrancyError(SingleflightError, RuntimeError):
    """A flight called its own key: waiting would deadlock, so it fails at once."""


class FlightAbandoned(SingleflightError):
    """The leader of the flight gave up (cancelled or timed out) without a result.

    Raised by ``OnceMap.wait`` / ``OnceMap.wait_blocking``: call ``register(key)`` again,
    and lead the work if it returns True.
    """


def hash_error(key: object, exc: TypeError) -> TypeError:
    """The key of a call cannot be hashed: say which, and how to give one."""
    return TypeError(
        f"singleflight key {key!r} is not hashable ({exc}); "
        "pass a hashable key, e.g. a tuple instead of a list, or give the decorator key=..."
    )


#: The code objects whose own ``await fn(...)`` may meet a sync function's value (Group's).
AWAITS: set[CodeType] = set()


def is_cancellation(exc: BaseException) -> bool:
    """Cancellation of the current task, on asyncio or on trio (without importing trio)."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    cls = type(exc)
    return cls.__name__ == "Cancelled" and cls.__module__.startswith("trio")


def misused_do(exc: BaseException, fn: object) -> BaseException:
    """The leader's ``await fn(...)`` raised ``exc``: if ``fn`` was sync work, say so.

    Only a TypeError raised by our own ``await`` (the innermost frame is Group code) counts:
    the same TypeError raised inside the work is the work's own outcome.
    """
    tb = exc.__traceback__
    if type(exc) is not TypeError or tb is None:
        return exc
    while tb.tb_next is not None:
        tb = tb.tb_next
    if tb.tb_frame.f_code not in AWAITS:
        return exc
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return TypeError(
        f"Group.do awaits async work, but {name} is sync (it ran, and returned a value "
        f"that cannot be awaited: {exc}); use group.do_sync(key, {name}, ...) for sync "
        "functions"
    )
