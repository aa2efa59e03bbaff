"""Smoke test of `glmv bench` (benchmarks/bench.py) on the tiny config with tiny settings."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import bench
from glmv_jax import cli


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = bench.run(config="tiny", dtypes=("float32",), repeats=1, new_tokens=4, prefill_batches=(1,),
                  decode_batches=(2,), train_batch=2, image_side=56, text_tokens=16, matmul_size=1024,
                  bandwidth_mib=64, json_path=out / "bench.json", png_path=out / "bench.png")
    return r, out


def test_every_figure_has_ours_theirs_ratio(result):
    r, _ = result
    sections = [f["section"] for f in r["figures"]]
    assert sections.count("limits") == 2  # f32 matmul, bandwidth
    assert {"prefill", "forward", "train", "decode"} <= set(sections)
    for f in r["figures"]:
        assert f["ours"] > 0 and f["theirs"] > 0, f["name"]
        assert math.isclose(f["ratio"], f["ours"] / f["theirs"]), f["name"]
        if f["section"] != "limits":
            assert 0 < f["utilisation"] < 1.5, (f["name"], f["utilisation"])
            assert f["compile_s"] > 0 and f["peak_bytes_ours"]["total"] > 0 and f["peak_bytes_theirs"] > 0
            assert f["malloc"]["ours"] == f["malloc"]["theirs"] == bench.malloc_in_use()  # one process
    assert r["limits"]["matmul"]["float32"] > 0 and r["limits"]["bandwidth"] > 0
    assert r["settings"]["hf_attention"]


def test_same_inputs_on_both_sides(result):
    r, _ = result
    by_section = {f["section"]: f for f in r["figures"]}
    losses = by_section["train"]["first_loss"]
    assert losses["ours"] == pytest.approx(losses["theirs"], rel=1e-4)  # same weights, batch and labels
    assert by_section["decode"]["same_greedy_tokens"]


def test_outputs_written(result):
    r, out = result
    written = json.loads((out / "bench.json").read_text())
    assert [f["name"] for f in written["figures"]] == [f["name"] for f in r["figures"]]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = bench.table(r)
    assert all(f["name"] in text for f in r["figures"])


def test_cli_wiring():
    args = cli.build_parser().parse_args(["bench", "--only", "prefill", "--repeats", "2", "--dtypes", "float32"])
    assert args.run is cli._bench and args.only == "prefill" and args.repeats == 2


def test_gpu_bench_dry_run(tmp_path):
    """`glmv bench --backend gpu --dry-run`: the GPU bench's code on the tiny config on this machine's device
    (a check that it runs end to end and writes its JSON, not a measurement)."""
    from benchmarks import gpu
    args = cli.build_parser().parse_args(["bench", "--backend", "gpu", "--dry-run", "--json",
                                          str(tmp_path / "gpu.json")])
    assert args.backend == "gpu" and args.dry_run
    assert args.run(args) == 0
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert [f["name"] for f in written["figures"]] == ["prefill b=1 bf16", "forward b=1 bf16", "train step b=1 bf16"]
    assert all(f["ours"] > 0 and f["theirs"] > 0 for f in written["figures"])
    assert gpu.nominal_peak("NVIDIA H100 80GB HBM3") == 989e12 and gpu.nominal_peak("cpu") is None
