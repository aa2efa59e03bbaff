"""The time-bounded sandbox of the reward system [ours]: a pool of warm worker processes, and the call that waits
for one of them until its deadline.

Every reward is computed in a small pool of warm worker *processes* (``python -I`` importing
:mod:`glmv_jax.rl.rewards.worker` through the package, from the folder of the caller's copy of glmv_jax; that
imports no jax, as ``import glmv_jax`` is lazy; sympy and math-verify are imported and exercised before the
worker reports ready: about 0.65 s from spawn to ready on 2 loaded CPU cores, 0.3 s of it warming the LaTeX
parser). The caller sends the request over a pipe and waits with ``select`` until the deadline
(:data:`DEFAULT_TIMEOUT` = 1.5 s, per call); on timeout the worker is killed and a replacement starts in the
background, and the call returns 0.0. Threads cannot stop a runaway sympy computation, processes can. The
first call of a process blocks until one worker is ready (0.5-1 s; :func:`warmup` does it up front);
that start-up is not counted against the deadline. Workers run with an address-space limit of
:data:`WORKER_MEMORY_BYTES`, in their own session, and die with their parent (EOF on stdin, plus a watchdog
thread polling the parent pid). Custom verifiers run in the workers when they pickle by reference
(module-level functions); others (lambdas, closures) run in a daemon thread of the caller: still
time-bounded for the caller, but not killable. If workers cannot start at all, everything falls back to that
thread mode with a warning. Measured on 2 CPU cores: about 0.1-0.6 ms per call for the round trip.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import pickle
import select
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import glmv_jax
from glmv_jax.rl.rewards.format import MAX_RESPONSE_CHARS
from glmv_jax.rl.rewards.pipeline import MIN_REWARD, Spec, evaluate
from glmv_jax.rl.rewards.verifiers import BUILTINS
from glmv_jax.rl.rewards.worker import HEADER

DEFAULT_TIMEOUT = 1.5            # [ours] seconds per reward call
STARTUP_TIMEOUT = 60.0           # [ours] seconds for a worker to become ready
# The worker imports the verifiers through the package, from the folder holding this copy of glmv_jax (first on
# its path, so a different installed copy cannot answer); glmv_jax imports lazily, so that costs no jax.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(glmv_jax.__file__)))
BOOT = ("import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from glmv_jax.rl.rewards import worker\n"
        "worker.main()\n")


class _Worker:
    """One worker process and its two pipes (the parent's end)."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_", "TF_"))}
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", BOOT, PACKAGE_ROOT], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=None, bufsize=0, close_fds=True, env=env, start_new_session=True)
        self.rfd = self.proc.stdout.fileno()
        self.wfd = self.proc.stdin.fileno()
        os.set_blocking(self.wfd, False)
        self.buf = bytearray()
        self.info: dict = {}              # its ready message: pid, whether jax was imported, package path

    def send(self, payload: bytes, deadline: float) -> bool:
        data = memoryview(HEADER.pack(len(payload)) + payload)
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                _, w, _ = select.select([], [self.wfd], [], remaining)
                if not w:
                    continue
                n = os.write(self.wfd, data)
            except BlockingIOError:
                continue
            except OSError:
                return False
            data = data[n:]
        return True

    def recv(self, deadline: float) -> bytes | None:
        """One reply, or ``None`` on timeout or end of file."""
        while True:
            if len(self.buf) >= HEADER.size:
                n = HEADER.unpack(self.buf[:HEADER.size])[0]
                if len(self.buf) >= HEADER.size + n:
                    msg = bytes(self.buf[HEADER.size:HEADER.size + n])
                    del self.buf[:HEADER.size + n]
                    return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                r, _, _ = select.select([self.rfd], [], [], remaining)
                if not r:
                    continue
                chunk = os.read(self.rfd, 1 << 16)
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def kill(self) -> None:
        try:
            self.proc.kill()
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass


class _Pool:
    """A fixed number of warm workers; a killed or dead worker is replaced in the background."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.idle: list[_Worker] = []
        self.all: set[_Worker] = set()
        self.starting = 0
        self.failures = 0
        self.broken = False
        self.closed = False
        for _ in range(size):
            self._spawn_async()

    def _spawn_async(self) -> None:
        with self.cond:
            if self.closed or self.broken:
                return
            self.starting += 1
        threading.Thread(target=self._spawn, name="glmv-reward-spawn", daemon=True).start()

    def _spawn(self) -> None:
        w = None
        ok = False
        try:
            w = _Worker()
            reply = w.recv(time.monotonic() + STARTUP_TIMEOUT)
            w.info = json.loads(reply) if reply is not None else {}
            ok = w.info.get("ready") is True
        except Exception:
            ok = False
        retry = False
        with self.cond:
            self.starting -= 1
            if ok and not self.closed:
                self.idle.append(w)
                self.all.add(w)
                self.failures = 0
            else:
                if not self.closed:
                    self.failures += 1
                    if self.failures >= 3:
                        self.broken = True
                    else:
                        retry = True
            self.cond.notify_all()
        if not ok and w is not None:
            w.kill()
        elif ok and self.closed:
            w.kill()
        if retry:
            self._spawn_async()

    def wait_ready(self, timeout: float, all_workers: bool = False) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not self.broken:
                if (len(self.all) >= self.size) if all_workers else (self.all or self.starting == 0):
                    break
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            return bool(self.all) and not self.broken

    def acquire(self, deadline: float) -> _Worker | None:
        with self.cond:
            while True:
                if self.idle:
                    return self.idle.pop()
                if self.broken or self.closed:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)

    def release(self, w: _Worker) -> None:
        with self.cond:
            if self.closed:
                self.all.discard(w)
            else:
                self.idle.append(w)
                self.cond.notify()
                return
        w.kill()

    def discard(self, w: _Worker) -> None:
        with self.cond:
            self.all.discard(w)
        w.kill()
        self._spawn_async()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            workers = list(self.all)
            self.all.clear()
            self.idle.clear()
            self.cond.notify_all()
        if os.getpid() == self.pid:
            for w in workers:
                w.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()
_WARNED: set[str] = set()


def _pool_size() -> int:
    try:
        return max(1, int(os.environ.get("GLMV_REWARD_WORKERS", "0"))) if os.environ.get(
            "GLMV_REWARD_WORKERS") else max(1, min(4, os.cpu_count() or 1))
    except ValueError:
        return max(1, min(4, os.cpu_count() or 1))


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def get_pool() -> _Pool | None:
    """The process's worker pool, started (and waited for) on first use; ``None`` if workers cannot run."""
    global _POOL
    pool = _POOL
    if pool is not None and pool.pid == os.getpid() and not pool.broken:
        return pool
    with _POOL_LOCK:
        pool = _POOL
        if pool is None or pool.pid != os.getpid():
            if not sys.executable:
                _warn_once("noexe", "glmv_jax.rl.rewards: no Python executable for reward workers; verifiers "
                                    "run in threads of the caller (time-bounded, but not killable)")
                return None
            pool = _POOL = _Pool(_pool_size())
    pool.wait_ready(STARTUP_TIMEOUT)
    if pool.broken or not pool.all:
        _warn_once("broken", "glmv_jax.rl.rewards: reward workers failed to start; verifiers run in threads of "
                             "the caller (time-bounded, but not killable)")
        return None
    return pool


def warmup(all_workers: bool = True) -> bool:
    """Start the worker pool now (it otherwise starts on the first reward call) and wait until the workers are
    ready; returns whether worker processes are available."""
    pool = get_pool()
    if pool is None:
        return False
    if all_workers:
        pool.wait_ready(STARTUP_TIMEOUT, all_workers=True)
    return True


def shutdown() -> None:
    """Stop the worker processes (a later call starts new ones)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


def _after_fork_in_child() -> None:  # pragma: no cover
    global _POOL_LOCK, _POOL
    _POOL_LOCK = threading.Lock()
    _POOL = None  # the parent's workers belong to the parent


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# ============================================================= one time-bounded call
def _result(reward: float = MIN_REWARD, error: str | None = None, **extra) -> dict:
    out = {"reward": reward, "language_mix": False, "repetition": False, "error": error, "timed_out": False}
    out.update(extra)
    return out


def _run_in_thread(spec: Spec, response: Any, gt: Any, deadline: float) -> dict:
    fn = BUILTINS[spec.verifier] if isinstance(spec.verifier, str) else spec.verifier
    box: dict = {}

    def target():
        box["out"] = evaluate(fn, spec.kwargs, spec.box, spec.language_mix, spec.repetition, response, gt)

    t = threading.Thread(target=target, name="glmv-reward-thread", daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        return _result(error="timeout (thread; the verifier keeps running)", timed_out=True)
    out = box.get("out") or _result(error="verifier thread failed")
    out.setdefault("timed_out", False)
    return out


def run(spec: Spec, response: Any, gt: Any, timeout: float | None) -> dict:
    """Evaluate one response under the spec's time bound; never raises."""
    try:
        if not isinstance(response, str):
            return _result(error="response is not a string")
        if len(response) > MAX_RESPONSE_CHARS:
            return _result(error=f"response longer than {MAX_RESPONSE_CHARS} characters")
        limit = float(timeout if timeout is not None else spec.timeout if spec.timeout is not None
                      else DEFAULT_TIMEOUT)
        pool = None if spec.in_thread else get_pool()
        deadline = time.monotonic() + limit
        if pool is None:
            return _run_in_thread(spec, response, gt, deadline)
        req = {"builtin": spec.verifier if isinstance(spec.verifier, str) else None, "fn": spec.pickled,
               "sys_path": None if isinstance(spec.verifier, str) else list(sys.path), "kwargs": spec.kwargs,
               "box": spec.box, "language_mix": spec.language_mix, "repetition": spec.repetition,
               "response": response, "ground_truth": gt}
        try:
            payload = pickle.dumps(req)
        except Exception:
            return _run_in_thread(spec, response, gt, deadline)
        while True:
            w = pool.acquire(deadline)
            if w is None:
                if pool.broken:
                    return _run_in_thread(spec, response, gt, deadline)
                return _result(error="no reward worker free before the deadline", timed_out=True)
            if not w.send(payload, deadline):
                if time.monotonic() >= deadline:
                    pool.discard(w)
                    return _result(error="timeout while sending", timed_out=True)
                pool.discard(w)  # a worker that died while idle: try another one
                continue
            reply = w.recv(deadline)
            if reply is None:
                timed_out = time.monotonic() >= deadline
                pool.discard(w)
                return _result(error=f"timeout after {limit:g} s" if timed_out else "worker died",
                               timed_out=timed_out)
            pool.release(w)
            out = json.loads(reply)
            if out.get("unpicklable"):
                spec.in_thread = True
                _warn_once(f"unpicklable:{id(spec)}", f"glmv_jax.rl.rewards: {out.get('error')}; this verifier "
                                                      f"now runs in a thread of the caller")
                return _run_in_thread(spec, response, gt, deadline)
            out.setdefault("timed_out", False)
            r = out.get("reward")
            out["reward"] = float(r) if isinstance(r, (int, float)) and math.isfinite(r) else MIN_REWARD
            out["reward"] = min(1.0, max(0.0, out["reward"]))
            return out
    except Exception as e:  # pragma: no cover - defensive
        return _result(error=f"{type(e).__name__}: {e}"[:300])
