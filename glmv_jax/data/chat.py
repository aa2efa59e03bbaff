"""The GLM-4.1V-9B-Thinking chat format in plain Python: rendering, token ids with the visual placeholders
expanded, ``mm_token_type_ids`` and the SFT loss mask.

Rendering follows the jinja ``chat_template`` shipped with zai-org/GLM-4.1V-9B-Thinking (tests check equality
with transformers' ``apply_chat_template`` on that template)::

    [gMASK]<sop>
    <|system|>\\n{system}                       (a system turn)
    <|user|>\\n{text, <|begin_of_image|><|image|><|end_of_image|>, <|begin_of_video|><|video|><|end_of_video|>}
    <|assistant|>\\n{reply}                     (or <|assistant|>{metadata}\\n{reply} when "metadata" is set)
    <|assistant|>\\n                            (the generation prompt)

There is no end-of-turn token: a turn ends where the next role token starts. The official template renders
assistant turns verbatim; the official fine-tuning recipe (GLM-V README, LLaMA-Factory ``glm4v``) keeps the
``<think>…</think>`` part out of the history, and so does :func:`render` by default (``keep_history_thinking``).

Expansion of the placeholders (as transformers' Glm4vProcessor does on the rendered text):

* each ``<|image|>`` -> ``t*h*w / merge**2`` ``<|image|>`` tokens for its ``image_grid_thw`` row;
* each ``<|video|>`` -> for every temporal patch ``k < t``:
  ``<|begin_of_image|>`` + ``<|image|>`` * ``h*w / merge**2`` + ``<|end_of_image|>`` + ``str(int(ts_k))``,
  inside the template's ``<|begin_of_video|> … <|end_of_video|>``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PREFIX = "[gMASK]<sop>"
IMAGE_PLACEHOLDER = "<|begin_of_image|><|image|><|end_of_image|>"
VIDEO_PLACEHOLDER = "<|begin_of_video|><|video|><|end_of_video|>"
GENERATION_PROMPT = "<|assistant|>\n"
END_TOKEN = "<|endoftext|>"
ROLES = ("system", "user", "assistant")

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


# ---------------------------------------------------------------------------------------- thinking format
def format_answer(thinking: str, answer: str, *, box: bool = True, before: str = "", after: str = "",
                  newlines: bool = True) -> str:
    """An SFT target in the GLM-4.1V-Thinking format.

    ``<think>\\n{thinking}</think>\\n<answer>{before}<|begin_of_box|>{answer}<|end_of_box|>{after}</answer>``

    The layout with the two newlines is the one of the official fine-tuning example (GLM-V README);
    ``newlines=False`` gives the compact ``<think>…</think><answer>…</answer>``. With ``box=True`` (verifiable
    tasks) the final result is wrapped in the box markers exactly once, as the reward format gate requires;
    ``box=False`` writes ``{before}{answer}{after}`` (open-ended replies). Raises ``ValueError`` if a part
    already contains a think/answer tag or a box marker, which would fail the format gate.
    """
    for name, part in (("thinking", thinking), ("answer", answer), ("before", before), ("after", after)):
        for tag in ("<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>"):
            if tag in part:
                raise ValueError(f"format_answer: {name} already contains {tag!r}")
    final = f"<|begin_of_box|>{answer}<|end_of_box|>" if box else answer
    nl = "\n" if newlines else ""
    return f"<think>{nl}{thinking}</think>{nl}<answer>{before}{final}{after}</answer>"


def strip_thinking(text: str) -> str:
    """``text`` without its thinking: every ``<think>…</think>`` block is removed and leading newlines are
    dropped (LLaMA-Factory's ``remove_thought``). A ``</think>`` with no opening tag drops everything up to
    and including it; an opening ``<think>`` that is never closed drops everything after it."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.lstrip("\n")


# ---------------------------------------------------------------------------------------------- rendering
def _text_only(content: Any, role: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text":
            out.append(part["text"])
        else:
            raise ValueError(f"{role} content can only hold text parts (the GLM-4.1V template renders images "
                             f"and videos in user turns only), got {part!r}")
    return "".join(out)


def _user_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
            continue
        if not isinstance(part, Mapping):
            raise ValueError(f"a content part must be a dict or a string, got {part!r}")
        kind = part.get("type")
        # the template's order of tests: video first, then image, then text
        if kind == "video" or "video" in part:
            out.append(VIDEO_PLACEHOLDER)
        elif kind == "image" or "image" in part:
            out.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            out.append(part["text"])
        else:
            raise ValueError(f"unknown content part type {kind!r} in {part!r} (expected text, image or video)")
    return "".join(out)


def _segments(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
              keep_history_thinking: bool) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_trained_reply) pieces; joined they are :func:`render`'s text.

    The trained reply is the content of the last message when it is an assistant turn and no generation
    prompt follows it; every other assistant turn is history.
    """
    if not messages:
        raise ValueError("empty conversation")
    segs: list[tuple[str, bool]] = [(PREFIX, False)]
    last = len(messages) - 1
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role == "system":
            segs.append(("<|system|>\n" + _text_only(msg.get("content"), role), False))
        elif role == "user":
            segs.append(("<|user|>\n" + _user_content(msg.get("content")), False))
        elif role == "assistant":
            trained = i == last and not add_generation_prompt
            content = _text_only(msg.get("content"), role)
            if not trained and not keep_history_thinking:
                content = strip_thinking(content)
            metadata = msg.get("metadata")
            head = f"<|assistant|>{metadata}\n" if metadata else "<|assistant|>\n"
            segs.append((head, False))
            segs.append((content, trained))
        else:
            raise ValueError(f"message {i} has role {role!r}; the GLM-4.1V template renders only {ROLES}")
    if add_generation_prompt:
        segs.append((GENERATION_PROMPT, False))
    return segs


def render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, *,
           keep_history_thinking: bool = False) -> str:
    """The prompt text of ``messages`` (dicts with ``role`` in system/user/assistant and ``content`` a string
    or a list of ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` / ``{"type": "video"}`` parts).

    Equal to the official jinja template for such conversations, except that assistant turns in the history
    (every assistant turn but a final one without a generation prompt after it) lose their ``<think>…</think>``
    part, unless ``keep_history_thinking=True`` (then equal in every case). Unlike the jinja template, unknown
    roles or part types and media in system/assistant turns raise ``ValueError`` instead of being dropped or
    printed as Python reprs.
    """
    return "".join(text for text, _ in _segments(messages, add_generation_prompt, keep_history_thinking))


# ------------------------------------------------------------------------------------------------ encoding
def mm_token_type_ids(input_ids: Sequence[int], image_token_id: int, video_start_token_id: int,
                      video_end_token_id: int) -> list[int]:
    """0 for text, 1 for an ``<|image|>`` token outside a video, 2 for one inside
    ``<|begin_of_video|> … <|end_of_video|>`` (transformers' Glm4vProcessor rule; only the ``<|image|>``
    placeholders are marked, not the begin/end tokens or timestamps)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    in_video = np.cumsum(ids == video_start_token_id) > np.cumsum(ids == video_end_token_id)
    out = np.zeros(ids.shape, dtype=np.int64)
    is_image = ids == image_token_id
    out[is_image & in_video] = 2
    out[is_image & ~in_video] = 1
    return out.tolist()


def _grid(g: Any, what: str, i: int, merge_size: int) -> tuple[int, int, int]:
    t, h, w = (int(x) for x in np.asarray(g).reshape(-1))
    if min(t, h, w) <= 0 or h % merge_size or w % merge_size:
        raise ValueError(f"{what} grid {i} is {(t, h, w)}: t, h, w must be positive and h, w multiples of "
                         f"merge_size={merge_size}")
    return t, h, w


def _patch_timestamps(timestamps: Sequence[float] | None, t: int) -> list[float]:
    """Per-temporal-patch timestamps from the sampled frames' timestamps (Glm4vProcessor: every second frame,
    cut to ``t``, padded with the last value, or 0 when there is none)."""
    if timestamps is None:  # frames sampled at the default 2 fps from 0 s: frame j at j/2 s
        timestamps = [j / 2.0 for j in range(2 * t)]
    picked = [float(x) for x in list(timestamps)[::2]][:t]
    while len(picked) < t:
        picked.append(picked[-1] if picked else 0.0)
    return picked


def encode(
    messages: Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    image_grids: Sequence[Sequence[int]] | np.ndarray | None = None,
    video_grids: Sequence[Sequence[int]] | np.ndarray | None = None,
    video_timestamps: Sequence[Sequence[float] | None] | None = None,
    add_generation_prompt: bool | None = None,
    merge_size: int = 2,
    keep_history_thinking: bool = False,
    add_end_token: bool = True,
) -> dict[str, list[int]]:
    """Token ids of a conversation with every image and video placeholder expanded.

    Args:
      messages: as for :func:`render`.
      tokenizer: a :class:`glmv_jax.data.tokenizer.Tokenizer` (anything with ``encode(text)`` and
        ``token_id(name)``).
      image_grids: one ``(t, h, w)`` patch grid (``image_grid_thw`` row) per image placeholder, in order of
        appearance; ``t*h*w / merge_size**2`` ``<|image|>`` tokens each.
      video_grids: one ``(t, h, w)`` grid per video, in order (``video_grid_thw`` rows).
      video_timestamps: per video, the timestamps in seconds of its *sampled frames* (two per temporal patch;
        transformers' ``VideoMetadata.timestamps``, i.e. ``frame_index / fps``). Every second one is written
        as ``str(int(ts))`` after each frame pair. ``None`` (for all or one video) means frames sampled at
        2 fps from 0 s, so the pairs are stamped 0, 1, 2, ...
      add_generation_prompt: end with ``<|assistant|>\\n``. ``None`` (default) adds it unless the last
        message is an assistant turn (a training example).
      keep_history_thinking: see :func:`render`.
      add_end_token: append ``<|endoftext|>`` after a trained final reply.

    Returns ``{"input_ids", "mm_token_type_ids", "loss_mask"}``, lists of equal length.

    ``loss_mask`` is 1 exactly on the tokens of the final assistant reply when the conversation ends with an
    assistant turn and no generation prompt: the tokens of its content after ``<|assistant|>\\n`` (e.g. the
    whole ``<think>…</think><answer>…</answer>``) plus the appended ``<|endoftext|>``. It is 0 on ``[gMASK]<sop>``,
    system and user turns, every image/video token, earlier assistant turns, and the ``<|assistant|>\\n`` that
    opens the final reply (that is the prompt the model continues from at inference). With a generation prompt
    it is all 0. The prompt part is tokenized as one string and the reply as another, so the mask boundary is
    exact; the prompt ids equal ``tokenizer.encode(render(...))`` of the prompt.

    Raises ``ValueError`` when the number of image (video) placeholders differs from the number of grids.
    """
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1].get("role") != "assistant" if messages else True
    segs = _segments(messages, add_generation_prompt, keep_history_thinking)

    # tokenize: consecutive prompt pieces as one string, the trained reply on its own
    ids: list[int] = []
    mask: list[int] = []
    pending = ""
    for text, trained in segs:
        if not trained:
            pending += text
            continue
        part = tokenizer.encode(pending)
        ids += part
        mask += [0] * len(part)
        pending = ""
        part = tokenizer.encode(text)
        if add_end_token:
            part = part + [tokenizer.token_id(END_TOKEN)]
        ids += part
        mask += [1] * len(part)
    if pending:
        part = tokenizer.encode(pending)
        ids += part
        mask += [0] * len(part)

    image_id = tokenizer.token_id("<|image|>")
    video_id = tokenizer.token_id("<|video|>")
    img_start = tokenizer.token_id("<|begin_of_image|>")
    img_end = tokenizer.token_id("<|end_of_image|>")
    vid_start = tokenizer.token_id("<|begin_of_video|>")
    vid_end = tokenizer.token_id("<|end_of_video|>")

    image_grids = [] if image_grids is None else list(image_grids)
    video_grids = [] if video_grids is None else list(video_grids)
    n_img = sum(1 for i in ids if i == image_id)
    n_vid = sum(1 for i in ids if i == video_id)
    if n_img != len(image_grids):
        raise ValueError(f"the messages hold {n_img} image placeholder(s) but {len(image_grids)} image grid(s) "
                         "were given")
    if n_vid != len(video_grids):
        raise ValueError(f"the messages hold {n_vid} video placeholder(s) but {len(video_grids)} video grid(s) "
                         "were given")
    if video_timestamps is not None and len(video_timestamps) != len(video_grids):
        raise ValueError(f"{len(video_timestamps)} timestamp lists for {len(video_grids)} video(s)")

    out_ids: list[int] = []
    out_mask: list[int] = []
    k_img = k_vid = 0
    merge = merge_size * merge_size
    for tok, m in zip(ids, mask):
        if tok == image_id:
            if m:
                raise ValueError("an image placeholder inside the trained assistant reply")
            t, h, w = _grid(image_grids[k_img], "image", k_img, merge_size)
            k_img += 1
            out_ids += [image_id] * (t * h * w // merge)
            out_mask += [0] * (t * h * w // merge)
        elif tok == video_id:
            if m:
                raise ValueError("a video placeholder inside the trained assistant reply")
            t, h, w = _grid(video_grids[k_vid], "video", k_vid, merge_size)
            stamps = _patch_timestamps(None if video_timestamps is None else video_timestamps[k_vid], t)
            k_vid += 1
            block: list[int] = []
            for ts in stamps:
                block += [img_start] + [image_id] * (h * w // merge) + [img_end] + tokenizer.encode(str(int(ts)))
            out_ids += block
            out_mask += [0] * len(block)
        else:
            out_ids.append(tok)
            out_mask.append(m)

    return {
        "input_ids": out_ids,
        "mm_token_type_ids": mm_token_type_ids(out_ids, image_id, vid_start, vid_end),
        "loss_mask": out_mask,
    }


__all__ = ["END_TOKEN", "GENERATION_PROMPT", "IMAGE_PLACEHOLDER", "PREFIX", "VIDEO_PLACEHOLDER", "encode",
           "format_answer", "mm_token_type_ids", "render", "strip_thinking"]
