"""The reward worker process: imports the verifiers through the package (no jax), serves length-prefixed pickled
requests on stdin and writes JSON replies on stdout (see :mod:`glmv_jax.rl.rewards.sandbox` for the parent's side).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable

from glmv_jax.rl.rewards.pipeline import MIN_REWARD, evaluate
from glmv_jax.rl.rewards.verifiers import BUILTINS
from glmv_jax.rl.rewards.verifiers.grounding import verify_grounding
from glmv_jax.rl.rewards.verifiers.math import verify_math
from glmv_jax.rl.rewards.verifiers.ocr import verify_ocr

WORKER_MEMORY_BYTES = 4 << 30    # [ours] RLIMIT_AS of a worker
HEADER = struct.Struct(">Q")
WARMUP_MATH = (("\\sqrt{2}", "1.41421356"), ("x^2+1", "1+x^2"), ("\\{1,2\\}", "\\{2,1\\}"),
               ("[0,1)", "(0,1]"), ("y = 2x+1", "(1, 2)"))


def _read_exact(f, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def main() -> None:  # pragma: no cover - runs in the worker process
    """Entry point of a worker: serve length-prefixed pickled requests on stdin, JSON replies on stdout."""
    warnings.simplefilter("ignore")
    parent = os.getppid()

    def watchdog():  # die with the parent, even in the middle of a computation (PR_SET_PDEATHSIG would fire
        while True:  # when the parent's spawning *thread* ends, so it cannot be used here)
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, name="glmv-reward-watchdog", daemon=True).start()
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > WORKER_MEMORY_BYTES:
            resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, hard))
    except Exception:
        pass
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    os.dup2(2, 1)  # stray prints of verifiers go to stderr, never into the protocol
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout = sys.stderr
    # warm up: import sympy and math-verify, and walk every verifier once (the LaTeX parser caches its
    # prediction tables while parsing, so a few common shapes are parsed here rather than in a first call)
    for answer, truth in WARMUP_MATH:
        verify_math(answer, truth)
    verify_math("\\frac{1}{2}", "0.5")
    verify_math("2**(1/2)", "1.4142135623730951", tolerance=1e-9)
    verify_math("0.1+0.2", "0.3")
    verify_math("(-8)**(1/3)", "-2")
    verify_ocr("abc", "abd")
    verify_grounding("[1,2,3,4]", [1, 2, 3, 4])
    # the ready message says what the worker imported: no jax, and which copy of this package
    _reply(proto_out, {"ready": True, "pid": os.getpid(), "jax": "jax" in sys.modules, "flax": "flax" in sys.modules,
                       "package": os.path.dirname(os.path.abspath(__file__))})
    fns: dict[bytes, Callable] = {}
    while True:
        header = _read_exact(proto_in, HEADER.size)
        if header is None:
            break
        payload = _read_exact(proto_in, HEADER.unpack(header)[0])
        if payload is None:
            break
        try:
            req = pickle.loads(payload)
            if req["builtin"] is not None:
                fn = BUILTINS[req["builtin"]]
            else:
                fn = fns.get(req["fn"])
                if fn is None:
                    try:
                        if req.get("sys_path"):
                            sys.path[:] = [p for p in req["sys_path"] if isinstance(p, str)]
                        fn = pickle.loads(req["fn"])
                    except Exception as e:
                        _reply(proto_out, {"reward": MIN_REWARD, "unpicklable": True,
                                           "error": f"cannot load the verifier in a worker: {e!r}"[:300]})
                        continue
                    fns[req["fn"]] = fn
            out = evaluate(fn, req["kwargs"], req["box"], req["language_mix"], req["repetition"],
                           req["response"], req["ground_truth"])
        except BaseException as e:  # noqa: BLE001
            out = {"reward": MIN_REWARD, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        _reply(proto_out, out)


def _reply(f, obj: dict) -> None:  # pragma: no cover - runs in the worker process
    data = json.dumps(obj).encode()
    f.write(HEADER.pack(len(data)) + data)
