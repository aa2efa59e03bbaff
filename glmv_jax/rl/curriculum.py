"""Curriculum sampling and the EMA rollout expansion of RLCS, in plain numpy and Python.

Tags: **[paper]** arXiv 2507.01006 (GLM-4.1V-Thinking), **[ours]** choices made here where the paper gives no
number (it publishes no tier count, thresholds, weights, merge rule, EMA decay or selection rule).

Difficulty [paper: offline pass@k over the dataset, merged with online per-group outcomes]
    Each example keeps a Beta(alpha, beta) posterior of its success rate [ours]. ``from_pass_at_k`` starts it
    from the offline run: ``alpha = k * p + 1``, ``beta = k * (1 - p) + 1`` where ``p`` is the share of ``k``
    offline samples that were correct. ``update(id, rewards)`` adds every online group:
    ``alpha += sum(r)``, ``beta += sum(1 - r)`` (rewards clipped to [0, 1], so a continuous reward such as
    OCR's counts fractionally). The difficulty is the posterior mean ``alpha / (alpha + beta)``; the offline
    and online evidence merge by simply adding counts.

Tiers [paper: "very easy" .. "very hard"; thresholds ours, recipe section 3.2]
    ``p >= 0.9`` very easy, ``0.7 <= p < 0.9`` easy, ``0.3 <= p < 0.7`` medium, ``0.1 < p < 0.3`` hard,
    ``p <= 0.1`` very hard. With the default ``k = 8`` an example solved 8/8 offline starts at 0.9 (very
    easy) and one solved 0/8 at 0.1 (very hard).

Sampling [paper: down-sample too easy and too hard, up-sample the middle, keep the domain proportions]
    Within each domain every example is drawn in proportion to its tier's weight in :data:`TIER_WEIGHTS` =
    (0.05, 0.2, 0.5, 0.2, 0.05) [ours]: a medium prompt is 10x as likely as a very easy one, whatever the
    tiers' sizes. (The weights are per prompt, not per tier: a tier's fixed share split over its few members
    gave the first prompts seen online, alone in their tiers, huge draw chances and re-drew them again and
    again.)
    Domains keep their proportions (``domain_weights``, default: their share of the examples) exactly:
    :meth:`Curriculum.sample` allocates ``n * share`` draws per domain (the fractional remainders by a
    weighted draw), then draws examples without replacement inside each domain (with replacement only when a
    domain has fewer examples than draws) and shuffles. Deterministic given the ``numpy.random.Generator``.

Expansion [paper: formula exact, constants ours]
    ``ratio = 1 / (1 - f)`` where ``f`` is the share of the previous iteration's rollout groups whose
    rewards were all equal (all correct or all wrong: no GRPO gradient); ``ema <- 0.9 * ema + 0.1 * ratio``,
    ratio and EMA clamped to [1, 4], starting at 1 [ours]. The next iteration rolls out
    ``ceil(target_groups * ema)`` prompts (:meth:`Curriculum.next_prompt_count`) and keeps the ``target``
    most balanced groups (:func:`select_balanced`): groups with mixed rewards first, then the smallest
    ``|mean - 0.5|`` (``|c/G - 0.5|`` for binary rewards, recipe section 3.3), then the larger variance,
    then the earlier group.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

TIER_NAMES: tuple[str, ...] = ("very_easy", "easy", "medium", "hard", "very_hard")
TIER_WEIGHTS: tuple[float, ...] = (0.05, 0.2, 0.5, 0.2, 0.05)  # [ours]
DEFAULT_K = 8                # [ours] offline samples per example behind a pass rate
EMA_DECAY = 0.9              # [ours]
MIN_EXPANSION, MAX_EXPANSION = 1.0, 4.0  # [ours]
_FORMAT_VERSION = 1


def tiers_of(p) -> np.ndarray:
    """Tier index (0 = very easy .. 4 = very hard) of success rates ``p`` (array-like)."""
    p = np.asarray(p, dtype=np.float64)
    return np.select([p >= 0.9, p >= 0.7, p >= 0.3, p > 0.1], [0, 1, 2, 3], default=4).astype(np.int64)


def tier_of(p: float) -> int:
    """Tier index of one success rate."""
    return int(tiers_of(p))


def is_informative(rewards: Sequence[float], eps: float = 1e-9) -> bool:
    """True iff a group's rewards are not all equal (otherwise its GRPO advantages are all zero)."""
    r = np.asarray(rewards, dtype=np.float64).ravel()
    return r.size > 1 and float(r.max() - r.min()) > eps


def expansion_ratio(invalid_fraction: float, max_expansion: float = MAX_EXPANSION,
                    min_expansion: float = MIN_EXPANSION) -> float:
    """[paper] ``1 / (1 - invalid_fraction)``, clamped to ``[min_expansion, max_expansion]`` [ours]."""
    f = float(invalid_fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"invalid_fraction must be in [0, 1], got {invalid_fraction}")
    ratio = math.inf if f >= 1.0 else 1.0 / (1.0 - f)
    return float(min(max_expansion, max(min_expansion, ratio)))


def select_balanced(groups: Sequence[Sequence[float]] | Mapping[Hashable, Sequence[float]], k: int) -> list:
    """The ``k`` most balanced rollout groups, as indices (or keys for a mapping) in their original order.

    Ranking [ours, recipe section 3.3]: informative groups (rewards not all equal) before the others; then
    the smallest ``|mean - 0.5|``; then the larger reward variance; then the earlier group. When fewer than
    ``k`` groups are informative, the best uninformative ones fill the rest (they add no gradient but keep the
    batch size fixed).
    """
    if isinstance(groups, Mapping):
        keys = list(groups.keys())
        values = [groups[key] for key in keys]
    else:
        keys = list(range(len(groups)))
        values = list(groups)
    k = int(k)
    if k <= 0 or not keys:
        return []
    ranked = []
    for i, rewards in enumerate(values):
        r = np.asarray(rewards, dtype=np.float64).ravel()
        if r.size == 0:
            ranked.append((1, math.inf, 0.0, i))
            continue
        ranked.append((0 if is_informative(r) else 1, abs(float(r.mean()) - 0.5), -float(r.var()), i))
    ranked.sort()
    chosen = sorted(item[3] for item in ranked[:k])
    return [keys[i] for i in chosen]


class Curriculum:
    """Per-example difficulty, tier-weighted sampling that keeps the domain mix, and the expansion EMA.

    Build it with :meth:`from_pass_at_k`; call :meth:`update` for every rollout group (all of them, before
    :func:`select_balanced`), :meth:`end_iteration` once per RL iteration, :meth:`next_prompt_count` and
    :meth:`sample` to choose the next prompts. :meth:`to_dict` / :meth:`from_dict` round-trip the state
    through plain Python types (JSON-compatible when the ids are strings or ints).
    """

    def __init__(self, ids: Sequence[Hashable], domains: Sequence[str], alpha: Sequence[float],
                 beta: Sequence[float], *, k: int = DEFAULT_K, tier_weights: Sequence[float] = TIER_WEIGHTS,
                 domain_weights: Mapping[str, float] | None = None, ema_decay: float = EMA_DECAY,
                 min_expansion: float = MIN_EXPANSION, max_expansion: float = MAX_EXPANSION,
                 expansion: float = 1.0, iteration: int = 0, pending: Sequence[int] = (0, 0)) -> None:
        ids, domains = list(ids), [str(d) for d in domains]
        n = len(ids)
        if not (len(domains) == len(alpha) == len(beta) == n):
            raise ValueError(f"ids ({n}), domains ({len(domains)}), alpha ({len(alpha)}) and beta ({len(beta)}) "
                             f"must have the same length")
        self._index: dict[Hashable, int] = {}
        for i, ex_id in enumerate(ids):
            if ex_id in self._index:
                raise ValueError(f"duplicate example id {ex_id!r}")
            self._index[ex_id] = i
        self._ids = ids
        self._domains = domains
        self._by_domain: dict[str, np.ndarray] | None = None  # cached example indices per domain
        self._alpha = np.asarray(alpha, dtype=np.float64).copy()
        self._beta = np.asarray(beta, dtype=np.float64).copy()
        if n and (not np.all(np.isfinite(self._alpha)) or not np.all(np.isfinite(self._beta))
                  or self._alpha.min() <= 0 or self._beta.min() <= 0):
            raise ValueError("alpha and beta must be finite and positive")
        tw = np.asarray(tier_weights, dtype=np.float64)
        if tw.shape != (len(TIER_NAMES),) or not np.all(np.isfinite(tw)) or tw.min() < 0 or tw.sum() <= 0:
            raise ValueError(f"tier_weights must be {len(TIER_NAMES)} non-negative numbers, got {tier_weights}")
        self.tier_weights = tuple(float(w) for w in tw)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not 1.0 <= min_expansion <= max_expansion:
            raise ValueError(f"need 1 <= min_expansion <= max_expansion, got {min_expansion}, {max_expansion}")
        self.k = int(k)
        self.ema_decay = float(ema_decay)
        self.min_expansion = float(min_expansion)
        self.max_expansion = float(max_expansion)
        self._ema = float(min(self.max_expansion, max(self.min_expansion, expansion)))
        self.iteration = int(iteration)
        self._pending = [int(pending[0]), int(pending[1])]  # [uninformative groups, groups] this iteration
        self.domain_weights = None if domain_weights is None else {str(d): float(w)
                                                                   for d, w in domain_weights.items()}
        if self.domain_weights is not None:
            missing = sorted(set(domains) - set(self.domain_weights))
            if missing:
                raise ValueError(f"domain_weights has no weight for {missing}")
            if any(not math.isfinite(w) or w < 0 for w in self.domain_weights.values()) or sum(
                    self.domain_weights[d] for d in set(domains)) <= 0:
                raise ValueError(f"domain_weights must be non-negative with a positive total, got {domain_weights}")

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_pass_at_k(cls, ids: Sequence[Hashable], domains: Sequence[str], pass_rates: Sequence[float], *,
                       k: int = DEFAULT_K, **kwargs: Any) -> Curriculum:
        """From an offline run: ``pass_rates[i]`` is the share of ``k`` samples of example ``i`` that were correct
        (mean success). The prior is Beta(k * p + 1, k * (1 - p) + 1)."""
        p = np.asarray(pass_rates, dtype=np.float64)
        if p.ndim != 1 or (p.size and (not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1)):
            raise ValueError("pass_rates must be a 1-D sequence of numbers in [0, 1]")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return cls(ids, domains, k * p + 1.0, k * (1.0 - p) + 1.0, k=k, **kwargs)

    def add(self, example_id: Hashable, domain: str, pass_rate: float | None = None) -> None:
        """Add an example, from an offline pass rate (weight ``k``) or with a flat Beta(1, 1) prior."""
        if example_id in self._index:
            raise ValueError(f"duplicate example id {example_id!r}")
        if self.domain_weights is not None and str(domain) not in self.domain_weights:
            raise ValueError(f"domain_weights has no weight for {domain!r}")
        p = 0.5 if pass_rate is None else float(pass_rate)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"pass_rate must be in [0, 1], got {pass_rate}")
        k = 0 if pass_rate is None else self.k
        self._index[example_id] = len(self._ids)
        self._ids.append(example_id)
        self._domains.append(str(domain))
        self._by_domain = None
        self._alpha = np.append(self._alpha, k * p + 1.0)
        self._beta = np.append(self._beta, k * (1.0 - p) + 1.0)

    # ------------------------------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, example_id: Hashable) -> bool:
        return example_id in self._index

    @property
    def ids(self) -> list:
        return list(self._ids)

    @property
    def domains(self) -> list[str]:
        """The distinct domains, sorted."""
        return sorted(set(self._domains))

    def _i(self, example_id: Hashable) -> int:
        try:
            return self._index[example_id]
        except KeyError:
            raise KeyError(f"unknown example id {example_id!r}") from None

    def success_rates(self) -> np.ndarray:
        """Posterior mean success rate of every example (in id order)."""
        return self._alpha / (self._alpha + self._beta)

    def success_rate(self, example_id: Hashable) -> float:
        i = self._i(example_id)
        return float(self._alpha[i] / (self._alpha[i] + self._beta[i]))

    def tier(self, example_id: Hashable) -> int:
        """Tier index (0 = very easy .. 4 = very hard) of an example."""
        return tier_of(self.success_rate(example_id))

    def tier_name(self, example_id: Hashable) -> str:
        return TIER_NAMES[self.tier(example_id)]

    def tiers(self) -> np.ndarray:
        return tiers_of(self.success_rates())

    def tier_counts(self) -> dict[str, dict[str, int]]:
        """``{domain: {tier name: number of examples}}``, the training monitor of the paper."""
        t = self.tiers()
        out = {d: dict.fromkeys(TIER_NAMES, 0) for d in self.domains}
        for d, ti in zip(self._domains, t):
            out[d][TIER_NAMES[ti]] += 1
        return out

    def _domain_index(self) -> dict[str, np.ndarray]:
        if self._by_domain is None:
            groups: dict[str, list[int]] = {}
            for i, d in enumerate(self._domains):
                groups.setdefault(d, []).append(i)
            self._by_domain = {d: np.asarray(groups[d], dtype=np.int64) for d in sorted(groups)}
        return self._by_domain

    def _domain_shares(self) -> dict[str, float]:
        present = self.domains
        if self.domain_weights is None:
            counts = {d: 0 for d in present}
            for d in self._domains:
                counts[d] += 1
            raw = counts
        else:
            raw = {d: self.domain_weights[d] for d in present}
        total = float(sum(raw.values()))
        return {d: raw[d] / total for d in present}

    def weights(self) -> np.ndarray:
        """Sampling probability of every example (in id order; sums to 1): the domain share times the example's
        tier weight, normalised over the domain's examples."""
        w = np.zeros(len(self._ids))
        if not self._ids:
            return w
        per_example = np.asarray(self.tier_weights)[self.tiers()]
        for d, share in self._domain_shares().items():
            idx = self._domain_index()[d]
            mass = per_example[idx]
            w[idx] = share * (mass / mass.sum() if mass.sum() > 0 else np.full(len(idx), 1.0 / len(idx)))
        return w

    def sample(self, n: int, rng: np.random.Generator) -> list:
        """``n`` example ids: per-domain counts ``n * share`` (remainders drawn by their fractional parts), tier
        weighted inside each domain, without replacement where the domain is large enough; shuffled."""
        n = int(n)
        if n <= 0 or not self._ids:
            return []
        w = self.weights()
        shares = self._domain_shares()
        names = list(shares)
        exact = np.array([n * shares[d] for d in names])
        base = np.floor(exact + 1e-9).astype(np.int64)
        rest = n - int(base.sum())
        if rest > 0:
            frac = np.clip(exact - base, 0.0, None)
            if frac.sum() <= 0:
                frac = np.array([shares[d] for d in names])
            extra = rng.choice(len(names), size=rest, replace=False, p=frac / frac.sum())
            base[extra] += 1
        by_domain = self._domain_index()
        picked: list[int] = []
        for d, count in zip(names, base):
            if count <= 0:
                continue
            idx = by_domain[d]
            p = w[idx] / w[idx].sum()
            replace = count > int(np.count_nonzero(p))
            picked.extend(int(i) for i in rng.choice(idx, size=int(count), replace=replace, p=p))
        order = rng.permutation(len(picked))
        return [self._ids[picked[j]] for j in order]

    # ---------------------------------------------------------------------------------- online updates
    def update(self, example_id: Hashable, rewards_of_group: Sequence[float]) -> None:
        """Add one rollout group of an example: its rewards update the difficulty posterior, and whether the
        group was informative (rewards not all equal) counts towards this iteration's expansion ratio."""
        i = self._i(example_id)
        r = np.clip(np.asarray(rewards_of_group, dtype=np.float64).ravel(), 0.0, 1.0)
        if r.size == 0:
            return
        if not np.all(np.isfinite(r)):
            raise ValueError(f"rewards must be finite, got {rewards_of_group}")
        self._alpha[i] += float(r.sum())
        self._beta[i] += float((1.0 - r).sum())
        self._pending[0] += 0 if is_informative(r) else 1
        self._pending[1] += 1

    @property
    def expansion(self) -> float:
        """The EMA of the expansion ratio: roll out this many times the target number of prompts."""
        return self._ema

    def update_expansion(self, invalid_fraction: float) -> float:
        """Fold one iteration's share of all-correct/all-wrong groups into the EMA; returns the new value."""
        ratio = expansion_ratio(invalid_fraction, self.max_expansion, self.min_expansion)
        ema = self.ema_decay * self._ema + (1.0 - self.ema_decay) * ratio
        self._ema = float(min(self.max_expansion, max(self.min_expansion, ema)))
        return self._ema

    def end_iteration(self) -> float:
        """Close an RL iteration: the groups seen by :meth:`update` since the last call set the expansion ratio
        (no groups: unchanged). Returns the new expansion."""
        invalid, total = self._pending
        if total > 0:
            self.update_expansion(invalid / total)
        self._pending = [0, 0]
        self.iteration += 1
        return self._ema

    def next_prompt_count(self, target_groups: int) -> int:
        """How many prompts to roll out to keep ``target_groups`` informative groups: ``ceil(target * ema)``."""
        return int(math.ceil(int(target_groups) * self._ema - 1e-9))

    # ---------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """The whole state as plain Python types."""
        return {"version": _FORMAT_VERSION, "ids": list(self._ids), "domains": list(self._domains),
                "alpha": [float(a) for a in self._alpha], "beta": [float(b) for b in self._beta], "k": self.k,
                "tier_weights": list(self.tier_weights), "domain_weights": None if self.domain_weights is None
                else dict(self.domain_weights), "ema_decay": self.ema_decay, "min_expansion": self.min_expansion,
                "max_expansion": self.max_expansion, "expansion": self._ema, "iteration": self.iteration,
                "pending": list(self._pending)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Curriculum:
        if state.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported curriculum state version {state.get('version')!r}")
        return cls(state["ids"], state["domains"], state["alpha"], state["beta"], k=state["k"],
                   tier_weights=state["tier_weights"], domain_weights=state["domain_weights"],
                   ema_decay=state["ema_decay"], min_expansion=state["min_expansion"],
                   max_expansion=state["max_expansion"], expansion=state["expansion"],
                   iteration=state["iteration"], pending=state["pending"])

    def stats(self) -> dict:
        """A summary for logging: tier counts per domain, mean success rate per domain, expansion, iteration."""
        p = self.success_rates()
        return {"tiers": self.tier_counts(),
                "mean_success": {d: float(p[idx].mean()) for d, idx in self._domain_index().items()},
                "expansion": self._ema, "iteration": self.iteration}


__all__ = ["Curriculum", "DEFAULT_K", "EMA_DECAY", "MAX_EXPANSION", "MIN_EXPANSION", "TIER_NAMES", "TIER_WEIGHTS",
           "expansion_ratio", "is_informative", "select_balanced", "tier_of", "tiers_of"]
