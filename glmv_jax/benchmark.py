"""Benchmark prompts for `glmv eval` (`glmv_jax.evaluate`): JSONL lines -> checked items -> encoded prompts.

A benchmark line is a JSON object::

    {"id": "q1",                       optional (default "<file>:<line number>")
     "domain": "counting",             a domain registered in glmv_jax.rl.rewards (its verifier grades the answer)
     "answer": 3,                      the reference the verifier compares with (ground truth)
     "question": "How many ...?",      or "conversation" (alias "messages"): chat messages whose user turns hold
                                       {"type": "image"} / {"type": "video"} / {"type": "text"} parts
     "image": "a.png" | "images": [...], "video": "clip.mp4" | "videos": [...]}   paths relative to the file

A question line's user turn is its images, then its videos, then the question (as `glmv generate` builds it).
:func:`load_benchmark` checks every line before anything runs: a line that is not a JSON object, an unknown
domain, a missing answer or question, a media file that does not exist, a part count that differs from the
media given or an id used twice is an ``InputError`` naming the file and line. :func:`encode_prompts` processes the media (images:
``ImageProcessor``; videos: PyAV, sampled as the reference does) and chat-encodes each prompt with the
generation prompt. :func:`swap_partners` is the image-swap check's deterministic derangement.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from glmv_jax.errors import InputError

REPLY_PREFIX = "<think>\n</think>\n<answer><|begin_of_box|>"   # teacher-forced before the reference answer


@dataclass(frozen=True)
class Item:
    """One benchmark prompt. ``images``: paths or PIL images; ``videos``: video file paths; ``reply``: the box
    content teacher-forced for the reference NLL (default: the answer as text)."""

    id: str
    domain: str
    answer: Any
    question: str | None = None
    conversation: tuple | None = None
    images: tuple = ()
    videos: tuple = ()
    reply: str | None = None

    def messages(self) -> list[dict]:
        """The chat messages of the prompt (no generation prompt)."""
        if self.conversation is not None:
            return [dict(m) for m in self.conversation]
        content = [{"type": "image"} for _ in self.images] + [{"type": "video"} for _ in self.videos]
        return [{"role": "user", "content": content + [{"type": "text", "text": self.question}]}]

    def reference_text(self) -> str:
        if self.reply is not None:
            return self.reply
        return self.answer if isinstance(self.answer, str) else json.dumps(self.answer)


@dataclass
class Prompt:
    """An encoded item: token ids with the generation prompt, types (0 text, 1 image, 2 video) and media arrays."""

    item: Item
    input_ids: list[int]
    token_types: list[int]
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray | None
    pixel_values_videos: np.ndarray | None
    video_grid_thw: np.ndarray | None


# ---------------------------------------------------------------------------------------------- loading
def load_benchmark(path: str | Path) -> list[Item]:
    """The items of a benchmark JSONL file, every line checked first (module doc); InputError naming the line."""
    from glmv_jax.rl.rewards import domains

    path = Path(path)
    if not path.is_file():
        raise InputError(f"benchmark file not found: {path}")
    registered = domains()
    items, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            items.append(_item(path, number, line, registered))
            if items[-1].id in seen:
                raise InputError(f"{path.name}:{number}: the id {items[-1].id!r} is used by an earlier line")
            seen.add(items[-1].id)
    if not items:
        raise InputError(f"{path}: no benchmark lines")
    return items


def _item(path: Path, number: int, line: str, registered: list[str]) -> Item:
    where = f"{path.name}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: a line must be a JSON object")
    domain = record.get("domain")
    if domain not in registered:
        raise InputError(f"{where}: unknown domain {domain!r}; registered domains: {', '.join(registered)}")
    if record.get("answer") is None:
        raise InputError(f"{where}: no answer (the reference the {domain!r} verifier compares with)")
    conversation = record.get("conversation", record.get("messages"))
    question = record.get("question")
    if conversation is None and not isinstance(question, str):
        raise InputError(f"{where}: needs a question (a string) or a conversation")
    if conversation is not None and not (isinstance(conversation, list) and conversation
                                         and all(isinstance(m, dict) for m in conversation)):
        raise InputError(f"{where}: the conversation must be a non-empty list of messages")
    media = {}
    for kind in ("image", "video"):
        given = record.get(kind, record.get(kind + "s", []))
        given = given if isinstance(given, list) else [given]
        for name in given:
            if not isinstance(name, str) or not (path.parent / name).is_file():
                raise InputError(f"{where}: {kind} file not found: {name}")
        media[kind] = tuple(str(path.parent / name) for name in given)
    item = Item(str(record.get("id", where)), domain, record["answer"], question,
                None if conversation is None else tuple(conversation), media["image"], media["video"])
    parts = _media_parts(item.messages())
    for kind in ("image", "video"):
        if parts.count(kind) != len(media[kind]):
            raise InputError(f"{where}: the conversation has {parts.count(kind)} {kind} part(s) but the line gives "
                             f"{len(media[kind])} {kind}(s)")
    return item


def _media_parts(messages: Sequence[dict]) -> list[str]:
    kinds = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") in ("image", "video"):
                kinds.append(part["type"])
    return kinds


def items_from_examples(examples: Sequence[dict]) -> list[Item]:
    """Synthetic-style examples (``glmv_jax.data.synthetic``: ``image``, ``question``, ``domain``,
    ``ground_truth``, ``answer``) as items; the box content ``answer`` is the reference reply."""
    return [Item(str(ex.get("id", i)), ex["domain"], ex["ground_truth"], ex["question"], images=(ex["image"],),
                 reply=ex.get("answer")) for i, ex in enumerate(examples)]


# --------------------------------------------------------------------------------------------- encoding
def encode_prompts(items: Sequence[Item], tokenizer, config, processor=None) -> list[Prompt]:
    """Process each item's media and chat-encode it with the generation prompt (what `glmv generate` does for
    one prompt). ``processor``: the ImageProcessor (default GLM-4.1V's); videos use its patch geometry."""
    from glmv_jax.data import chat
    from glmv_jax.data.processor import ImageProcessor
    from glmv_jax.data.records import video_processor_for
    from glmv_jax.data.video import process_video_file

    processor = processor or ImageProcessor()
    videos = video_processor_for(processor)
    prompts = []
    for item in items:
        image = processor(list(item.images)) if item.images else {}
        clips = [process_video_file(v, videos) for v in item.videos]
        video_grids = np.concatenate([c["video_grid_thw"] for c in clips]) if clips else None
        encoded = chat.encode(item.messages(), tokenizer, image_grids=image.get("image_grid_thw"),
                              video_grids=video_grids, video_timestamps=[c["frame_timestamps"] for c in clips] or None,
                              add_generation_prompt=True, merge_size=config.vision.spatial_merge_size)
        prompts.append(Prompt(item, encoded["input_ids"], encoded["mm_token_type_ids"], image.get("pixel_values"),
                              image.get("image_grid_thw"),
                              np.concatenate([c["pixel_values_videos"] for c in clips]) if clips else None,
                              video_grids))
    return prompts


def batch_media(prompts: Sequence[Prompt]) -> dict[str, np.ndarray | None]:
    """The rows' images and videos concatenated in row order (None where no row has any)."""
    def cat(name, dtype):
        parts = [getattr(p, name) for p in prompts if getattr(p, name) is not None]
        return np.concatenate(parts).astype(dtype) if parts else None
    return {"pixel_values": cat("pixel_values", np.float32), "image_grid_thw": cat("image_grid_thw", np.int32),
            "pixel_values_videos": cat("pixel_values_videos", np.float32),
            "video_grid_thw": cat("video_grid_thw", np.int32)}


# ------------------------------------------------------------------------------------------- image swap
def swap_partners(items: Sequence[Item]) -> list[int | None]:
    """The image-swap derangement: for each item the index of the item whose images it gets, or None.

    Items with images are grouped by (domain, number of images); within a group (in file order) each item takes
    the images of the next one, the last those of the first: no item keeps its own. Items without images, and
    groups of one, get None (they are left out of the swap check)."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        if item.images:
            groups.setdefault((item.domain, len(item.images)), []).append(i)
    partners: list[int | None] = [None] * len(items)
    for members in groups.values():
        if len(members) > 1:
            for k, i in enumerate(members):
                partners[i] = members[(k + 1) % len(members)]
    return partners


def with_swapped_images(items: Sequence[Item], partners: Sequence[int | None]) -> list[Item]:
    """The items that have a partner, each with its partner's images (everything else its own)."""
    return [replace(items[i], images=items[j].images) for i, j in enumerate(partners) if j is not None]


__all__ = ["Item", "Prompt", "REPLY_PREFIX", "batch_media", "encode_prompts", "items_from_examples",
           "load_benchmark", "swap_partners", "with_swapped_images"]
