"""Curriculum sampling: tiers from pass rates, online updates, tier-weighted sampling that keeps the domain mix,
the expansion-ratio EMA and the balanced-group selection (hand-computed values), and the dict round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest

from glmv_jax.rl.curriculum import (TIER_NAMES, TIER_WEIGHTS, Curriculum, expansion_ratio, is_informative,
                                    select_balanced, tiers_of)


def _curriculum(**kwargs) -> Curriculum:
    """Domain "a": 300 examples, 60 per tier; domain "b": 100 examples, 50 very easy and 50 medium."""
    rates_per_tier = (1.0, 0.875, 0.5, 0.125, 0.0)  # posterior means 0.9, 0.8, 0.5, 0.2, 0.1 with k = 8
    ids, domains, rates = [], [], []
    for t, p in enumerate(rates_per_tier):
        for j in range(60):
            ids.append(f"a-{t}-{j}")
            domains.append("a")
            rates.append(p)
    for j in range(100):
        ids.append(f"b-{j}")
        domains.append("b")
        rates.append(1.0 if j % 2 else 0.5)
    return Curriculum.from_pass_at_k(ids, domains, rates, k=8, **kwargs)


# -------------------------------------------------------------------------------------------------- tiers
def test_tier_thresholds():
    p = [1.0, 0.9, 0.8999, 0.7, 0.6999, 0.5, 0.3, 0.2999, 0.1001, 0.1, 0.0]
    assert tiers_of(p).tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert TIER_NAMES == ("very_easy", "easy", "medium", "hard", "very_hard")


def test_tiers_from_pass_at_k():
    cur = Curriculum.from_pass_at_k(["e", "m", "h", "vh", "ve", "x"], ["d"] * 6,
                                    [0.875, 0.5, 0.125, 0.0, 1.0, 0.75], k=8)
    # Beta(k p + 1, k (1 - p) + 1): 8/10, 5/10, 2/10, 1/10, 9/10, 7/10
    np.testing.assert_allclose(cur.success_rates(), [0.8, 0.5, 0.2, 0.1, 0.9, 0.7])
    assert [cur.tier_name(i) for i in ["ve", "e", "x", "m", "h", "vh"]] == [
        "very_easy", "easy", "easy", "medium", "hard", "very_hard"]
    assert cur.tier_counts() == {"d": {"very_easy": 1, "easy": 2, "medium": 1, "hard": 1, "very_hard": 1}}
    with pytest.raises(ValueError):
        Curriculum.from_pass_at_k(["a", "a"], ["d", "d"], [0.5, 0.5])
    with pytest.raises(ValueError):
        Curriculum.from_pass_at_k(["a"], ["d"], [1.5])
    with pytest.raises(ValueError):
        Curriculum.from_pass_at_k(["a", "b"], ["d"], [0.5, 0.5])


def test_online_updates_move_the_difficulty():
    cur = Curriculum.from_pass_at_k(["q"], ["d"], [0.125], k=8)          # Beta(2, 8): 0.2, hard
    assert cur.tier_name("q") == "hard"
    cur.update("q", [1, 1, 1, 1])                                         # Beta(6, 8): 3/7
    assert cur.success_rate("q") == pytest.approx(6 / 14) and cur.tier_name("q") == "medium"
    cur.update("q", [0.5, 0.25])                                          # fractional: Beta(6.75, 9.25)
    assert cur.success_rate("q") == pytest.approx(6.75 / 16)
    cur.update("q", [1] * 16)                                             # Beta(22.75, 9.25)
    assert cur.success_rate("q") == pytest.approx(22.75 / 32) and cur.tier_name("q") == "easy"
    with pytest.raises(KeyError):
        cur.update("nope", [1])
    cur.add("new", "d")                                                   # flat prior: 0.5
    assert cur.success_rate("new") == 0.5 and "new" in cur and len(cur) == 2
    cur.add("new2", "d", pass_rate=1.0)
    assert cur.tier_name("new2") == "very_easy"


# ----------------------------------------------------------------------------------------------- sampling
def test_weights_hand_computed():
    cur = _curriculum()
    w = cur.weights()
    assert w.sum() == pytest.approx(1.0)
    ids = cur.ids
    # domain a holds 3/4 of the examples; each tier has 60 of them
    for t in range(5):
        assert w[ids.index(f"a-{t}-0")] == pytest.approx(0.75 * TIER_WEIGHTS[t] / 60)
    # domain b only has very easy and medium: tier shares 0.05/0.55 and 0.5/0.55, 50 examples each
    assert w[ids.index("b-1")] == pytest.approx(0.25 * (0.05 / 0.55) / 50)
    assert w[ids.index("b-0")] == pytest.approx(0.25 * (0.5 / 0.55) / 50)


def test_tier_weights_apply_per_prompt():
    """A prompt's draw chance is its tier weight over the domain's total: a tier with few members does not hand
    each of them the tier's whole share (the bug: the first prompts seen online, alone in the easy and hard
    tiers, were re-drawn again and again)."""
    ids = ["hard"] + [f"m{j}" for j in range(99)] + ["easy0", "easy1"]
    cur = Curriculum.from_pass_at_k(ids, ["d"] * len(ids), [0.125] + [0.5] * 99 + [0.875] * 2, k=8)
    w = dict(zip(cur.ids, cur.weights()))
    total = 0.2 + 99 * 0.5 + 2 * 0.2
    assert w["hard"] == pytest.approx(0.2 / total) and w["m0"] == pytest.approx(0.5 / total)
    assert w["easy0"] == pytest.approx(0.2 / total) and sum(w.values()) == pytest.approx(1.0)
    assert w["hard"] < w["m0"]  # per tier (0.2 / 0.9 to the one hard prompt) it was 50 times the medium ones'
    only_zero = Curriculum.from_pass_at_k(["x", "y"], ["d", "d"], [1.0, 1.0], k=8, tier_weights=(0, 1, 1, 1, 1))
    np.testing.assert_allclose(only_zero.weights(), [0.5, 0.5])  # only zero-weight tiers: uniform


def test_sampling_favours_middle_tiers_and_keeps_the_domain_mix():
    cur = _curriculum()
    rng = np.random.default_rng(0)
    tiers = dict(zip(cur.ids, cur.tiers().tolist()))
    tier_hits = np.zeros(5)
    b_hits = np.zeros(5)
    for _ in range(400):
        batch = cur.sample(40, rng)
        assert len(batch) == 40 and len(set(batch)) == 40                # no repeats within a batch
        a = [i for i in batch if i.startswith("a-")]
        assert len(a) == 30                                               # 3/4 of every batch, exactly
        for i in batch:
            (tier_hits if i.startswith("a-") else b_hits)[tiers[i]] += 1
    share = tier_hits / tier_hits.sum()
    # without replacement within a batch the middle tier saturates a little; the ordering is what matters
    assert share[2] > 0.4 and share[1] > 0.15 and share[3] > 0.15 and share[0] < 0.1 and share[4] < 0.1
    assert share[2] > share[1] > share[0] and share[2] > share[3] > share[4]
    assert abs(share[1] - share[3]) < 0.02 and abs(share[0] - share[4]) < 0.02
    b_share = b_hits / b_hits.sum()
    assert b_share[2] == pytest.approx(0.5 / 0.55, abs=0.03) and b_hits[[1, 3, 4]].sum() == 0


def test_sampling_with_domain_weights_and_remainders():
    cur = _curriculum(domain_weights={"a": 0.5, "b": 0.5})
    rng = np.random.default_rng(1)
    counts = np.array([sum(i.startswith("a-") for i in cur.sample(7, rng)) for _ in range(1000)])
    assert set(counts.tolist()) <= {3, 4}                                # 3.5 each: 3 or 4, never further off
    assert counts.mean() == pytest.approx(3.5, abs=0.05)
    # more draws than a domain has examples: with replacement inside that domain only
    big = cur.sample(400, np.random.default_rng(2))
    assert sum(i.startswith("b-") for i in big) == 200 and len(big) == 400


def test_sampling_is_deterministic_given_the_generator():
    cur = _curriculum()
    a = cur.sample(32, np.random.default_rng(123))
    b = cur.sample(32, np.random.default_rng(123))
    c = cur.sample(32, np.random.default_rng(124))
    assert a == b and a != c
    assert cur.sample(0, np.random.default_rng(0)) == []


# ---------------------------------------------------------------------------------------------- expansion
def test_expansion_ratio_formula():
    assert expansion_ratio(0.5) == 2.0                       # [paper] examples: 0.5 -> 2x, 0.2 -> 1.25x
    assert expansion_ratio(0.2) == pytest.approx(1.25)
    assert expansion_ratio(0.8, max_expansion=10) == pytest.approx(5.0)   # 0.8 -> 5x
    assert expansion_ratio(0.8) == 4.0 and expansion_ratio(1.0) == 4.0   # clamped to [1, 4]
    assert expansion_ratio(0.0) == 1.0
    with pytest.raises(ValueError):
        expansion_ratio(1.5)


def test_expansion_ema_from_rollout_groups():
    cur = Curriculum.from_pass_at_k([f"q{i}" for i in range(10)], ["d"] * 10, [0.5] * 10)
    assert cur.expansion == 1.0 and cur.next_prompt_count(32) == 32
    # iteration 1: 8 groups, 4 all-same (2 all correct, 2 all wrong) -> ratio 2 -> 0.9 * 1 + 0.1 * 2 = 1.1
    groups = [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1],
              [0.5, 1, 0, 0]]
    for i, g in enumerate(groups):
        cur.update(f"q{i}", g)
    assert cur.end_iteration() == pytest.approx(1.1)
    assert cur.next_prompt_count(32) == 36                     # ceil(35.2)
    # iteration 2: 10 groups, 8 all-same -> ratio 5, clamped to 4 -> 0.9 * 1.1 + 0.4 = 1.39
    for i in range(10):
        cur.update(f"q{i}", [1, 1] if i < 8 else [0, 1])
    assert cur.end_iteration() == pytest.approx(1.39)
    # iteration 3: all informative -> ratio 1 -> 0.9 * 1.39 + 0.1 = 1.351
    for i in range(3):
        cur.update(f"q{i}", [0, 1])
    assert cur.end_iteration() == pytest.approx(1.351)
    assert cur.next_prompt_count(32) == 44                     # ceil(43.232)
    assert cur.next_prompt_count(100) == 136                   # ceil(135.1)
    # an iteration without groups leaves it alone; continuous all-equal rewards are uninformative too
    assert cur.end_iteration() == pytest.approx(1.351) and cur.iteration == 4
    assert not is_informative([0.5, 0.5, 0.5]) and is_informative([0.5, 0.25]) and not is_informative([1])
    assert cur.update_expansion(0.0) == pytest.approx(0.9 * 1.351 + 0.1)


def test_select_balanced_hand_computed():
    groups = [
        [1, 1, 1, 1],          # 0: all correct (uninformative), |mean - .5| = .5
        [0, 0, 0, 0],          # 1: all wrong (uninformative), .5
        [1, 0, 0, 0],          # 2: .25, var .1875
        [1, 1, 0, 0],          # 3: 0, var .25
        [1, 1, 1, 0],          # 4: .25, var .1875
        [0.5, 0.5, 0.5, 0.5],  # 5: uninformative although half right, 0
        [1, 0.5, 0, 0.5],      # 6: 0, var .125
    ]
    # ranking: 3, 6 (balanced; 3 has more variance), 2, 4 (tie broken by order), then 5, 0, 1
    assert select_balanced(groups, 1) == [3]
    assert select_balanced(groups, 2) == [3, 6]
    assert select_balanced(groups, 3) == [2, 3, 6]
    assert select_balanced(groups, 4) == [2, 3, 4, 6]
    assert select_balanced(groups, 5) == [2, 3, 4, 5, 6]
    assert select_balanced(groups, 6) == [0, 2, 3, 4, 5, 6]
    assert select_balanced(groups, 99) == list(range(7))
    assert select_balanced(groups, 0) == [] and select_balanced([], 3) == []
    keyed = {f"p{i}": g for i, g in enumerate(groups)}
    assert select_balanced(keyed, 3) == ["p2", "p3", "p6"]
    # binary groups of 8: |c/8 - .5| decides (c = 4, then 3 and 5, then 2 ...)
    binary = [[1] * c + [0] * (8 - c) for c in (0, 1, 2, 3, 4, 5, 6, 7, 8)]
    assert select_balanced(binary, 3) == [3, 4, 5]


# ---------------------------------------------------------------------------------------------- round trip
def test_dict_round_trip():
    cur = _curriculum(domain_weights={"a": 2.0, "b": 1.0})
    rng = np.random.default_rng(7)
    for ex_id in cur.sample(16, rng):
        cur.update(ex_id, rng.integers(0, 2, size=8).tolist())
    cur.end_iteration()
    cur.update(cur.ids[0], [1, 1])          # a pending, unfinished iteration survives too
    state = json.loads(json.dumps(cur.to_dict()))
    back = Curriculum.from_dict(state)
    assert back.to_dict() == cur.to_dict()
    assert back.expansion == cur.expansion and back.iteration == cur.iteration == 1
    np.testing.assert_array_equal(back.success_rates(), cur.success_rates())
    assert back.sample(24, np.random.default_rng(3)) == cur.sample(24, np.random.default_rng(3))
    assert back.end_iteration() == cur.end_iteration()
    with pytest.raises(ValueError):
        Curriculum.from_dict({**state, "version": 99})
