"""Run fuzz cases in a forked worker under a time limit and an address-space limit.

A case that hangs, or allocates far more than it should, would take the test run (or the
machine) with it in-process. Here it runs in a child process with RLIMIT_AS set to what the
parent uses plus MEMORY, and is killed after SECONDS; the parent gets back an Outcome. The
worker lives across cases (one fork, not one per case) and is replaced after a kill.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import traceback
from dataclasses import dataclass

MEMORY = 2 << 30  # bytes a case may allocate beyond the parent's address space
SECONDS = 30.0  # wall time a case may take


@dataclass
class Outcome:
    kind: str  # "ok", "error" (it raised), "timeout", "died"
    value: object = None  # what the case returned
    error: str = ""  # the exception's class name
    message: str = ""
    trace: str = ""

    def __str__(self):
        return f"{self.kind} {self.error}: {self.message}\n{self.trace}"


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _serve(conn, limit: int):
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        job = conn.recv()
        if job is None:
            return
        fn, args = job
        try:
            out = Outcome("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - every outcome goes back to the parent
            out = Outcome("error", None, type(e).__name__, str(e), traceback.format_exc())
        try:
            conn.send(out)
        except Exception as e:  # noqa: BLE001 - a value that cannot be sent back
            conn.send(Outcome("error", None, type(e).__name__, f"returning the value: {e}"))


class Sandbox:
    def __init__(self, memory: int = MEMORY, seconds: float = SECONDS):
        self.memory, self.seconds, self.proc, self.conn = memory, seconds, None, None
        self.cases = 0

    def _start(self):
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, _vm_size() + self.memory),
                                daemon=True)
        self.proc.start()

    def __call__(self, fn, *args) -> Outcome:
        """fn(*args) in the worker; fn must be a module-level function (sent by name)."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.cases += 1
        self.conn.send((fn, args))
        if self.conn.poll(self.seconds):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.proc.kill()
        self.proc.join()
        kind = "died" if self.proc.exitcode not in (None, -9) else "timeout"
        self.proc = None
        return Outcome(kind, message=f"after {self.seconds} s" if kind == "timeout" else "")

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc = None


def pid() -> int:
    return os.getpid()
