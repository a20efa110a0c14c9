"""Exceptions raised by singleflight itself.

Hierarchy::

    Exception
    └── SingleflightError
        ├── ReentrancyError (also a RuntimeError): a flight waited on its own key
        └── FlightAbandoned: the leader gave up; call ``register`` again (OnceMap only)

Errors raised by the work itself are never wrapped: every caller of a flight gets the
leader's own exception object.
"""

from __future__ import annotations

__all__ = ("FlightAbandoned", "ReentrancyError", "SingleflightError")


class SingleflightError(Exception):
    """Base class of the errors singleflight raises on its own behalf."""


class ReentrancyError(SingleflightError, RuntimeError):
    """A flight called its own key: waiting would deadlock, so it fails at once."""


class FlightAbandoned(SingleflightError):
    """The leader of the flight gave up (cancelled or timed out) without a result.

    Raised by ``OnceMap.wait`` / ``OnceMap.wait_blocking``: call ``register(key)`` again,
    and lead the work if it returns True.
    """
