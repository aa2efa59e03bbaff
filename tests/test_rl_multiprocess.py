"""RLCS as 2 real processes x 4 CPU devices (jax.distributed over gloo, launched by launch/local_multiprocess.sh)
is the same job as 1 process x 8 devices on the same mesh (fsdp 4 x tensor 2): the same rewards and advantages
every iteration, the same logged metrics (losses, gradient norms, held-out rewards, ...), and after a restart from
its finished checkpoint (in the same processes, whose compiled programs are warm) the same next iteration. Hosts
that run different configs stop with a clear error, not a hang.

Each process runs this file as a script (`main`): the RL run of test_rl_mesh.py, with its stand-in reward (a
random model earns no verifier reward) and its spy on the advantages, written to seen_<phase>_<process>.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from glmv_jax.train.config import MeshConfig
from glmv_jax.train.metrics import read_jsonl
from test_rl_loop import rl_config, sft_folder  # noqa: F401  (the fixture)
from test_rl_mesh import run

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("rollout_s", "score_s", "update_s", "rollout_tokens_per_s")
GAPS = ("logp_gap_mean", "logp_gap_max")   # float noise itself (~5e-7): bounded, not compared
# The GRPO loss is a mean of terms of size |advantage| ~ 1 that cancel to ~1e-3: its float32 rounding is ~1e-7 absolute
ABSOLUTE = {"loss": 1e-6}


def main(workdir: str, *phases: str) -> None:
    """One process of the job: join it, then run RLCS in `workdir` once per phase, a config path (or two joined by
    "+": process 0's and process 1's); each phase after the first resumes from the checkpoint of the one before."""
    from glmv_jax.train import distributed

    distributed.initialize()
    import jax

    from glmv_jax.train.config import load_train_config

    for number, phase in enumerate(phases):
        distributed.sync(f"phase {number}")   # the run before has ended on every process, as a job restarted later
        configs = phase.split("+")
        with pytest.MonkeyPatch.context() as patch:
            seen, _ = run(load_train_config(configs[jax.process_index() % len(configs)], []), Path(workdir), patch)
        (Path(workdir) / f"seen_{number}_{jax.process_index()}.json").write_text(
            json.dumps([[r.tolist(), a.tolist()] for r, a in seen]))


def score_main(out: str) -> None:
    """One process of the scoring check: `rlcs.score` of 7 rows (4 scored here or 3 there) against every row scored
    in this process alone."""
    from glmv_jax.train import distributed

    distributed.initialize()
    import jax

    from glmv_jax.data import synthetic
    from glmv_jax.rl import rewards, rlcs

    examples = [synthetic.example_at(i, seed=5) for i in range(7)]
    texts = [e["target"] if i % 3 else "<answer>no</answer>" for i, e in enumerate(examples)]
    shared = rlcs.score(examples, texts)
    alone = rewards.score_batch(examples, texts)
    assert [(s["reward"], s["format_ok"], s["domain"]) for s in shared] == \
        [(s["reward"], s["format_ok"], s["domain"]) for s in alone]
    (Path(out) / f"scored_{jax.process_index()}.json").write_text(json.dumps([s["reward"] for s in shared]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir: Path, *phases: str) -> tuple[int, str]:
    """`main` as 2 processes x 4 CPU devices; (exit status, output)."""
    env = {**os.environ, "PROCESSES": "2", "DEVICES_PER_PROCESS": "4", "PORT": str(free_port()),
           "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    command = ["bash", str(ROOT / "launch/local_multiprocess.sh"), sys.executable, __file__, str(workdir), *phases]
    workdir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    return out.returncode, out.stdout + out.stderr


def write_config(cfg, path: Path) -> str:
    path.write_text(cfg.to_yaml())
    return str(path)


def assert_same_metrics(got: list[dict], want: list[dict], rtol: float = 1e-5) -> float:
    """Every logged value but the timings and the on-policy gaps equal within `rtol` relative (and 1e-7 absolute
    near 0; the loss within 1e-6 absolute, `ABSOLUTE`); the gaps below 1e-5 on both. Returns the largest relative
    difference of the values other than the loss."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    worst = 0.0
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w), (sorted(g), sorted(w))
        assert all(g[k] <= 1e-5 and w[k] <= 1e-5 for k in GAPS if k in w), (g, w)
        for key in (k for k in w if k not in TIMING + GAPS):
            a, b = float(g[key]), float(w[key])
            if np.isnan(b):
                assert np.isnan(a), (w["step"], key, a)
                continue
            assert abs(a - b) <= rtol * abs(b) + ABSOLUTE.get(key, 1e-7), (w["step"], key, a, b)
            if key not in ABSOLUTE:
                worst = max(worst, abs(a - b) / abs(b) if b else 0.0)
    return worst


@pytest.mark.slow
def test_rl_on_two_processes_equals_one_process(sft_folder, tmp_path, monkeypatch):  # noqa: F811
    cfg = dataclasses.replace(rl_config(sft_folder, iterations=2, groups=2, group_size=4, max_new_tokens=10,
                                        eval_every=2, eval_prompts=2), mesh=MeshConfig(fsdp=4, tensor=2))
    first = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, iterations=1))   # then a restart for the second
    phases = [write_config(c, tmp_path / f"rl{c.rl.iterations}.yaml") for c in (first, cfg)]
    two = tmp_path / "two"
    started = time.perf_counter()
    code, log = two_processes(two, *phases)
    assert code == 0, log[-4000:]
    assert f"resumed from {two / 'checkpoints'}" in log
    two_s = time.perf_counter() - started

    # this process, 8 devices (conftest.py), the same mesh: the same two phases
    one = [run(c, tmp_path / "one", monkeypatch)[0] for c in (first, cfg)]
    assert any(np.abs(a).sum() > 0 for phase in one for _, a in phase)   # a reward spread: the updates did something
    for phase, seen_one in enumerate(one):
        for process in (0, 1):
            seen = json.loads((two / f"seen_{phase}_{process}.json").read_text())
            assert len(seen) == len(seen_one) == 1
            for (r2, a2), (r1, a1) in zip(seen, seen_one):
                np.testing.assert_array_equal(np.array(r2), r1)
                np.testing.assert_array_equal(np.array(a2), a1)
    got, want = read_jsonl(two / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1, 2]
    worst = assert_same_metrics(got, want)
    loss = max(abs(g["loss"] - w["loss"]) for g, w in zip(got[1:], want[1:]))
    print(json.dumps({"max_rel_metric_diff": worst, "max_abs_loss_diff": loss, "two_processes_s": round(two_s, 1)}))


@pytest.mark.slow
def test_hosts_with_different_configs_stop_with_an_error(sft_folder, tmp_path):  # noqa: F811
    cfg = rl_config(sft_folder, iterations=1)
    other = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, prompt_pool=cfg.rl.prompt_pool + 1))
    code, log = two_processes(tmp_path / "rl", write_config(cfg, tmp_path / "a.yaml") + "+" +
                              write_config(other, tmp_path / "b.yaml"))
    assert code != 0
    assert "DataError: hosts disagree on the run config and prompts" in log, log[-3000:]


@pytest.mark.slow
def test_each_process_scores_its_share_and_all_get_every_reward(tmp_path):
    code, log = two_processes(tmp_path, "--score")
    assert code == 0, log[-3000:]
    got = [json.loads((tmp_path / f"scored_{p}.json").read_text()) for p in (0, 1)]
    assert got[0] == got[1] and 0 < sum(got[0]) < 7, got


if __name__ == "__main__":
    if sys.argv[2:] == ["--score"]:
        score_main(sys.argv[1])
    else:
        main(*sys.argv[1:])
