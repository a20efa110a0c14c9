"""Observability: debug logs on ``logging.getLogger("singleflight")`` and optional OpenTelemetry.

Both cost nothing on the core's fast path: an uncontended flight emits nothing (there was
nothing to coalesce), a flight that was shared logs once when it lands, and the HTTP adapters
note each request (an HTTP round trip dwarfs a log check). Records never contain a header value
or a body: HTTP keys hold a digest of the headers, and bodies are never logged.

OpenTelemetry (the ``otel`` extra) is used only if ``opentelemetry`` is importable; then each
noted call sets ``singleflight.role`` on the current span and adds to the counters
``singleflight.calls`` (attribute ``role``), ``singleflight.flights``,
``singleflight.followers``, ``singleflight.cache_hits``, ``singleflight.bypasses`` (attribute
``reason``) and ``singleflight.reelections``.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Final

__all__ = ("logger", "note_call", "note_flight", "note_reelection")

logger: Final = logging.getLogger("singleflight")

_UNSET: Final = object()
_otel: Any = _UNSET  # lazily: None (not installed) or the _Otel instance


class _Otel:
    """The OpenTelemetry instruments, made once (the global providers may be set later)."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace

        self.trace = trace
        meter = metrics.get_meter("singleflight")
        self.calls = meter.create_counter("singleflight.calls", description="calls, by role")
        self.flights = meter.create_counter(
            "singleflight.flights", description="runs of the work (leaders)"
        )
        self.followers = meter.create_counter(
            "singleflight.followers", description="calls that joined a flight"
        )
        self.cache_hits = meter.create_counter(
            "singleflight.cache_hits", description="calls served from the TTL layer"
        )
        self.bypasses = meter.create_counter(
            "singleflight.bypasses", description="requests passed straight through, by reason"
        )
        self.reelections = meter.create_counter(
            "singleflight.reelections", description="flights handed to a follower"
        )


def _instruments() -> _Otel | None:
    global _otel
    if _otel is _UNSET:
        _otel = _Otel() if importlib.util.find_spec("opentelemetry") is not None else None
    return _otel  # type: ignore[no-any-return]


def note_call(role: str, reason: str | None = None, *, what: str = "call") -> None:
    """Record how one call was served: a role, or ``"bypass"`` with its reason."""
    if logger.isEnabledFor(logging.DEBUG):
        if reason is None:
            logger.debug("%s served as %s", what, role)
        else:
            logger.debug("%s bypassed: %s", what, reason)
    otel = _instruments()
    if otel is None:
        return
    otel.trace.get_current_span().set_attribute("singleflight.role", role)
    otel.calls.add(1, {"role": role})
    if role == "leader":
        otel.flights.add(1)
    elif role == "follower":
        otel.followers.add(1)
    elif role == "cache":
        otel.cache_hits.add(1)
    elif role == "bypass":
        otel.bypasses.add(1, {"reason": reason or "unknown"})


def note_flight(key: object, followers: int) -> None:
    """A flight shared with ``followers`` callers landed (logged at debug level)."""
    if followers and logger.isEnabledFor(logging.DEBUG):
        logger.debug("flight %r landed: 1 leader, %d follower(s)", key, followers)


def note_reelection(key: object, exc: BaseException) -> None:
    """The leader of ``key`` gave up (``exc``); a follower takes the flight over."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("flight %r: leader gave up (%s); re-electing", key, type(exc).__name__)
    otel = _instruments()
    if otel is not None:
        otel.reelections.add(1)
