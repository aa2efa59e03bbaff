"""`glmv demo` end to end at smoke size: three stages, the report (table, PNG curves, three examples), and a
second run that reuses every stage."""
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_demo_fast_and_reuse(tmp_path):
    from glmv_jax import demo
    from glmv_jax.demo_eval import paired_gain

    out = demo.run(tmp_path, fast=True)
    report = (tmp_path / "report.md").read_text()
    for row in ("| after pretraining |", "| after SFT |", "| after RL |"):
        assert row in report
    header = next(line for line in report.splitlines() if line.startswith("| stage |"))
    for column in ("greedy acc", "sampled acc", "pass@4", "format_ok", "swap: greedy true -> swapped", "swap drop",
                   "NLL true -> swapped"):
        assert column in header
    by_domain = [line for line in report.splitlines() if line.startswith("| stage |")][1]
    kept = demo.stage_configs(tmp_path)["rl"].data.domains   # the tasks the demo keeps (the held-out prompts')
    assert kept and by_domain == "| stage | " + " | ".join(sorted(kept)) + " |"
    assert re.search(r"\| after pretraining \|( - \|){6} caption \d+\.\d+ -> \d+\.\d+", report)
    for png in ("pretrain_loss.png", "sft_loss.png", "rl_reward.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in report
    examples = re.findall(r"!\[[a-z]+ example\]\((example_\d+\.png)\)", report)
    assert len(examples) == 3
    for name in examples:
        assert (tmp_path / name).is_file()
    assert report.count("**Question:**") == 3 and report.count("**Ground truth:**") == 3
    assert set(out["evals"]) == {"pretrain", "sft", "rl"}
    assert not any(t["reused"] for t in out["timings"].values())
    assert set(out["evals"]["pretrain"]) == {"caption"}
    for stage in ("sft", "rl"):
        row, swap = out["evals"][stage]["table"]["overall"], out["evals"][stage]["swap"]["overall"]
        assert row["n"] == 8 and swap["n"] == 8
        for key in ("greedy_acc", "sampled_acc", "pass_at_k", "format_ok"):
            assert 0.0 <= row[key] <= 1.0, key
        assert 0.0 <= swap["greedy_acc_swapped"] <= 1.0 and swap["nll_swapped"] > 0
        per_prompt = out["evals"][stage]["per_prompt"]    # the rewards the paired RL - SFT gain is taken over
        assert np.mean(per_prompt["greedy"]) == pytest.approx(row["greedy_acc"])
        assert np.mean(per_prompt["sampled"]) == pytest.approx(row["sampled_acc"])
    sft, rl = (out["evals"][s]["table"]["overall"] for s in ("sft", "rl"))
    gain = paired_gain(out["evals"]["sft"], out["evals"]["rl"])
    for key in ("greedy", "sampled"):
        assert gain[key][0] == pytest.approx(rl[f"{key}_acc"] - sft[f"{key}_acc"])
    assert demo.rl_gain(out["evals"]) in report

    again = demo.run(tmp_path, fast=True)
    assert all(t["reused"] for t in again["timings"].values())
    assert again["evals"] == out["evals"]          # the saved evaluations, not new ones
    assert again["total_s"] < out["total_s"] / 3
    second = (tmp_path / "report.md").read_text()
    assert demo.table(out["evals"]) in second
    assert "(reused)" in second
