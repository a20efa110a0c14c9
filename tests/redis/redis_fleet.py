"""Run a fleet of ``tests.redis.worker`` processes behind one start gate (tests and benchmark)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]


class Fleet:
    """Fleet starts N workers, waits until all are ready (BLPOP), then opens the gate (LPUSH)."""

    #: Every fleet started and not yet reaped; the tests' teardown kills what is left.
    live: list[Fleet] = []

    def __init__(self, redis_url: str, n: int, *args: str, stdin_gate: bool = False) -> None:
        """Start ``n`` workers; ``stdin_gate``: gate on a stdin line (for a Redis that is down)."""
        tag = uuid.uuid4().hex
        self.ready_key = f"test:ready:{tag}"
        self.gate_key = f"test:gate:{tag}"
        self.stdin_gate = stdin_gate
        self.redis: Any = (
            redis.RedisCluster.from_url(redis_url, socket_timeout=60)
            if "--cluster" in args
            else redis.Redis.from_url(redis_url, socket_timeout=60)
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "tests.redis.worker", "--redis", redis_url, *args]
        if stdin_gate:
            cmd += ["--gate", "-"]
        else:
            cmd += ["--ready", self.ready_key, "--gate", self.gate_key]
        self.procs = [
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE if stdin_gate else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(n)
        ]
        self.stderr: dict[int, str] = {}
        Fleet.live.append(self)

    def wait_ready(self, timeout: float = 30) -> None:
        if self.stdin_gate:
            return
        for _ in self.procs:
            if self.redis.blpop([self.ready_key], timeout=timeout) is None:
                self.kill()
                raise TimeoutError("a worker never became ready: " + self._stderr())

    def go(self) -> None:
        if self.stdin_gate:
            for proc in self.procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                proc.stdin.close()
                proc.stdin = None  # so communicate() does not flush a closed pipe
        else:
            self.redis.lpush(self.gate_key, *["go"] * len(self.procs))

    def results(self, timeout: float = 60, allow_killed: bool = False) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise
            self.stderr[proc.pid] = stderr.decode(errors="replace")
            if proc.returncode == -signal.SIGKILL and allow_killed:
                continue
            if proc.returncode != 0:
                raise AssertionError(f"worker {proc.pid} failed ({proc.returncode}): {stderr!r}")
            out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        self.kill()  # all exited: this only reaps and closes
        return out

    def run(self, timeout: float = 60) -> list[dict[str, Any]]:
        self.wait_ready()
        self.go()
        return self.results(timeout)

    def kill(self) -> None:
        """kill ends every worker still running (by its PID) and reaps them all."""
        for proc in self.procs:
            if proc.pid not in self.stderr:  # not reaped by results()
                if proc.poll() is None:
                    proc.kill()
                _, stderr = proc.communicate(timeout=10)  # reaps it and closes its pipes
                self.stderr[proc.pid] = (stderr or b"").decode(errors="replace")
        self.redis.close()
        if self in Fleet.live:
            Fleet.live.remove(self)

    def _stderr(self) -> str:
        return "\n".join(err[-2000:] for err in self.stderr.values() if err)
