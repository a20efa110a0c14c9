"""A scripted loopback upstream for the stale tests: what it answers changes between hits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ("Answer", "ScriptedUpstream", "scripted_upstream")

WAIT = 30.0  # the most a gated request waits (a test that forgets its gate still ends)


@dataclass
class Answer:
    """What the upstream answers now: a status, headers, a body (with the hit number in it
    when ``body`` holds ``{hit}``), after ``gate`` opens; ``drop`` closes the connection
    without a response (a transport error)."""

    status: int = 200
    body: str = "v{hit}"
    headers: dict[str, str] = field(default_factory=dict)
    gate: threading.Event | None = None
    drop: bool = False


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer (closed under a refresh): expected here


class ScriptedUpstream:
    """ScriptedUpstream serves ``answer`` (set it between calls) on 127.0.0.1, counting hits.

    ``hits`` counts every request before it waits for any gate; ``seen`` keeps each request's
    headers; ``wait_for_hits(n)`` blocks (bounded) until n requests arrived.
    """

    def __init__(self) -> None:
        self.answer = Answer()
        self.hits = 0
        self.seen: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._gates: list[threading.Event] = []
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with up._cond:
                    up.hits += 1
                    hit = up.hits
                    up.seen.append({k.lower(): v for k, v in self.headers.items()})
                    answer = up.answer
                    up._cond.notify_all()
                if answer.gate is not None:
                    answer.gate.wait(WAIT)
                if answer.drop:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                body = answer.body.format(hit=hit).encode()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="scripted-upstream", daemon=True
        )
        self._thread.start()

    def gate(self) -> threading.Event:
        """A new closed gate, opened for sure when the upstream closes."""
        event = threading.Event()
        self._gates.append(event)
        return event

    def wait_for_hits(self, n: int, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.hits >= n, timeout):
                raise TimeoutError(f"{self.hits} hits, waited for {n}")

    def close(self) -> None:
        for event in self._gates:
            event.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def scripted_upstream() -> Iterator[ScriptedUpstream]:
    """The body of a fixture: one upstream per test, closed (gates opened) after it."""
    up = ScriptedUpstream()
    try:
        yield up
    finally:
        up.close()
