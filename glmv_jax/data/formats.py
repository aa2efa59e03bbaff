"""Example formats: one example dict -> (chat messages for ``chat.encode``, its raw images in order, its raw
videos in order).

``caption`` (pretraining: the reply is the whole caption), ``sft`` (question -> target) and ``llava``
(``conversations`` turns); :func:`resolve_format` takes a name or a callable (a callable may return just
``(messages, images)``). Videos (``video``/``videos``: file paths) become ``{"type": "video"}`` parts after the
image parts of the (first) user turn, or where a LLaVA turn writes ``<video>``. An example that cannot be a
training example raises :class:`SkipExample`, whose ``reason`` is the counter the pipeline files it under.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from glmv_jax.errors import DataError


class SkipExample(DataError):
    """An example that cannot become a training record; ``reason`` is the counter it is filed under."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------------------------- formats
# A format turns one example into (messages for chat.encode, the raw images of its image parts in order, the
# raw videos of its video parts in order); the videos may be left out (a 2-tuple: none).
Format = Callable[[Mapping[str, Any]], "tuple[list[dict], list[Any]] | tuple[list[dict], list[Any], list[Any]]"]


def _items_of(example: Mapping[str, Any], one: str, many: str) -> list[Any]:
    item = example.get(one, example.get(many))
    if item is None:
        return []
    if isinstance(item, (list, tuple)):
        return list(item)
    return [item]


def _images_of(example: Mapping[str, Any]) -> list[Any]:
    return _items_of(example, "image", "images")


def _videos_of(example: Mapping[str, Any]) -> list[Any]:
    return _items_of(example, "video", "videos")


def _media_parts(images: list[Any], videos: list[Any]) -> list[dict]:
    return [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]


def _reply(text: Any, what: str) -> str:
    if text is None or not str(text).strip():
        raise SkipExample("empty_target", f"the {what} is empty")
    return str(text)


def caption_format(example: Mapping[str, Any], instruction: str | None = None
                   ) -> tuple[list[dict], list[Any], list[Any]]:
    """Pretraining caption: user turn = the image(s) and video(s) (plus ``instruction`` if given), assistant reply = the
    whole caption (``caption``, else ``target``), so the loss covers every caption token and the end token.
    Bind an instruction with ``functools.partial(caption_format, instruction="Describe the image.")``."""
    caption = example.get("caption") or example.get("target")
    caption = _reply(caption, "caption")
    images, videos = _images_of(example), _videos_of(example)
    content = _media_parts(images, videos)
    if instruction:
        content.append({"type": "text", "text": instruction})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": caption}], images, videos


def sft_format(example: Mapping[str, Any]) -> tuple[list[dict], list[Any], list[Any]]:
    """SFT: user turn = image(s) + video(s) + ``question``, assistant reply = ``target`` (loss on the reply only).
    An example without an image or video is a text-only example (unless ``require_image``)."""
    target = _reply(example.get("target"), "target")
    images, videos = _images_of(example), _videos_of(example)
    content = _media_parts(images, videos)
    question = example.get("question") or ""
    if question:
        content.append({"type": "text", "text": str(question)})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": target}], images, videos


_TAGS = re.compile(r"(<image>|<video>)")


def llava_format(example: Mapping[str, Any]) -> tuple[list[dict], list[Any], list[Any]]:
    """LLaVA-style ``{"image": ..., "video": ..., "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}``.

    ``<image>`` (``<video>``) in a human turn becomes an image (video) part; if no turn has a tag, the images and
    videos go in front of the first human turn. chat.encode trains the final reply only; earlier replies are
    history.
    """
    turns = example.get("conversations") or []
    images, videos = _images_of(example), _videos_of(example)
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages: list[dict] = []
    placed = any(_TAGS.search(str(t.get("value", ""))) for t in turns)
    for turn in turns:
        role = roles.get(turn.get("from", turn.get("role")))
        if role is None:
            raise SkipExample("bad_example", f"unknown conversation role {turn.get('from')!r}")
        text = str(turn.get("value", turn.get("content", "")))
        if role != "user":
            messages.append({"role": role, "content": text})
            continue
        content: list[dict] = []
        if not placed:
            content += _media_parts(images, videos)
            placed = True
        has_tag = bool(_TAGS.search(text))
        for piece in _TAGS.split(text):
            if piece in ("<image>", "<video>"):
                content.append({"type": piece[1:-1]})
                continue
            piece = piece.strip("\n") if has_tag else piece  # "<image>\nquestion" -> image, "question"
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": content})
    if not messages or messages[-1]["role"] != "assistant":
        raise SkipExample("empty_target", "the conversation does not end with an assistant reply")
    _reply(messages[-1]["content"], "final reply")
    return messages, images, videos


FORMATS: dict[str, Format] = {"caption": caption_format, "sft": sft_format, "llava": llava_format}


def resolve_format(mode: str | Format) -> Format:
    if callable(mode):
        return mode
    try:
        return FORMATS[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(FORMATS)} or a callable") from None


__all__ = ["FORMATS", "Format", "SkipExample", "caption_format", "llava_format", "resolve_format", "sft_format"]
