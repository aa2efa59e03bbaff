"""The grounding verifier (:func:`verify_grounding`) on an extracted answer, and :func:`box_iou`.

[paper] reward = boxes with IoU > tau / boxes; tau is not published, :data:`IOU_THRESHOLD` = 0.5 [ours, the
RefCOCO Acc@0.5 convention]. Predicted and ground-truth boxes are matched one to one (maximum bipartite matching) and
the count is divided by ``max(#predicted, #truth)`` [ours: the paper's ratio when the counts agree; extra, duplicated
or missing boxes all cost reward]. Boxes ``[x1, y1, x2, y2]`` on the 0..1000 scale are read from the box content
with a regex (brackets or parentheses, ints or decimals, ``[[..],[..]]`` lists); a box outside 0..1000 or with
``x2 <= x1`` or ``y2 <= y1`` matches nothing; more than :data:`MAX_BOXES` predicted boxes give 0 [ours].
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from typing import Any

IOU_THRESHOLD = 0.5              # [ours] the paper gives no tau
MAX_BOXES = 100                  # [ours]


_NUM = r"[+-]?(?:\d{1,7}(?:\.\d{0,7})?|\.\d{1,7})"
_BOX4_RE = re.compile(rf"[\[(]\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*[\])]")


def _parse_boxes(x: Any, limit: int = MAX_BOXES) -> list[tuple[float, float, float, float]]:
    """Boxes from a string (every ``[x1, y1, x2, y2]`` or ``(…)`` group) or from a box / list of boxes; at most
    ``limit + 1`` are returned (so callers can tell "too many")."""
    if isinstance(x, str):
        return [tuple(float(v) for v in m.groups())
                for m in itertools.islice(_BOX4_RE.finditer(x), limit + 1)]

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) or type(v).__name__.startswith(
            ("int", "float"))

    if isinstance(x, Sequence) and len(x) == 4 and all(is_num(v) for v in x):
        return [tuple(float(v) for v in x)]
    out = []
    if isinstance(x, Sequence):
        for item in itertools.islice(x, limit + 1):
            if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 4 and all(
                    is_num(v) for v in item):
                out.append(tuple(float(v) for v in item))
            else:
                return []
    return out


def _valid_box(b) -> bool:
    x1, y1, x2, y2 = b
    return all(math.isfinite(v) and 0.0 <= v <= 1000.0 for v in b) and x2 > x1 and y2 > y1


def box_iou(a, b) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes; 0.0 if either is invalid (outside 0..1000 or empty)."""
    if not (_valid_box(a) and _valid_box(b)):
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _max_matching(adj: list[list[int]], n_right: int) -> int:
    """Maximum bipartite matching (Kuhn's augmenting paths); ``adj[i]`` lists the right nodes of left node i."""
    match_right = [-1] * n_right

    def augment(i: int, seen: list[bool]) -> bool:
        for j in adj[i]:
            if not seen[j]:
                seen[j] = True
                if match_right[j] < 0 or augment(match_right[j], seen):
                    match_right[j] = i
                    return True
        return False

    return sum(augment(i, [False] * n_right) for i in range(len(adj)))


def verify_grounding(answer: str, ground_truth: Any, *, iou_threshold: float = IOU_THRESHOLD) -> float:
    """Grounding verifier: predicted boxes matched one to one with ground-truth boxes at IoU > ``iou_threshold``;
    reward = matches / max(#predicted, #truth). ``ground_truth`` is one box, a list of boxes or a string."""
    if not isinstance(answer, str):
        return 0.0
    preds = _parse_boxes(answer)
    gts = _parse_boxes(ground_truth)
    if not preds or not gts or len(preds) > MAX_BOXES or len(gts) > MAX_BOXES:
        return 0.0
    adj = [[j for j, g in enumerate(gts) if box_iou(p, g) > iou_threshold] for p in preds]
    return _max_matching(adj, len(gts)) / max(len(preds), len(gts))
