"""A stateful model of ``Group`` (hypothesis): random interleavings, checked after every step.

Callers are started on two asyncio event loops (each running in its own thread) and in plain
threads (``do_sync``, one thread per caller), through ``do`` / ``do_with_role`` /
``do_sync`` / ``do_sync_with_role``, on a few keys. Every run of the work parks on a gate of
its own, so the model decides when and how each flight lands (a value, an ``Exception``, a
``BaseException``, or a ``CancelledError`` raised by the work itself); the model also
``forget``s keys, cancels callers, fires their own timeouts (``asyncio.timeout`` rescheduled
to "now": a real per-waiter timeout with no sleep), and, in the racing rules, does two of
those things at once from different threads.

After every step the test waits (bounded) until the system is quiescent: every caller that
has not returned is either parked at its own run's gate or registered, pending, in a flight.
Then it checks, against the model and independently of it:

* no caller waits forever (every wait has a deadline; teardown opens every gate);
* each caller got exactly what the model predicts (value and role, the flight's exception
  object, or its *own* cancellation or timeout);
* every value or exception a caller received came from a run of its key that was in flight
  while it waited (run start/end and caller start/return sequence numbers); a cache hit
  (cache variant) from a run that had landed;
* ``stats.calls == leaders + followers + cache_hits``, ``calls`` is the number of callers,
  ``leaders`` the number of runs, ``errors`` the number of flights whose work raised,
  ``reelections`` the number of runs that gave up (cancelled, timed out, cancelled itself);
* ``in_flight`` and the map's internals (``_flights``, ``_next``, waiters) match the model,
  and the map is empty at rest (``assert_idle``); no event loop reported an error.

The racing rules switch threads every microsecond while their race plays out, so the narrow
windows (a caller joining between a landing's check and its delete, uv #3724; a ``forget``
between its look-up and its mark) are hit now and then, not only in theory.

Profiles (registered here, not in a conftest): ``ci`` (the default: 250 examples of up to
40 steps per model, about 35 s for the file on two busy cores) and ``thorough`` (1,500
examples of up to 60 steps, several minutes). The pytest plugin loads
``--hypothesis-profile`` before test modules are imported, so name this module as a plugin
too, and lift the per-test timeout::

    .venv/bin/python -m pytest tests/test_properties.py --timeout=0 \\
        -p tests.test_properties --hypothesis-profile=thorough

(or set ``SINGLEFLIGHT_HYPOTHESIS_PROFILE=thorough``). A failing example prints its steps
and a ``@reproduce_failure`` blob. A failure that depends on how a race went may be
reported as ``FlakyStrategyDefinition`` or ``Flaky``: the original assertion is chained
below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from singleflight import Group
from singleflight._oncemap import FORGOTTEN, _Waiter
from singleflight._waiters import _offer_lead

from .core_helpers import TIMEOUT, LoopThread, assert_idle

_COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=250, stateful_step_count=40, **_COMMON)
settings.register_profile("thorough", max_examples=1500, stateful_step_count=60, **_COMMON)


def _profile() -> settings:
    """``--hypothesis-profile ci|thorough`` (or the env variable); otherwise ``ci``."""
    name = os.environ.get("SINGLEFLIGHT_HYPOTHESIS_PROFILE") or settings.get_current_profile_name()
    return settings.get_profile(name if name in ("ci", "thorough") else "ci")


# A failing example is shrunk by replaying it, and a hang costs a settle deadline each time:
# leave hypothesis the time to report the minimal example rather than being cut short.
pytestmark = pytest.mark.timeout(900)

KEYS = st.sampled_from(["a", "b", "c"])
WORLDS = st.sampled_from(["loop0", "loop1", "thread"])
APIS = st.sampled_from(["do", "role"])
PICK = st.integers(min_value=0, max_value=255)
#: A timed thread caller's own deadline (``do_sync_bounded``): a follower's wait runs out
#: while the model waits for it, so the step stays deterministic.
BOUND = 0.002
BOUNDS = st.sampled_from([0.0002, 0.0005, 0.001, 0.003])  # racing deadlines (seconds)
_SEQ = itertools.count(1)  # one clock for every event, from every thread (next() is atomic)


# -- what the work produces ----------------------------------------------------------------------


class Value:
    """The value a run returns: unique per run, so a caller's value names its run."""

    __slots__ = ("run",)

    def __init__(self, run: int) -> None:
        self.run = run

    def __repr__(self) -> str:
        return f"<value of run {self.run}>"


class WorkError(Exception):
    def __init__(self, run: int) -> None:
        super().__init__(f"error from run {run}")
        self.run = run


class WorkBail(BaseException):
    """A BaseException that is neither a cancellation nor something asyncio re-raises."""

    def __init__(self, run: int) -> None:
        super().__init__(f"bail from run {run}")
        self.run = run


class Call:
    """One caller: where it runs, what it asked, what it got, what the model expects."""

    def __init__(self, cid: int, key: str, where: str, api: str, timed: bool) -> None:
        self.id, self.key, self.where, self.api, self.timed = cid, key, where, api, timed
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.cm: asyncio.Timeout | None = None
        self.thread: threading.Thread | None = None
        self.entered = False
        self.done = False  # written last, after the outcome
        self.start_seq = 0
        self.done_seq = 0
        self.result: Any = None
        self.role: str | None = None
        self.exc: BaseException | None = None
        self.bound = BOUND  # a timed thread's do_sync_bounded timeout (seconds)
        self.stopped: str | None = None  # "cancel" / "timeout": what the model did to it
        self.expect: list[tuple[Any, ...]] | None = None  # acceptable outcomes, once known

    def outcome(self) -> str:
        if not self.done:
            return "pending"
        if self.exc is not None:
            return f"raised {self.exc!r}"
        return f"returned {self.result!r} as {self.role}"

    def __repr__(self) -> str:
        timed = " timed" if self.timed else ""
        return f"c{self.id}[{self.where} {self.key!r} {self.api}{timed}]"


class Run:
    """One run of the work, by the caller whose ``fn`` it is; parked on its gate."""

    def __init__(self, rid: int, call: Call, gate: Any) -> None:
        self.id = rid
        self.call = call
        self.key = call.key
        self.gate = gate  # an asyncio future of the caller's loop, or a threading.Event
        self.how: str | None = None  # how the model opened the gate
        self.ended: str | None = None  # how the run ended; None while parked
        self.value = Value(rid)
        self.error = WorkError(rid)
        self.bail = WorkBail(rid)
        self.start_seq = next(_SEQ)
        self.end_seq = 0

    def finish(self, how: str) -> Any:
        self.end_seq = next(_SEQ)
        self.ended = how
        if how == "value":
            return self.value
        if how == "error":
            raise self.error
        if how == "bail":
            raise self.bail
        assert how == "selfcancel", how
        raise asyncio.CancelledError(f"run {self.id} cancels itself")

    def __repr__(self) -> str:
        return f"r{self.id}<{self.call!r} {self.ended or 'parked'}>"


def _resolve(gate: asyncio.Future[str], how: str) -> None:
    if not gate.done():
        gate.set_result(how)


def live_waiters(group: Group[Any]) -> int:
    """White-box: callers registered in a flight and not yet woken (cancelled ones excluded)."""
    m = group._map
    flights = [*list(m._flights.values()), *(f for f in list(m._next.values()) if f)]
    n = 0
    for flight in flights:
        for w in list(flight):
            if w is FORGOTTEN:
                continue
            if isinstance(w, _Waiter) or not w.done():
                n += 1
    return n


class World:
    """The system under test: one Group, two loop threads, caller threads, the runs."""

    def __init__(self, cache: dict[Any, Any] | None) -> None:
        self.group: Group[Any] = Group(cache)
        self.loop_errors: list[dict[str, Any]] = []
        self.loops = [LoopThread(), LoopThread()]
        # Callbacks posted to a loop from another thread and not run yet (see _count_posts).
        # n -> (the callback, [its handle, once post() returned])
        self.posted: dict[int, tuple[Any, list[asyncio.Handle]]] = {}
        self._posts = itertools.count()
        for lt in self.loops:
            lt.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
            self._count_posts(lt.loop)
        self.calls: list[Call] = []
        self.runs: list[Run] = []
        self._lock = threading.Lock()  # guards self.runs appends (runs start in many threads)

    def _count_posts(self, loop: asyncio.AbstractEventLoop) -> None:
        """Track what other threads post to ``loop``: a hand-over to a follower of this loop
        (``_offer_lead``) is on its way until it has run, and if that follower was cancelled
        meanwhile, nothing else shows it (both callers have returned, the flight is empty and
        still in the map until the callback passes the lead on or lands it)."""
        post = loop.call_soon_threadsafe
        posted = self.posted

        def counted(callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:
            n = next(self._posts)

            def run() -> None:
                try:
                    callback(*args)
                finally:
                    posted.pop(n, None)  # after the callback: while it runs, it is pending

            slot: list[asyncio.Handle] = []
            posted[n] = (callback, slot)  # before posting: the loop may run it before post returns
            try:
                handle = post(run, context=context)
            except BaseException:  # the loop is closed: nothing was posted
                posted.pop(n, None)
                raise
            slot.append(handle)
            return handle

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

    # -- the work --------------------------------------------------------------------------

    def _begin(self, call: Call, gate: Any) -> Run:
        with self._lock:
            run = Run(len(self.runs), call, gate)
            self.runs.append(run)  # published with its gate: the model may open it now
        return run

    async def _async_work(self, call: Call) -> Any:
        run = self._begin(call, asyncio.get_running_loop().create_future())
        try:
            how = await run.gate
        except asyncio.CancelledError:
            run.end_seq = next(_SEQ)
            run.ended = "cancelled"
            raise
        return run.finish(how)

    def _sync_work(self, call: Call) -> Any:
        run = self._begin(call, threading.Event())
        if not run.gate.wait(4 * TIMEOUT):
            run.ended = "hung"
            raise AssertionError(f"{run}: nobody opened its gate")
        assert run.how is not None
        return run.finish(run.how)

    # -- callers ---------------------------------------------------------------------------

    def new_call(self, key: str, where: str, api: str, timed: bool) -> Call:
        call = Call(len(self.calls), key, where, api, timed)
        self.calls.append(call)
        return call

    def launch(self, call: Call, go: threading.Event | None = None) -> None:
        """Start the caller; a thread caller waits for ``go`` first (to time a race)."""
        if call.where == "thread":
            call.thread = threading.Thread(target=self._sync_call, args=(call, go), daemon=True)
            call.thread.start()
            return
        loop = self.loops[int(call.where[-1])].loop
        call.loop = loop

        def spawn() -> None:
            call.task = loop.create_task(self._async_call(call))

        loop.call_soon_threadsafe(spawn)

    def _enter(self, call: Call) -> Any:
        call.start_seq = next(_SEQ)
        call.entered = True
        if call.api == "role":
            return self.group.do_with_role(call.key, self._async_work, call)
        return self.group.do(call.key, self._async_work, call)

    async def _async_call(self, call: Call) -> None:
        try:
            if call.timed:
                async with asyncio.timeout(None) as cm:
                    call.cm = cm
                    out = await self._enter(call)
            else:
                out = await self._enter(call)
        except BaseException as exc:  # noqa: B036 - the model inspects it
            call.exc = exc
        else:
            call.result, call.role = out if call.api == "role" else (out, None)
        call.done_seq = next(_SEQ)
        call.done = True

    def _sync_call(self, call: Call, go: threading.Event | None) -> None:
        if go is not None:
            go.wait(TIMEOUT)
        call.start_seq = next(_SEQ)
        call.entered = True
        try:
            if call.timed:  # a follower gives up after call.bound seconds
                call.result, call.role = self.group.do_sync_bounded(
                    call.bound, call.key, self._sync_work, call
                )
            elif call.api == "role":
                call.result, call.role = self.group.do_sync_with_role(
                    call.key, self._sync_work, call
                )
            else:
                call.result = self.group.do_sync(call.key, self._sync_work, call)
        except BaseException as exc:  # noqa: B036 - the model inspects it
            call.exc = exc
        call.done_seq = next(_SEQ)
        call.done = True

    def cancel(self, call: Call) -> None:
        assert call.loop is not None and call.task is not None
        call.loop.call_soon_threadsafe(call.task.cancel)

    def expire(self, call: Call) -> None:
        """Fire the caller's own ``asyncio.timeout`` now (it was entered with no deadline)."""
        loop = call.loop
        assert loop is not None and call.cm is not None
        cm = call.cm

        def fire() -> None:
            if not call.done and not cm.expired():
                cm.reschedule(loop.time())

        loop.call_soon_threadsafe(fire)

    def open(self, run: Run, how: str) -> None:
        run.how = how
        if isinstance(run.gate, threading.Event):
            run.gate.set()
        else:
            loop = run.call.loop
            assert loop is not None
            loop.call_soon_threadsafe(_resolve, run.gate, how)

    # -- observation ------------------------------------------------------------------------

    def unquiet(self) -> str | None:
        """Why the system may still move on its own; None once it is quiescent."""
        for c in self.calls:
            if not c.entered:
                return f"{c} has not entered yet"
        # A cancelled handle never runs: it is not pending.
        pending = [cb for cb, h in list(self.posted.values()) if not h or not h[0].cancelled()]
        if pending:
            names = ", ".join(getattr(cb, "__qualname__", repr(cb)) for cb in pending)
            return f"callbacks posted to a loop have not run yet: {names}"
        for r in self.runs:
            if r.how is not None and r.ended is None:
                return f"{r} was opened ({r.how}) and has not ended"
        live = [c for c in self.calls if not c.done]
        parked = [r for r in self.runs if r.ended is None]
        waiting = live_waiters(self.group)
        if len(live) != len(parked) + waiting:
            return (
                f"{len(live)} callers pending, {len(parked)} parked at their gates, "
                f"{waiting} waiting in flights"
            )
        if self.group.stats.calls != len(self.calls):
            return f"stats.calls = {self.group.stats.calls}, {len(self.calls)} callers entered"
        return None

    def settle(self, acks: list[Any] | tuple[Any, ...] = ()) -> None:
        """Wait (bounded) until every ack holds and nothing moves on its own any more."""
        deadline = time.monotonic() + TIMEOUT
        spins = 0
        while True:
            why = next((f"waiting for {what}" for ok, what in acks if not ok()), None)
            why = why or self.unquiet()
            if why is None:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not quiescent after {TIMEOUT} s (a caller waits forever?): {why}\n"
                    + self.dump()
                )
            spins += 1
            time.sleep(0 if spins < 50 else 0.0002)

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        """Poll ``predicate`` (bounded) without asking for quiescence."""
        deadline = time.monotonic() + TIMEOUT
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n" + self.dump())
            time.sleep(0)

    def dump(self) -> str:
        lines = [f"  {c!r}: {c.outcome()} (stopped={c.stopped})" for c in self.calls]
        lines += [f"  {r!r}" for r in self.runs]
        m = self.group._map
        lines.append(f"  _flights={m._flights!r} _next={m._next!r} stats={self.group.stats}")
        return "\n".join(lines)

    def close(self) -> None:
        """Best effort: let every run end, stop the loops, join the threads (all bounded)."""
        for r in self.runs:
            if r.ended is None and r.how is None:
                self.open(r, "value")
        deadline = time.monotonic() + TIMEOUT
        while any(not c.done for c in self.calls) and time.monotonic() < deadline:
            for r in self.runs:  # runs started by re-elections meanwhile
                if r.ended is None and r.how is None:
                    self.open(r, "value")
            time.sleep(0.001)
        for lt in self.loops:
            lt.close()
        for c in self.calls:
            if c.thread is not None:
                c.thread.join(max(0.0, deadline - time.monotonic()))


# -- the model ------------------------------------------------------------------------------------


def _guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """A step that fails marks the model broken, so teardown only cleans up (no drain)."""

    @functools.wraps(fn)
    def step(self: GroupModel, *args: Any, **kwargs: Any) -> None:
        self.steps.append(f"{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
        try:
            fn(self, *args, **kwargs)
        except BaseException as exc:
            self.failed = True
            self._note_steps(exc)
            raise

    return step


class MFlight:
    """The model of one flight: its runner (whose run is parked), its waiters in join order."""

    _ids = itertools.count()

    def __init__(self, key: str, runner: Call) -> None:
        self.id = next(self._ids)
        self.key = key
        self.runner = runner
        self.run: Run | None = None  # the runner's parked run, once observed
        self.waiters: list[Call] = []
        self.forgotten = False

    def __repr__(self) -> str:
        f = " forgotten" if self.forgotten else ""
        return f"F{self.id}[{self.key!r}{f} runner={self.runner!r} waiters={self.waiters!r}]"


class GroupModel(RuleBasedStateMachine):
    """Model of a plain ``Group`` (no cache): ``do`` takes its fast path."""

    CACHE = False

    def __init__(self) -> None:
        super().__init__()
        self.world = World({} if self.CACHE else None)
        self.flights: list[MFlight] = []
        self.current: dict[str, MFlight] = {}  # the flight new callers of a key join
        self.cache: dict[str, Value] | None = {} if self.CACHE else None
        self.hits = 0
        self.known_runs: set[int] = set()  # runs the model accounts for
        self.failed = False
        self.steps: list[str] = []  # this run's steps, for failure reports

    # -- model transitions ------------------------------------------------------------------

    def _predict_start(self, call: Call) -> None:
        if self.cache is not None and call.key in self.cache:
            call.expect = [("value", self.cache[call.key], "cache")]
            self.hits += 1
            return
        flight = self.current.get(call.key)
        if flight is not None:
            flight.waiters.append(call)
        else:
            self._new_flight(call)

    def _new_flight(self, runner: Call) -> None:
        flight = MFlight(runner.key, runner)
        self.flights.append(flight)
        self.current[runner.key] = flight

    def _end_flight(self, flight: MFlight) -> None:
        self.flights.remove(flight)
        if self.current.get(flight.key) is flight:
            del self.current[flight.key]

    def _elect(self, flight: MFlight) -> None:
        """The runner gave up: the first waiter (in join order) runs its own work."""
        flight.run = None
        if flight.waiters:
            flight.runner = flight.waiters.pop(0)
        else:
            self._end_flight(flight)

    def _predict_land(self, flight: MFlight, how: str) -> None:
        run = flight.run
        assert run is not None
        if how == "selfcancel":
            flight.runner.expect = [("cancel",)]
            self._elect(flight)
            return
        if how == "value":
            flight.runner.expect = [("value", run.value, "leader")]
            for w in flight.waiters:
                w.expect = [("value", run.value, "follower")]
            if self.cache is not None and not flight.forgotten:
                self.cache[flight.key] = run.value  # a forgotten flight never stores (#10)
        else:
            exc = run.error if how == "error" else run.bail
            for c in (flight.runner, *flight.waiters):
                c.expect = [("raise", exc)]
        self._end_flight(flight)

    def _predict_stop(self, call: Call, kind: str) -> None:
        call.stopped = kind
        call.expect = [(kind,)]
        for flight in self.flights:
            if flight.runner is call:
                self._elect(flight)
                return
            if call in flight.waiters:
                flight.waiters.remove(call)
                return
        raise AssertionError(f"{call} is in no flight of the model")

    def _predict_forget(self, key: str) -> None:
        """Later callers start afresh: the flight is marked, and its cached value dropped."""
        flight = self.current.pop(key, None)
        if flight is not None:
            flight.forgotten = True
        if self.cache is not None:
            self.cache.pop(key, None)

    def _live_async(self, timed_only: bool = False) -> list[Call]:
        members = [c for f in self.flights for c in (f.runner, *f.waiters)]
        return [c for c in members if c.where != "thread" and (c.timed or not timed_only)]

    @contextlib.contextmanager
    def _racing(self) -> Iterator[None]:
        """Switch threads every microsecond while a race plays out, so that the narrow
        windows (a join between a landing's check and its delete, a forget between its
        look-up and its mark) are actually hit now and then."""
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            yield
        finally:
            sys.setswitchinterval(old)

    def _settle(self, *acks: Any) -> None:
        self.world.settle(acks)

    # -- rules ---------------------------------------------------------------------------------
    #
    # Races make the model's state depend on which side won, so no rule has a precondition or
    # draws from a state-dependent list: each draws plain integers (``pick``) and picks its
    # target modulo what exists, doing nothing when nothing fits. Hypothesis then sees the
    # same shape of data whichever way a race went, and can shrink and replay.

    @staticmethod
    def _pick(items: list[Any], pick: int) -> Any:
        return items[pick % len(items)] if items else None

    def _launch(self, call: Call) -> None:
        self._predict_start(call)
        self.world.launch(call)
        if call.where == "thread" and call.timed and self._waiting(call):
            # A follower with its own deadline: it leaves after BOUND s, the flight goes on.
            self._predict_stop(call, "timeout")
            self._settle((lambda: call.done, f"{call} to time out"))
        else:
            self._settle()

    def _waiting(self, call: Call) -> bool:
        return any(call in f.waiters for f in self.flights)

    @rule(key=KEYS, where=WORLDS, api=APIS, timed=st.booleans())
    @_guarded
    def start(self, key: str, where: str, api: str, timed: bool) -> None:
        self._launch(self.world.new_call(key, where, api, timed))

    @rule(pick=PICK, where=WORLDS, api=APIS, timed=st.booleans())
    @_guarded
    def join(self, pick: int, where: str, api: str, timed: bool) -> None:
        """A caller of a key that is in flight (a follower, unless it is forgotten)."""
        flight = self._pick(self.flights, pick)
        key = flight.key if flight is not None else "abc"[pick % 3]
        self._launch(self.world.new_call(key, where, api, timed))

    @initialize(starts=st.lists(st.tuples(KEYS, WORLDS, APIS, st.booleans()), max_size=6))
    @_guarded
    def crowd_at_start(self, starts: list[tuple[str, str, str, bool]]) -> None:
        for key, where, api, timed in starts:
            self._launch(self.world.new_call(key, where, api, timed))

    @rule(pick=PICK, whos=st.lists(st.tuples(WORLDS, APIS, st.booleans()), min_size=2, max_size=5))
    @_guarded
    def crowd(self, pick: int, whos: list[tuple[str, str, bool]]) -> None:
        """Several callers of one key, one after the other (join order decides elections)."""
        flight = self._pick(self.flights, pick)
        key = flight.key if flight is not None else "abc"[pick % 3]
        for where, api, timed in whos:
            self._launch(self.world.new_call(key, where, api, timed))

    @rule(pick=PICK, how=st.sampled_from(["value", "value", "error", "bail", "selfcancel"]))
    @_guarded
    def land(self, pick: int, how: str) -> None:
        flight = self._pick(self.flights, pick)
        if flight is None:
            return
        run = flight.run
        assert run is not None
        self.world.open(run, how)
        self._predict_land(flight, how)
        self._settle((lambda: run.ended is not None, f"{run} to end"))

    @rule(pick=PICK)
    @_guarded
    def cancel(self, pick: int) -> None:
        call = self._pick(self._live_async(), pick)
        if call is None:
            return
        self.world.cancel(call)
        self._predict_stop(call, "cancel")
        self._settle((lambda: call.done, f"{call} to return"))

    @rule(pick=PICK)
    @_guarded
    def time_out(self, pick: int) -> None:
        call = self._pick(self._live_async(timed_only=True), pick)
        if call is None:
            return
        self.world.expire(call)
        self._predict_stop(call, "timeout")
        self._settle((lambda: call.done, f"{call} to time out"))

    @rule(key=KEYS)
    @_guarded
    def forget(self, key: str) -> None:
        self.world.group.forget(key)
        self._predict_forget(key)
        self._settle()

    @rule(picks=st.lists(PICK, min_size=2, max_size=4))
    @_guarded
    def cancel_many(self, picks: list[int]) -> None:
        """Several callers cancelled at once, on both loops: the lead may reach a caller whose
        cancellation is on its way (it must pass the lead on)."""
        live = self._live_async()
        victims = list(dict.fromkeys(live[p % len(live)] for p in picks)) if live else []
        if len(victims) < 2:
            return
        with self._racing():
            for call in victims:
                self.world.cancel(call)
            self._settle(*((lambda c=c: c.done, f"{c} to return") for c in victims))
        gone = set(victims)
        for call in victims:
            call.stopped, call.expect = "cancel", [("cancel",)]
        for flight in list(self.flights):
            flight.waiters = [w for w in flight.waiters if w not in gone]
            if flight.runner in gone:
                self._elect(flight)
        # An elected victim may have started its own run before its cancellation arrived.
        for r in self.world.runs:
            if r.id not in self.known_runs and r.ended is not None:
                assert r.ended == "cancelled" and r.call in gone, f"unexpected run {r}"
                self.known_runs.add(r.id)

    @staticmethod
    def _async_members(flight: MFlight) -> list[Call]:
        return [c for c in (flight.runner, *flight.waiters) if c.where != "thread"]

    @rule(pick=PICK, cancel_first=st.booleans())
    @_guarded
    def land_racing_cancel(self, pick: int, cancel_first: bool) -> None:
        """A flight lands with a value while one of its async callers is cancelled."""
        flight = self._pick([f for f in self.flights if self._async_members(f)], pick)
        if flight is None:
            return
        target = self._pick(self._async_members(flight), pick // 7)
        run = flight.run
        assert run is not None
        with self._racing():
            if cancel_first:
                self.world.cancel(target)
            self.world.open(run, "value")
            if not cancel_first:
                self.world.cancel(target)
            self._settle(
                (lambda: run.ended is not None, f"{run} to end"),
                (lambda: target.done, f"{target} to return"),
            )
        if target is flight.runner:
            if run.ended == "value":  # the value won; the cancellation came too late
                self._predict_land(flight, "value")
                target.stopped = "cancel"
            else:
                assert run.ended == "cancelled", run
                self._predict_stop(target, "cancel")
        else:
            flight.waiters.remove(target)
            self._predict_land(flight, "value")
            target.stopped = "cancel"
            target.expect = [("value", run.value, "follower"), ("cancel",)]

    @rule(
        pick=PICK,
        where=WORLDS,
        api=APIS,
        how=st.sampled_from(["value", "error"]),
        start_first=st.booleans(),
    )
    @_guarded
    def start_racing_land(
        self, pick: int, where: str, api: str, how: str, start_first: bool
    ) -> None:
        """A caller arrives just as the flight of its key lands (the lost wake-up, uv #3724):
        it joins and gets the outcome, or it starts a flight of its own (or hits the cache)."""
        flight = self._pick(list(self.current.values()), pick)
        if flight is None:
            return
        run = flight.run
        assert run is not None
        call = self.world.new_call(flight.key, where, api, False)
        hits = self.world.group.stats.cache_hits
        cached = None if self.cache is None else self.cache.get(flight.key)  # an older flight's
        go = threading.Event()

        def arrive() -> None:
            if where == "thread":
                go.set()
            else:
                self.world.launch(call)

        with self._racing():
            if where == "thread":
                self.world.launch(call, go)  # parked on go: both sides wake together
            if start_first:
                arrive()
            self.world.open(run, how)
            if not start_first:
                arrive()
            self._settle((lambda: run.ended is not None, f"{run} to end"))
        self._predict_land(flight, how)
        outcome = ("value", run.value, "follower") if how == "value" else ("raise", run.error)
        if call.done:
            call.expect = [outcome]
            if self.world.group.stats.cache_hits != hits:
                assert self.cache is not None, "a cache hit with no cache"
                self.hits += 1
                # What the cache held when it looked: before this landing, or after it.
                values = [cached] if cached is not None else []
                values += [run.value] if how == "value" else []
                call.expect = [("value", v, "cache") for v in values]
        else:
            self._new_flight(call)  # it came after the landing: its own flight, its run parked

    def _uncached(self, flight: MFlight) -> bool:
        """A new caller of this flight's key joins it (no value of an older flight cached)."""
        return self.cache is None or flight.key not in self.cache

    def _join_thread_follower(self, flight: MFlight, bound: float) -> Call:
        """Start a ``do_sync_bounded`` thread caller of ``flight``'s key; return once it waits
        in the flight (or already gave up)."""
        call = self.world.new_call(flight.key, "thread", "role", True)
        call.bound = bound
        waiting = sum(len(f.waiters) for f in self.flights)
        self.world.launch(call)
        self.world.wait(
            lambda: call.done or live_waiters(self.world.group) > waiting, f"{call} to join"
        )
        return call

    @rule(pick=PICK, bound=BOUNDS)
    @_guarded
    def bounded_racing_land(self, pick: int, bound: float) -> None:
        """A thread follower's own deadline runs out just as its flight lands: it gets the
        value or TimeoutError (it leaves, or takes the outcome already on its way)."""
        flight = self._pick([f for f in self.current.values() if self._uncached(f)], pick)
        if flight is None:
            return
        run = flight.run
        assert run is not None
        with self._racing():
            call = self._join_thread_follower(flight, bound)
            self.world.open(run, "value")
            self._settle(
                (lambda: run.ended is not None, f"{run} to end"),
                (lambda: call.done, f"{call} to return"),
            )
        self._predict_land(flight, "value")
        call.stopped = "timeout"
        call.expect = [("value", run.value, "follower"), ("timeout",)]

    @rule(pick=PICK, bound=BOUNDS)
    @_guarded
    def bounded_racing_cancel(self, pick: int, bound: float) -> None:
        """A thread follower's own deadline runs out just as the cancelled leader elects it:
        it leaves with TimeoutError, or it leads (its own run); nobody is stranded."""
        flight = self._pick(
            [
                f
                for f in self.flights
                if f.runner.where != "thread"
                and not f.waiters
                and self.current.get(f.key) is f
                and self._uncached(f)
            ],
            pick,
        )
        if flight is None:
            return
        runner = flight.runner
        runs = self.world.runs

        def led() -> bool:
            return any(r.call is call and r.ended is None for r in runs)

        with self._racing():
            call = self._join_thread_follower(flight, bound)
            self.world.cancel(runner)
            self._settle(
                (lambda: runner.done, f"{runner} to return"),
                (lambda: call.done or led(), f"{call} to return or lead"),
            )
        flight.waiters.append(call)
        self._predict_stop(runner, "cancel")  # elects the thread follower ...
        if not led():  # ... unless it had left: then the flight ended with nobody to lead it
            assert flight.runner is call
            flight.waiters.clear()
            self._end_flight(flight)
            call.stopped, call.expect = "timeout", [("timeout",)]

    @rule(pick=PICK, forget_first=st.booleans())
    @_guarded
    def forget_racing_land(self, pick: int, forget_first: bool) -> None:
        """``forget`` while the flight lands on its lock-free path: no stale mark survives."""
        flight = self._pick(self.flights, pick)
        if flight is None:
            return
        run = flight.run
        assert run is not None
        with self._racing():
            if forget_first:
                self.world.group.forget(flight.key)
            self.world.open(run, "value")
            if not forget_first:
                self.world.group.forget(flight.key)
            self._settle((lambda: run.ended is not None, f"{run} to end"))
        self._predict_forget(flight.key)
        self._predict_land(flight, "value")

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def check(self) -> None:
        try:
            self._check()
        except BaseException as exc:
            self.failed = True
            self._note_steps(exc)
            raise

    def _note_steps(self, exc: BaseException) -> None:
        """Name the steps of this very run: a failure that hangs on a race may not replay,
        and then hypothesis reports it as flaky, without its steps."""
        if hasattr(exc, "add_note") and not getattr(exc, "_steps_noted", False):
            exc.add_note("steps of the failing run:\n  " + "\n  ".join(self.steps))
            exc._steps_noted = True  # type: ignore[attr-defined]

    def _check(self) -> None:
        world, group = self.world, self.world.group
        assert not world.loop_errors, f"an event loop reported: {world.loop_errors}"
        # Runners are exactly the callers whose run is parked.
        parked: dict[Call, Run] = {}
        for r in world.runs:
            if r.ended is None:
                assert r.call not in parked, f"{r.call} has two runs parked"
                parked[r.call] = r
        runners = {f.runner for f in self.flights}
        assert set(parked) == runners, (
            f"runs parked by {list(parked)}, the model expects {runners}\n" + world.dump()
        )
        for f in self.flights:
            assert f.run is None or f.run is parked[f.runner], f"{f} changed run"
            f.run = parked[f.runner]
            self.known_runs.add(f.run.id)
        # Every run is accounted for and ended the way it was told to (or cancelled, by
        # the cancellation of its own caller).
        for r in world.runs:
            assert r.id in self.known_runs, f"unexpected run {r}\n" + world.dump()
            if r.ended == "cancelled":
                assert r.call.stopped, f"{r} was cancelled, its caller never was"
            elif r.ended is not None:
                assert r.ended == r.how, r
        # Callers: exactly the expected ones are done, with an expected outcome.
        for c in world.calls:
            if c.expect is None:
                assert not c.done, f"{c} finished unexpectedly: {c.outcome()}\n" + world.dump()
                continue
            assert c.done, f"{c} should have returned (expect {c.expect})\n" + world.dump()
            assert any(self._matches(c, e) for e in c.expect), (
                f"{c} {c.outcome()}, expected one of {c.expect}\n" + world.dump()
            )
            self._check_provenance(c)
        # Counters.
        stats = group.stats
        ended_with_error = sum(1 for r in world.runs if r.ended in ("error", "bail"))
        assert stats.calls == stats.leaders + stats.followers + stats.cache_hits, stats
        assert stats.calls == len(world.calls), (stats, len(world.calls))
        assert stats.leaders == len(world.runs), (stats, len(world.runs))
        assert stats.cache_hits == self.hits, (stats, self.hits)
        assert stats.errors == ended_with_error, (stats, ended_with_error)
        gave_up = sum(1 for r in world.runs if r.ended in ("cancelled", "selfcancel"))
        assert stats.reelections == gave_up, (stats, gave_up)
        # The map, white-box.
        m = group._map
        keys = {f.key for f in self.flights}
        forgotten = sum(1 for f in self.flights if f.forgotten)
        assert set(m._flights) == keys, (m._flights, self.flights)
        assert len(m._next) == forgotten, (m._next, self.flights)
        assert not m._registered, m._registered
        waiting = sum(len(f.waiters) for f in self.flights)
        assert live_waiters(group) == waiting, (live_waiters(group), self.flights)
        if not self.flights:
            assert_idle(group)
        # DESIGN: "group.in_flight: number of keys in flight now" (a forgotten key that
        # started again is one key). Last, so that every other invariant was checked first.
        assert group.in_flight == len(keys), f"in_flight={group.in_flight}, {self.flights}"

    @staticmethod
    def _matches(c: Call, expected: tuple[Any, ...]) -> bool:
        kind = expected[0]
        if kind == "value":
            _, value, role = expected
            return c.exc is None and c.result is value and c.role in (None, role)
        if kind == "raise":
            return c.exc is expected[1]
        if kind == "cancel":
            return type(c.exc) is asyncio.CancelledError
        assert kind == "timeout"
        return type(c.exc) is TimeoutError

    def _check_provenance(self, c: Call) -> None:
        """Model-free: what a caller got came from a run of its key in flight while it
        waited (cache hits: a run that had landed); cancellations were its own."""
        runs = self.world.runs
        got = c.exc if c.exc is not None else c.result
        if isinstance(got, (Value, WorkError, WorkBail)):
            r = runs[got.run]
            assert r.key == c.key, f"{c} got {got!r} from a run of key {r.key!r}"
            want = "value" if isinstance(got, Value) else "error"
            want = "bail" if isinstance(got, WorkBail) else want
            assert r.ended == want, f"{c} got {got!r}, but {r} ended {r.ended}"
            assert r.start_seq < r.end_seq < c.done_seq, f"{c} got {got!r} before {r} made it"
            cache_hit = c.role == "cache" or any(e[-1] == "cache" for e in c.expect or ())
            if not cache_hit:
                # The flight lands after the work ends and before its leader's call returns:
                # the caller must have come before that return.
                landed = r.call.done_seq
                assert r.call.done and c.start_seq < landed, (
                    f"{c} got {got!r} from {r}, which had landed (started at {c.start_seq}, "
                    f"the run's caller returned at {landed})"
                )
            else:
                assert isinstance(got, Value), f"{c}: an error came from the cache"
        elif isinstance(got, TimeoutError):
            assert c.stopped == "timeout", f"{c} got a timeout that was not its own"
        elif isinstance(got, asyncio.CancelledError):
            own_run = any(r.call is c and r.ended == "selfcancel" for r in runs)
            assert c.stopped == "cancel" or own_run, f"{c} got a cancellation not its own"
        else:
            raise AssertionError(f"{c} {c.outcome()}: not something any run produced")

    # -- teardown: land everything, check quiescence ----------------------------------------------

    def teardown(self) -> None:
        try:
            if not self.failed:
                while self.flights:
                    flight = self.flights[0]
                    run = flight.run
                    assert run is not None
                    self.world.open(run, "value")
                    self._predict_land(flight, "value")
                    self._settle((lambda run=run: run.ended is not None, f"{run} to end"))
                    self.check()
                assert all(c.done for c in self.world.calls)
                assert_idle(self.world.group)
        finally:
            self.world.close()


class CachedGroupModel(GroupModel):
    """The same model with a cache (a plain dict: hits never expire): ``do`` goes through
    ``_run``; values are stored as flights land, hits skip the flight."""

    CACHE = True

    @rule(key=KEYS)
    @_guarded
    def cache_pop(self, key: str) -> None:
        """async-lru's cache_invalidate: the same as forget (the flight will not store)."""
        self.world.group.cache_pop(key)
        self._predict_forget(key)

    @rule()
    @_guarded
    def cache_clear(self) -> None:
        """Every flight in progress is forgotten, and the cache emptied."""
        self.world.group.cache_clear()
        for key in list(self.current):
            self._predict_forget(key)
        assert self.cache is not None
        self.cache.clear()


def test_group_model() -> None:
    run_state_machine_as_test(GroupModel, settings=_profile())


def test_group_model_with_cache() -> None:
    run_state_machine_as_test(CachedGroupModel, settings=_profile())


# -- minimal reproductions of what the model found -----------------------------------------------


async def test_in_flight_counts_a_forgotten_key_that_started_again_once() -> None:
    """Shrunk from the model (forget, then a new caller of the key): ``in_flight`` must not
    depend on whether the key's new flight has followers. DESIGN: "number of keys in flight
    now"; OnceMap.__len__ adds the successors of forgotten flights that hold a waiter (``if
    f``: an empty successor list is falsy), so it says 1, then 2 once someone follows."""
    g: Group[int] = Group()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 1

    first = asyncio.create_task(g.do("k", work))
    await asyncio.sleep(0)
    g.forget("k")
    second = asyncio.create_task(g.do("k", work))  # leads a new flight of the same key
    await asyncio.sleep(0)
    alone = g.in_flight
    follower = asyncio.create_task(g.do("k", work))  # follows the new flight
    await asyncio.sleep(0)
    followed = g.in_flight
    gate.set()
    async with asyncio.timeout(TIMEOUT):
        assert await asyncio.gather(first, second, follower) == [1, 1, 1]
    assert_idle(g)
    assert (alone, followed) == (1, 1), f"in_flight was {alone}, then {followed} for one key"


def test_settle_waits_for_a_hand_over_on_its_way() -> None:
    """Shrunk from the cached model under load (cancel_many of a leader and its one follower):
    the cancelled leader elects the follower, whose own cancellation returns it before the
    hand-over (``_offer_lead``) runs on its loop. Both callers have returned and the empty
    flight is still in the map until that callback ends it; the model must not call that
    quiescent (it did, and then found a flight it did not expect)."""
    world = World(None)
    unblock = threading.Event()
    try:
        leader = world.new_call("b", "loop1", "do", False)
        world.launch(leader)
        world.settle()
        follower = world.new_call("b", "loop0", "role", False)
        world.launch(follower)
        world.settle()
        loop0 = world.loops[0].loop
        post = loop0.call_soon_threadsafe

        def late_post(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
            # On loop1's thread, between the election and its post (the window load opens):
            # the elected follower is cancelled and returns; then loop0 is held busy.
            if callback is _offer_lead:
                world.cancel(follower)
                world.wait(lambda: follower.done, f"{follower} to return")
                post(unblock.wait, TIMEOUT)
            return post(callback, *args, **kwargs)

        loop0.call_soon_threadsafe = late_post  # type: ignore[method-assign]
        world.cancel(leader)
        world.wait(lambda: leader.done, f"{leader} to return")
        assert type(leader.exc) is type(follower.exc) is asyncio.CancelledError
        assert world.group._map._flights == {"b": []}, world.dump()  # the hand-over's flight
        why = world.unquiet()
        assert why is not None and "_offer_lead" in why, why
        unblock.set()
        world.settle()
        assert_idle(world.group)
    finally:
        unblock.set()
        world.close()
