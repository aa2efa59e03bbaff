"""Random-access example sources for the trainer (`data.source`) and the tokenizer they train.

Every source has `len` and `[i]` and gives the dicts the pipeline formats read (`image`/`images`,
`caption`, `question`, `target`, or LLaVA-style `conversations`); grain shuffles, shards and repeats them.

* `synthetic`: example `i` is `glmv_jax.data.synthetic.example_at(i, seed)` (drawn on demand; the eval set
  uses seed `data.seed + EVAL_SEED_OFFSET`, so it shares no example with training).
* `tfds`: a split prepared by `glmv_jax.data.tfds_builder` (read without TensorFlow); text fields arrive as
  bytes and are decoded here; eval = the `validation` split (else `test`).
* `jsonl`: one JSON object per line, image and video paths (`image`/`images`, `video`/`videos`) relative to
  `data.image_root`; the last `n_eval` lines are held out for eval. A line that is not a JSON object is not
  fatal: it becomes a record the pipeline skips and counts as `bad_example`; missing or corrupt images are
  counted as `missing_image`/`bad_image`, videos as `missing_video`/`bad_video`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from glmv_jax.errors import ConfigError, DataError

EVAL_SEED_OFFSET = 1000
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_TEXTS = 2000   # examples whose texts train a tokenizer
TEXT_FIELDS = ("question", "caption", "target")


class SyntheticSource:
    """Examples `start .. start+n-1` of `synthetic.generate(..., seed)`, drawn when read."""

    def __init__(self, n: int, seed: int = 0, domains: tuple[str, ...] = (), level: str = "standard"):
        from glmv_jax.data import synthetic

        self.n, self.seed = int(n), int(seed)
        self.domains, self.level = tuple(domains) or synthetic.DOMAINS, level

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        from glmv_jax.data import synthetic

        if not 0 <= index < self.n:
            raise IndexError(index)
        return synthetic.example_at(int(index), self.seed, self.domains, self.level)


class _BadRecord(dict):
    """A line that could not be read: the pipeline's format raises on it, so it is skipped as bad_example."""

    def get(self, key, default=None):
        if key == "id":
            return super().get(key, default)
        raise ValueError(self["error"])


class JsonlSource:
    """Lines `[start, stop)` of a JSONL file; relative image and video paths resolved against `image_root`."""

    def __init__(self, path: str | Path, image_root: str | Path = "", start: int = 0, stop: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data.path: no JSONL file at {self.path}")
        lines = [(n, line) for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip()]
        self.lines = lines[start:stop]
        self.image_root = str(image_root or "")

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict:
        number, line = self.lines[index]
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return _BadRecord(id=f"{self.path.name}:{number}", error=f"line {number} is not valid JSON: {e}")
        if not isinstance(record, dict):
            return _BadRecord(id=f"{self.path.name}:{number}", error=f"line {number} is not a JSON object")
        record.setdefault("id", f"{self.path.name}:{number}")
        for key in ("image", "images", "video", "videos"):
            if key in record:
                record[key] = self._resolve(record[key])
        return record

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        if isinstance(value, str) and self.image_root and not os.path.isabs(value):
            return os.path.join(self.image_root, value)
        return value


class TfdsSource:
    """One split of a dataset prepared with `glmv_jax.data.tfds_builder`, text fields decoded to str."""

    def __init__(self, data_dir: str | Path, name: str, split: str):
        from glmv_jax.data import tfds_builder

        self.split = split
        self._source = tfds_builder.load_split(data_dir, name, split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._source[index])
        out = {}
        for key, value in record.items():
            if isinstance(value, bytes) and key not in ("image",):
                value = value.decode("utf-8")
            if key == "conversations" and isinstance(value, str):
                value = json.loads(value)
            if key == "images":
                value = list(value)
            out[key] = value
        return out


def sft_or_conversations(example):
    """The `sft` mode's format: LLaVA-style `conversations` when the example has them, else question/target."""
    from glmv_jax.data.formats import llava_format, sft_format

    return llava_format(example) if "conversations" in example else sft_format(example)


def example_format(mode: str):
    """What `make_pipeline(mode=...)` gets for a `data.mode`."""
    return sft_or_conversations if mode == "sft" else mode


def make_sources(data) -> tuple[Any, Any | None]:
    """(train source, eval source or None) of a `DataConfig`."""
    if data.source == "synthetic":
        return (SyntheticSource(data.n_train, data.seed, data.domains, data.level),
                SyntheticSource(data.n_eval, data.seed + EVAL_SEED_OFFSET, data.domains, data.level)
                if data.n_eval else None)
    if data.source == "jsonl":
        whole = JsonlSource(data.path, data.image_root)
        n = len(whole)
        n_eval = min(data.n_eval, n // 2)
        stop = n - n_eval
        if data.n_train:
            stop = min(stop, data.n_train)
        train = JsonlSource(data.path, data.image_root, 0, stop)
        return train, (JsonlSource(data.path, data.image_root, n - n_eval, n) if n_eval else None)
    if data.source == "tfds":
        from glmv_jax.data import tfds_builder

        split = f"train[:{data.n_train}]" if data.n_train else "train"
        train = TfdsSource(data.data_dir, data.name, split)
        evaluation = None
        if data.n_eval:
            folder = tfds_builder.dataset_dir(data.data_dir, data.name)
            for name in ("validation", "test"):
                if any(folder.glob(f"*-{name}.array_record*")):
                    evaluation = TfdsSource(data.data_dir, data.name, f"{name}[:{data.n_eval}]")
                    break
        return train, evaluation
    raise ConfigError(f"unknown data.source {data.source!r}")


def source_texts(source, n: int = TOKENIZER_TEXTS) -> list[str]:
    """The texts of the first `n` examples (question, caption, target, conversation turns)."""
    texts = []
    for i in range(min(n, len(source))):
        try:
            example = source[i]
            for key in TEXT_FIELDS:
                if isinstance(example.get(key), str):
                    texts.append(example[key])
            for turn in example.get("conversations") or []:
                value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
                if isinstance(value, str):
                    texts.append(value.replace("<image>", ""))
        except (ValueError, TypeError, AttributeError):
            continue  # a bad record is skipped here as in the pipeline
    return texts


def tokenizer_for_run(data, workdir: str | Path, train_source, init_from: str | None = None):
    """The run's tokenizer: `data.tokenizer` loaded, or (`"synthetic"`) WORKDIR/tokenizer.model, which is copied
    from an `init_from` workdir that has one or else trained on the source's texts. Returns (tokenizer, trained)."""
    import shutil

    from glmv_jax.data.tokenizer import Tokenizer, train_sentencepiece

    if data.tokenizer != "synthetic":
        return Tokenizer.from_file(data.tokenizer), False
    path = Path(workdir) / TOKENIZER_FILE
    if not path.is_file():
        inherited = Path(init_from) / TOKENIZER_FILE if init_from else None
        if inherited is not None and inherited.is_file():
            shutil.copyfile(inherited, path)
        else:
            texts = source_texts(train_source)
            if not texts:
                raise DataError("data.tokenizer = synthetic: the source has no texts to train a tokenizer on")
            train_sentencepiece(texts, path.with_suffix(""), vocab_size=data.vocab_size)
    return Tokenizer.from_file(path), True


__all__ = ["EVAL_SEED_OFFSET", "JsonlSource", "SyntheticSource", "TfdsSource", "example_format", "make_sources",
           "sft_or_conversations", "source_texts", "tokenizer_for_run"]
