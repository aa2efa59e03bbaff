"""`glmv eval` (glmv_jax.evaluate + glmv_jax.benchmark) on a benchmark written here: images of two sizes and an
mp4, two domains; its greedy answers against `glmv generate`'s; errors on bad lines; the table's arithmetic on
a fixed list of rewards; the image-swap derangement and its NLLs."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from PIL import Image
from test_cli_generate import model_dir  # noqa: F401  (the tiny model folder + tokenizer fixture)
from video_files import write_video

from glmv_jax import benchmark, cli, evaluate
from glmv_jax.checkpoint import convert
from glmv_jax.errors import InputError

LINES = [dict(id="c1", domain="counting", answer=2, question="how many red squares", image="small.png"),
         dict(id="c2", domain="counting", answer=3, question="how many blue circles", image="large.png"),
         dict(id="m1", domain="math", answer="3", question="what happens", video="clip.mp4"),
         dict(id="m2", domain="math", answer="\\frac{1}{2}", question="answer one two", image="large.png"),
         dict(id="m3", domain="math", answer="1", question="count three", image="small.png")]
FLAGS = ["--max-new-tokens", "10", "--thinking-budget", "4"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(root / "small.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 70, 3), dtype=np.uint8)).save(root / "large.png")
    write_video(root / "clip.mp4", frames=20, fps=10, height=56, width=84)
    (root / "bench.jsonl").write_text("\n".join(json.dumps(line) for line in LINES) + "\n")
    return root


def test_eval_cli_table_answers_and_greedy_equal_to_generate(model_dir, bench, capsys):  # noqa: F811
    folder, _, tokenizer = model_dir
    out, table_file = bench / "answers.jsonl", bench / "table.json"
    code = cli.main(["eval", "--model", str(folder), "--data", str(bench / "bench.jsonl"), "--samples", "2",
                     "--batch", "4", "--out", str(out), "--json", str(table_file), "--swap-images", *FLAGS])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    for name in ("counting", "math", "overall", "pass@k", "image swap"):
        assert name in printed.out

    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == len(LINES) * 3
    assert {(a["prompt_id"], a["sample"]) for a in answers} == {(x["id"], k) for x in LINES for k in (-1, 0, 1)}
    for a in answers:
        assert set(a) >= {"prompt_id", "domain", "sample", "text", "reward", "format_ok", "forced", "tokens"}
        assert 0 <= a["reward"] <= 1 and a["length"] == len(a["tokens"])
    report = json.loads(table_file.read_text())
    assert report["table"] == json.loads(json.dumps(evaluate.summarize(answers, 2)))
    assert set(report["table"]) == {"overall", "counting", "math"} and report["table"]["math"]["n"] == 3
    swap = report["swap"]
    assert {line["prompt_id"]: line["partner"] for line in swap["lines"]} == {"c1": "c2", "c2": "c1", "m2": "m3",
                                                                              "m3": "m2"}
    assert all(math.isfinite(line[k]) for line in swap["lines"] for k in ("nll_true", "nll_swapped"))
    assert all(line["nll_true"] != line["nll_swapped"] for line in swap["lines"])

    # the greedy answers are glmv generate's for the same prompts (same CLI, one prompt at a time)
    greedy = {a["prompt_id"]: a for a in answers if a["sample"] == -1}
    for line in LINES:
        media = [f"--{kind}={bench / line[kind]}" for kind in ("image", "video") if kind in line]
        code = cli.main(["generate", "--model", str(folder), "--prompt", line["question"], *media, *FLAGS])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        tokens = [t for t in greedy[line["id"]]["tokens"] if t not in tokenizer.eos_ids]
        assert printed.out == tokenizer.decode(tokens) + "\n", line["id"]
        assert ("answer forced" in printed.err) == greedy[line["id"]]["forced"]


def test_eval_on_a_mesh_gives_the_single_device_answers(model_dir, bench, capsys):  # noqa: F811
    folder, _, tokenizer = model_dir
    out = bench / "mesh_answers.jsonl"
    code = cli.main(["eval", "--model", str(folder), "--data", str(bench / "bench.jsonl"), "--batch", "4",
                     "--mesh", "data=2,tensor=2", "--out", str(out), *FLAGS])
    assert code == 0, capsys.readouterr().err
    on_mesh = {a["prompt_id"]: a["tokens"] for a in map(json.loads, out.read_text().splitlines())}
    config, params = convert.load_folder(folder, dtype="float32")
    prompts = benchmark.encode_prompts(benchmark.load_benchmark(bench / "bench.jsonl"), tokenizer, config)
    _, answers = evaluate.run(params, config, tokenizer, prompts,
                              evaluate.EvalSettings(max_new_tokens=10, thinking_budget=4, batch=4))
    assert on_mesh == {a["prompt_id"]: a["tokens"] for a in answers}


@pytest.mark.parametrize("line, message", [
    (dict(domain="chemistry", answer="H2O", question="what"), "unknown domain 'chemistry'"),
    (dict(domain="math", question="what"), "no answer"),
    (dict(domain="math", answer=1), "needs a question"),
    (dict(domain="math", answer=1, question="q", image="missing.png"), "image file not found: missing.png"),
    (dict(domain="math", answer=1, conversation=[{"role": "user", "content": [{"type": "image"}]}]),
     "the conversation has 1 image part(s) but the line gives 0"),
    (dict(LINES[1], id="c1"), "the id 'c1' is used by an earlier line"),
])
def test_bad_lines_are_one_line_errors_before_any_generation(bench, tmp_path, capsys, line, message):
    data = bench / "bad.jsonl"   # beside the media of its good first line
    data.write_text(json.dumps(LINES[0]) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(InputError, match=re.escape("bad.jsonl:3: " + message)):
        benchmark.load_benchmark(data)
    # the CLI says it in one line, before it loads any model (there is none at this path)
    assert cli.main(["eval", "--model", str(tmp_path / "no_model"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glmv eval: error: bad.jsonl:3:") and "\n" not in err and message in err


def test_standard_errors_and_pass_at_k_by_hand():
    assert evaluate.mean_and_se([1, 0, 0, 1, 1]) == pytest.approx((0.6, math.sqrt(0.3 / 5)))  # var(ddof=1) = 0.3
    assert math.isnan(evaluate.mean_and_se([1.0])[1])

    def answer(pid, domain, sample, reward, ok=True, forced=False, length=10):
        return dict(prompt_id=pid, domain=domain, sample=sample, reward=reward, format_ok=ok, forced=forced,
                    length=length)
    answers = [answer("a", "x", -1, 1.0), answer("b", "x", -1, 0.0, ok=False), answer("c", "y", -1, 0.5),
               answer("a", "x", 0, 1.0), answer("a", "x", 1, 0.0), answer("a", "x", 2, 0.0),
               answer("b", "x", 0, 0.0), answer("b", "x", 1, 0.0), answer("b", "x", 2, 0.0, forced=True),
               answer("c", "y", 0, 0.4, length=40), answer("c", "y", 1, 0.6), answer("c", "y", 2, 0.2)]
    table = evaluate.summarize(answers, 3)
    x, overall = table["x"], table["overall"]
    assert x["greedy_acc"] == 0.5 and x["greedy_se"] == pytest.approx(0.5)           # std([1, 0], ddof=1) / sqrt 2
    assert x["sampled_acc"] == pytest.approx(1 / 6) and x["sampled_se"] == pytest.approx(1 / 6)  # means 1/3, 0
    assert x["pass_at_k"] == 0.5 and x["forced"] == pytest.approx(1 / 8) and x["format_ok"] == pytest.approx(7 / 8)
    means = [1 / 3, 0.0, 0.4]
    assert overall["sampled_acc"] == pytest.approx(np.mean(means))
    assert overall["sampled_se"] == pytest.approx(np.std(means, ddof=1) / math.sqrt(3))
    assert overall["greedy_se"] == pytest.approx(np.std([1, 0, 0.5], ddof=1) / math.sqrt(3))
    assert overall["pass_at_k"] == pytest.approx(2 / 3)                               # 'a' and 'c' (0.6 > 0.5)
    assert overall["mean_length"] == pytest.approx((11 * 10 + 40) / 12) and table["y"]["greedy_se"] is None
    assert evaluate.flat_metrics(table) == {"reward": 0.5, "reward_se": overall["greedy_se"],
                                            "format_ok": overall["format_ok"], "forced": overall["forced"],
                                            "reward/x": 0.5, "reward/y": 0.5}


def test_swap_partners_are_a_derangement_within_each_domain(bench):
    items = benchmark.load_benchmark(bench / "bench.jsonl")
    third = Image.fromarray(np.zeros((30, 30, 3), np.uint8))
    items += [benchmark.Item("lone", "ocr", "abc", "read", images=(items[0].images[0],)),
              benchmark.Item("c3", "counting", 1, "how many", images=(third,))]
    partners = benchmark.swap_partners(items)
    assert partners == [1, 6, None, 4, 3, None, 0]   # c1->c2->c3->c1, m2<->m3; the video line and a lone ocr: none
    for i, j in enumerate(partners):
        assert j is None or (j != i and items[j].domain == items[i].domain)
    swapped = benchmark.with_swapped_images(items, partners)
    assert [s.id for s in swapped] == ["c1", "c2", "m2", "m3", "c3"]
    assert [s.images for s in swapped] == [items[j].images for j in partners if j is not None]
    assert all(s.images != items[i].images for s, i in zip(swapped, [0, 1, 3, 4, 6]))  # no line keeps its image
