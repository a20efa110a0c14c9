"""The in-flight map: at most one flight per key, its waiters woken wherever they live.

A *flight* is a plain ``list`` of waiters, registered in the map with one atomic
``dict.setdefault``. An uncontended flight therefore costs one empty list, one insert and
one delete, and nothing else: no lock, no future, no task (see docs/how-it-works.md).

Invariants (they are what makes the lock-free fast path safe):

* **Ownership.** Only the leader that owns a key's slot ever removes or replaces it. Nobody
  else deletes or overwrites an entry; ``forget`` marks a flight instead of removing it
  (golang/go#31420: a stale leader must never remove a newer flight's entry).
* **Register, then re-check** (uv #3724, the lost wake-up). A follower appends its waiter
  to the flight *first* and only then checks that the flight still owns the key. The leader
  removes the key *first* and only then looks at its waiter list. Under the GIL these two
  orders cannot both miss each other, so no waiter is ever left behind.
* **Atomic landing** (Go CL 436495). Once the key has left the map nobody can join the old
  flight; a caller arriving later starts a new one and never sees a finished result.

The waiters themselves (futures, threads, trio) live in ``_waiters``; re-entrancy detection
in ``_reentrancy``.
"""

from __future__ import annotations

import threading
from asyncio.events import _get_running_loop
from collections.abc import Hashable
from typing import Any, Generic, TypeVar, cast, final

from ._errors import FlightAbandoned
from ._observe import note_flight
from ._reentrancy import is_reentrant, reentrancy_error
from ._waiters import (
    ALONE,
    ERROR,
    FORGOTTEN,
    LEAD,
    REELECT,
    SIGNAL,
    VALUE,
    Flight,
    _offer_lead,
    _ThreadWaiter,
    _Waiter,
    new_waiter,
    wait_for_outcome,
    wake,
)

__all__ = ("FORGOTTEN", "Lead", "OnceMap")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@final
class Lead(Generic[K, V]):
    """Lead is a leader's hold on the one flight it registered: land it exactly once.

    ``OnceMap.register`` returns a Lead to the caller that must run the work. ``done``,
    ``fail`` or ``abandon`` end *this* flight, whatever happened to the key meanwhile (after
    ``forget`` a key can have several flights; each leader lands its own). A Lead is truthy.
    """

    __slots__ = ("_flight", "_map", "key")

    def __init__(self, owner: OnceMap[K, V], key: K, flight: Flight) -> None:
        self._map = owner
        self.key = key
        self._flight = flight

    def __bool__(self) -> bool:
        return True

    def done(self, value: V) -> None:
        """Publish ``value`` to this flight's waiters and end it."""
        self._map._land_lead(self.key, self._flight, VALUE, value)

    def fail(self, exc: BaseException) -> None:
        """Publish ``exc`` to this flight's waiters and end it."""
        self._map._land_lead(self.key, self._flight, ERROR, exc)

    def abandon(self) -> None:
        """End this flight without a result; its waiters get ``FlightAbandoned``."""
        self._map._land_lead(self.key, self._flight, SIGNAL, REELECT)

    def __repr__(self) -> str:
        return f"<Lead of {self.key!r}>"


class OnceMap(Generic[K, V]):
    """OnceMap is the in-flight map: one flight per key, and every waiter gets its outcome.

    The protocol (uv's ``uv-once-map``), the whole interface:

    * ``lead = register(key)``: a ``Lead`` for exactly one caller, the leader (None for the
      others). The leader runs the work and ends *its* flight with ``lead.done(value)``,
      ``lead.fail(exc)`` or ``lead.abandon()``, or its waiters wait forever (as in uv).
    * ``await wait(key)`` / ``wait_blocking(key, timeout)``: follow the flight of ``key`` and
      get the leader's value or exception (``FlightAbandoned`` if it gave up).
    * ``forget(key)``: later callers start a new flight; current waiters keep the old one.
    * ``done(key, v)`` / ``fail(key, e)`` / ``abandon(key)``: shorthands that land the key's
      only flight (a ``ValueError`` if ``forget`` left it more than one: use the Lead).

    Thread-safe; waiters may live on any event loop (asyncio or trio) or thread. A key leaves
    the map as its flight lands: nothing is memoised.
    """

    __slots__ = ("_flights", "_lock", "_next", "_registered")

    def __init__(self) -> None:
        self._flights: dict[Any, Flight] = {}  # key -> head flight; written by its owner only
        self._lock = threading.Lock()  # guards joins, forget, _next and locked landings
        # id(forgotten flight) -> the flight that new callers use instead (None: none yet).
        self._next: dict[int, Flight | None] = {}  # guarded by self._lock
        # Flights led through register() and not landed yet, oldest first, per key (guarded
        # by self._lock): what the keyed shorthands (done(key, v)...) land.
        self._registered: dict[Any, list[Flight]] = {}

    def __len__(self) -> int:
        """The number of keys in flight now (a forgotten key that started again counts once)."""
        return len(self._flights)

    def __contains__(self, key: object) -> bool:
        return key in self._flights

    # -- the protocol ------------------------------------------------------------------

    def register(self, key: K) -> Lead[K, V] | None:
        """Register ``key``; return a ``Lead`` if the caller is now its leader, else None.

        The leader must end the flight with ``lead.done``, ``lead.fail`` or ``lead.abandon``,
        or its waiters wait forever (as in uv).
        """
        while True:
            flight: Flight = []
            head = self._flights.setdefault(key, flight)
            if head is flight:
                with self._lock:
                    self._registered.setdefault(key, []).append(flight)
                return Lead(self, key, flight)
            joined, lead = self.join(key, head, None)
            if joined is not None:
                if not lead:
                    return None
                with self._lock:
                    self._registered.setdefault(key, []).append(joined)
                return Lead(self, key, joined)

    def done(self, key: K, value: V) -> None:
        """Publish ``value`` to the waiters of ``key``'s only flight and end it."""
        self.land(key, self._take(key), VALUE, value)

    def fail(self, key: K, exc: BaseException) -> None:
        """Publish ``exc`` to the waiters of ``key``'s only flight and end it."""
        self.land(key, self._take(key), ERROR, exc)

    def abandon(self, key: K) -> None:
        """End ``key``'s only flight without a result; its waiters get ``FlightAbandoned``."""
        self.land(key, self._take(key), SIGNAL, REELECT)

    async def wait(self, key: K) -> V:
        """Wait for the flight of ``key`` and return its value (or raise its exception).

        Raises ``KeyError`` if ``key`` is not in flight, ``FlightAbandoned`` if its leader gave up.
        """
        head = self._flights.get(key)
        waiter = new_waiter()
        joined = None if head is None else self.join(key, head, waiter, follow_only=True)[0]
        if joined is None:
            raise KeyError(f"{key!r} is not in flight; call register(key) first")
        if is_reentrant(joined):
            self.leave(joined, waiter)
            raise reentrancy_error(key)
        result = await wait_for_outcome(self, key, joined, waiter)
        if result is LEAD:
            self.resign(key, joined, result)
        if result is REELECT or result is ALONE or result is LEAD:
            raise FlightAbandoned(f"the leader of {key!r} gave up; call register(key) again")
        return cast(V, result)

    def wait_blocking(self, key: K, timeout: float | None = None) -> V:
        """Block this thread until the flight of ``key`` lands; like ``wait``.

        Raises ``TimeoutError`` after ``timeout`` seconds (the flight goes on without you).
        """
        head = self._flights.get(key)
        waiter = _ThreadWaiter()
        joined = None if head is None else self.join(key, head, waiter, follow_only=True)[0]
        if joined is None:
            raise KeyError(f"{key!r} is not in flight; call register(key) first")
        if is_reentrant(joined, whole_stack=True):
            self.leave(joined, waiter)
            raise reentrancy_error(key)
        if not waiter.lock.acquire(timeout=-1 if timeout is None else timeout):
            if self.leave(joined, waiter):
                raise TimeoutError(f"{key!r} did not land within {timeout} s")
            waiter.lock.acquire()  # an outcome is on its way: it is released right after
        result = waiter.outcome()
        if result is LEAD:
            self.resign(key, joined, result)
        if result is REELECT or result is ALONE or result is LEAD:
            raise FlightAbandoned(f"the leader of {key!r} gave up; call register(key) again")
        return cast(V, result)

    def forget(self, key: K) -> None:
        """Callers that come after this start a new flight; current waiters keep the old one."""
        with self._lock:
            head = self._flights.get(key)
            if head is None:
                return
            current: Flight | None = head
            while current is not None and id(current) in self._next:
                current = self._next[id(current)]
            if current is not None:  # None: forgotten already and no newer flight yet
                current.append(FORGOTTEN)  # its leader now lands on the locked path
                self._next[id(current)] = None
                if current is head and self._flights.get(key) is not head:
                    # The head landed on its lock-free path while we looked (mark first, then
                    # re-check, as a follower does): there is nothing left to forget. Undo, or
                    # the stale mark would outlive the flight and its id could be reused.
                    current.remove(FORGOTTEN)
                    del self._next[id(current)]

    # -- the machinery the Group shares --------------------------------------------------

    def _take(self, key: K) -> Flight:
        """The one flight of ``key`` led through ``register()`` that has not landed."""
        with self._lock:
            flights = self._registered.get(key)
            if not flights:
                raise KeyError(f"{key!r} was not registered by this map's register()")
            if len(flights) > 1:
                raise ValueError(
                    f"{key!r} has {len(flights)} flights (forget() started a new one): land "
                    "each through the Lead its register() returned (lead.done(value))"
                )
            del self._registered[key]
            return flights[0]

    def _land_lead(self, key: Any, flight: Flight, kind: int, payload: Any) -> None:
        """A Lead lands its own flight (once: a second landing is a RuntimeError)."""
        with self._lock:
            flights = self._registered.get(key)
            for i, f in enumerate(flights or ()):
                if f is flight:
                    del flights[i]  # type: ignore[union-attr]
                    if not flights:
                        del self._registered[key]
                    break
            else:
                raise RuntimeError(f"the flight of {key!r} has landed already")
        self.land(key, flight, kind, payload)

    def join(
        self, key: Any, head: Flight, waiter: Any, *, follow_only: bool = False
    ) -> tuple[Flight | None, bool]:
        """Join the flight new callers of ``key`` should join, found from its ``head``.

        Returns ``(flight, False)`` once ``waiter`` is in that flight, ``(flight, True)`` if the
        caller must lead a new flight (the head was forgotten and has no successor yet), or
        ``(None, False)`` if the head landed meanwhile: start over.
        """
        with self._lock:
            flight: Flight = head
            nxt = self._next
            while id(flight) in nxt:
                successor: Flight | None = nxt[id(flight)]
                if successor is None:
                    if follow_only:
                        return None, False
                    successor = []
                    nxt[id(flight)] = successor
                    return successor, True
                flight = successor
            if waiter is None:
                return flight, False
            flight.append(waiter)  # register first ...
            if flight is head and self._flights.get(key) is not head:
                # ... then re-check (uv #3724): the head landed before it could see us.
                flight.remove(waiter)
                return None, False
            return flight, False

    def leave(self, flight: Flight, waiter: Any) -> bool:
        """Take a waiter that will no longer wait out of its flight; False if it was not there.

        False means an outcome was (or is being) delivered to it; for a ``_Waiter`` elected
        leader, ``payload`` is already ``LEAD`` (written under the lock), see ``resign``.
        """
        with self._lock:
            try:
                flight.remove(waiter)
            except ValueError:
                return False
            return True

    def land(self, key: Any, flight: Flight, kind: int, payload: Any) -> None:
        """End ``flight`` (the caller leads it and has not removed it) and deliver its outcome."""
        flights = self._flights
        if not flight and flights.get(key) is flight:
            # Fast landing: nobody joined and nothing was forgotten. Remove first, then
            # look again (the re-check's other half): a follower may have joined meanwhile.
            del flights[key]
            if not flight:
                return
            self._land_locked(key, flight, kind, payload, removed=True)
        else:
            self._land_locked(key, flight, kind, payload, removed=False)

    def handover(self, key: Any, flight: Flight) -> None:
        """The leader of ``flight`` gave up: make one live waiter its new leader.

        The flight keeps its key, so the other waiters, and callers that arrive meanwhile, wait
        for the new leader's run. With no live waiter left the flight ends, as by ``land``.
        """
        here = _get_running_loop()
        while True:
            with self._lock:
                elected = None
                for i, w in enumerate(flight):
                    # A future that is done was cancelled: its caller left. Other waiters
                    # (threads, trio) leave by taking themselves out of the list. A future
                    # whose loop is not running cannot act now: it stays a follower and gets
                    # the value whenever its loop runs again, rather than stranding the rest.
                    if w is FORGOTTEN:
                        continue
                    if isinstance(w, _Waiter) or (
                        not w.done() and (w._loop is here or w._loop.is_running())
                    ):
                        elected = flight.pop(i)
                        if isinstance(elected, _Waiter):
                            # Written under the lock: a waiter that fails to leave (because
                            # it was just elected) reads LEAD here and passes it on.
                            elected.kind = SIGNAL
                            elected.payload = LEAD
                        break
            if elected is None:
                self._land_locked(key, flight, SIGNAL, REELECT, removed=False)
                return
            if isinstance(elected, _Waiter):
                if elected.wake():
                    return
                continue  # its trio run is over: elect the next one
            loop = elected.get_loop()
            if loop is here:
                elected.set_result(LEAD)  # checked live under the lock, on this very thread
                return
            try:
                loop.call_soon_threadsafe(_offer_lead, elected, self, key, flight)
                return
            except RuntimeError:  # its loop is closed: elect the next one
                continue

    def resign(self, key: Any, flight: Flight, outcome: Any) -> None:
        """A follower leaves with ``outcome`` unused: if it was elected, pass the lead on."""
        if outcome is LEAD:
            self.handover(key, flight)

    def _land_locked(
        self, key: Any, flight: Flight, kind: int, payload: Any, *, removed: bool
    ) -> None:
        flights = self._flights
        nxt = self._next
        with self._lock:
            successor = nxt.pop(id(flight), None)
            if removed:
                # Another caller may have taken the key between our removal and this lock;
                # then our successor (if any) simply runs on as a flight of its own.
                if successor is not None:
                    flights.setdefault(key, successor)
            elif flights.get(key) is flight:
                if successor is not None:
                    flights[key] = successor  # hand the slot over: never empty for a moment
                else:
                    del flights[key]
            else:
                # A successor flight that was never promoted: unlink it from its chain.
                for parent_id, child in nxt.items():
                    if child is flight:
                        nxt[parent_id] = successor
                        break
            waiters = list(flight)
            flight.clear()  # no reference to waiters (and their values) outlives the flight
        note_flight(key, len(waiters))
        wake(waiters, kind, payload)
