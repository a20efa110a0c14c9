"""Run a fleet of ``tests.redis.worker`` processes behind one start gate (tests and benchmark)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]


class Fleet:
    """Fleet starts N workers, waits until all are ready (BLPOP), then opens the gate (LPUSH)."""

    def __init__(self, redis_url: str, n: int, *args: str, gate: str | None = None) -> None:
        tag = uuid.uuid4().hex
        self.ready_key = f"test:ready:{tag}"
        self.gate_key = gate or f"test:gate:{tag}"
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=60)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "tests.redis.worker", "--redis", redis_url, *args]
        cmd += ["--ready", self.ready_key, "--gate", self.gate_key]
        self.procs = [
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(n)
        ]

    def wait_ready(self, timeout: float = 30) -> None:
        for _ in self.procs:
            if self.redis.blpop([self.ready_key], timeout=timeout) is None:
                self.kill()
                raise TimeoutError("a worker never became ready: " + self._stderr())

    def go(self) -> None:
        self.redis.lpush(self.gate_key, *["go"] * len(self.procs))

    def results(self, timeout: float = 60, allow_killed: bool = False) -> list[dict[str, Any]]:
        out = []
        for proc in self.procs:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
            if proc.returncode == -signal.SIGKILL and allow_killed:
                continue
            if proc.returncode != 0:
                raise AssertionError(f"worker {proc.pid} failed ({proc.returncode}): {stderr!r}")
            out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        self.redis.close()
        return out

    def run(self, timeout: float = 60) -> list[dict[str, Any]]:
        self.wait_ready()
        self.go()
        return self.results(timeout)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def _stderr(self) -> str:
        errs = []
        for proc in self.procs:
            if proc.poll() is not None and proc.stderr is not None:
                errs.append(proc.stderr.read().decode(errors="replace")[-2000:])
        return "\n".join(errs)
