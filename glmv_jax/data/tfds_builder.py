"""TFDS datasets written as ``array_record`` files and read back as random-access numpy data sources (what
grain consumes), with no TensorFlow installed.

Two builders:

* :class:`SyntheticTasks` (``synthetic_tasks``): the verifiable tasks of :mod:`glmv_jax.data.synthetic`, with
  ``train`` / ``validation`` / ``test`` splits drawn from disjoint seeds. Record ``i`` of a split is example
  ``i`` of ``synthetic.generate(n, split_seed(seed, split))`` (shuffling at write time is disabled).
* :class:`LocalConversations` (``local_conversations``): a LLaVA/ShareGPT-style JSONL file
  (``{"id", "image" | "images", "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}``) with
  image paths relative to an image folder. Records whose image is missing or cannot be decoded (and lines that
  are not valid records) are skipped and counted, never fatal: the counts are logged, kept in
  ``builder.skipped`` and in the dataset's ``metadata.json`` (``builder.info.metadata["skipped"]``).

Without TensorFlow, tfds can still (tfds 4.9): define ``GeneratorBasedBuilder`` s, encode ``Text``,
``Scalar`` and ``Sequence`` features, encode ``Image`` features *from PIL images, encoded bytes or file paths*
(not from numpy arrays: that path calls ``tf.image.encode_png``), write ``array_record`` files, and read them
with ``as_data_source`` / ``builder_from_directory`` (images are decoded with PIL; text comes back as
``bytes``). ``tfds.decode.SkipDecoding`` lacks the numpy path for sequences, hence :class:`_RawImageBytes`.
``as_dataset`` (a ``tf.data`` pipeline) needs TensorFlow and is not used.

Records as read back (``load_split``): ``synthetic_tasks`` gives ``{"id", "domain", "question", "caption",
"thinking", "answer", "target", "ground_truth"}`` as ``bytes`` (``ground_truth`` is JSON), ``"difficulty"`` an
int and ``"image"`` a ``uint8 (H, W, 3)`` array (or the PNG ``bytes`` with ``decode_images=False``);
``local_conversations`` gives ``"id"``, ``"conversations"`` (the JSON list of turns) as ``bytes``, ``"line"``
(1-based line in the JSONL), ``"image_paths"`` (a list of ``bytes``) and ``"images"`` (a list of ``uint8 (H, W,
3)`` arrays, or of encoded bytes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from glmv_jax.data import synthetic

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_MAX_LOGGED_SKIPS = 10


def _image_feature() -> tfds.features.Image:
    return tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png")


def _code_path(cls):
    """This file. tfds' own ``code_path`` evaluates ``importlib_resources.abc.Traversable`` for builders that
    live in a package, and tfds only depends on ``importlib_resources`` for Python < 3.9: without it,
    ``download_and_prepare`` fails with ``ModuleNotFoundError``. The path only locates an optional
    ``checksums.tsv`` for downloads, which these builders do not have."""
    return epath.Path(inspect.getfile(cls))


def split_seed(seed: int, split: str) -> int:
    """The ``generate`` seed of one split: a 63-bit hash of ``(seed, split)``, so the splits (and the splits
    of other seeds) draw disjoint example seeds."""
    digest = hashlib.sha256(f"glmv-synthetic-split/{int(seed)}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ----------------------------------------------------------------------------------------- synthetic tasks
@dataclasses.dataclass(eq=False)
class SyntheticTasksConfig(tfds.core.BuilderConfig):
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    seed: int = 0
    domains: tuple[str, ...] = synthetic.DOMAINS


def synthetic_config(n_train: int, n_val: int, n_test: int, seed: int = 0,
                     domains=synthetic.DOMAINS) -> SyntheticTasksConfig:
    """A config named after its parameters (``n{train}_{val}_{test}_s{seed}[_{domains}]``), so datasets of
    different sizes or seeds live side by side in one ``data_dir``."""
    domains = tuple(domains)
    name = f"n{int(n_train)}_{int(n_val)}_{int(n_test)}_s{int(seed)}"
    if domains != synthetic.DOMAINS:
        name += "_" + "_".join(domains)
    return SyntheticTasksConfig(name=name, description=f"synthetic tasks {name}", n_train=int(n_train),
                                n_val=int(n_val), n_test=int(n_test), seed=int(seed), domains=domains)


class SyntheticTasks(tfds.core.GeneratorBasedBuilder):
    """Procedural counting / arithmetic / OCR / grounding images with verifiable answers and SFT targets."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [synthetic_config(2000, 200, 200, 0)]
    code_path = tfds.core.utils.classproperty(classmethod(_code_path))

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "id": text(), "domain": text(), "image": _image_feature(), "question": text(),
                "caption": text(), "thinking": text(), "answer": text(), "target": text(),
                "ground_truth": text(doc="JSON: an int, a 'p/q' string, a text, or [x1,y1,x2,y2] on 0..1000"),
                "difficulty": tfds.features.Scalar(dtype=np.int32),
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        sizes = {"train": cfg.n_train, "validation": cfg.n_val, "test": cfg.n_test}
        seeds = {s: split_seed(cfg.seed, s) for s in SPLITS}
        self.info.metadata.update({"seed": cfg.seed, "split_seeds": seeds, "domains": list(cfg.domains)})
        return {s: self._generate_examples(n, seeds[s]) for s, n in sizes.items() if n > 0}

    def _generate_examples(self, n: int, seed: int):
        for i, ex in enumerate(synthetic.generate(n, seed, self.builder_config.domains)):
            yield i, to_record(ex)


def to_record(ex: dict) -> dict:
    """A ``synthetic.make_example`` dict as a ``SyntheticTasks`` record to encode."""
    image = ex["image"]
    if isinstance(image, np.ndarray):  # tfds would encode arrays with TensorFlow; PIL images it encodes itself
        image = Image.fromarray(image)
    return {"id": ex["id"], "domain": ex["domain"], "image": image.convert("RGB"), "question": ex["question"],
            "caption": ex["caption"], "thinking": ex["thinking"], "answer": ex["answer"], "target": ex["target"],
            "ground_truth": json.dumps(ex["ground_truth"]), "difficulty": int(ex["difficulty_hint"])}


# -------------------------------------------------------------------------------------- local conversations
@dataclasses.dataclass(eq=False)
class LocalConversationsConfig(tfds.core.BuilderConfig):
    jsonl: Mapping[str, str] | None = None  # split -> path of the JSONL file
    image_root: str = ""


def _config_name(jsonl) -> str:
    path = jsonl["train"] if "train" in jsonl else next(iter(jsonl.values()))
    return re.sub(r"[^a-z0-9_]+", "_", Path(path).stem.lower()).strip("_") or "default"


def local_config(jsonl, image_root, name: str | None = None) -> LocalConversationsConfig:
    splits = {"train": str(jsonl)} if isinstance(jsonl, (str, Path)) else {k: str(v) for k, v in jsonl.items()}
    return LocalConversationsConfig(name=name or _config_name(splits), jsonl=splits, image_root=str(image_root),
                                    description=f"conversations from {splits} with images under {image_root}")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _image_paths(record: dict) -> list[str]:
    images = record.get("images", record.get("image"))
    if images is None:
        return []
    if isinstance(images, str):
        return [images]
    if isinstance(images, list) and all(isinstance(p, str) for p in images):
        return list(images)
    raise _Skip("bad_record", f"image entry {images!r} is neither a path nor a list of paths")


def load_image_bytes(path: Path) -> bytes:
    """The file's bytes when it is an RGB PNG/JPEG that decodes completely; other decodable images are
    converted to RGB and re-encoded as PNG. Raises ``_Skip`` for a missing or undecodable file."""
    if not path.is_file():
        raise _Skip("missing_image", str(path))
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode every pixel: catches truncated files that Image.open alone accepts
            if im.mode == "RGB" and im.format in ("PNG", "JPEG"):
                return data
            rgb = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 -- PIL raises many types (OSError, SyntaxError, DecompressionBomb, ...)
        raise _Skip("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


def _conversations(record: dict) -> list:
    conv = record.get("conversations")
    if (not isinstance(conv, list) or not conv
            or not all(isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
                       for t in conv)):
        raise _Skip("bad_record", "no 'conversations' list of {'from', 'value'} turns")
    return conv


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LocalConversations(tfds.core.GeneratorBasedBuilder):
    """LLaVA/ShareGPT-style JSONL conversations with local images (see :func:`prepare_local`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    # no predefined config: each JSONL gets its own (local_config / prepare_local)
    code_path = tfds.core.utils.classproperty(classmethod(_code_path))

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skipped: dict[str, Counter] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "images": tfds.features.Sequence(_image_feature()),
                "image_paths": tfds.features.Sequence(tfds.features.Text()),
                "conversations": tfds.features.Text(doc="JSON list of {'from': ..., 'value': ...} turns"),
                "line": tfds.features.Scalar(dtype=np.int32, doc="1-based line of the record in its JSONL"),
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        if not cfg.jsonl:
            raise ValueError("LocalConversations needs a config from local_config(jsonl, image_root)")
        self.info.metadata.update({
            "image_root": str(Path(cfg.image_root).resolve()),
            "jsonl": {s: str(Path(p).resolve()) for s, p in cfg.jsonl.items()},
            "jsonl_sha256": {s: file_sha256(p) for s, p in cfg.jsonl.items()},
            "skipped": {}, "read": {},
        })
        return {split: self._generate_examples(split, Path(path)) for split, path in cfg.jsonl.items()}

    def _generate_examples(self, split: str, path: Path):
        root = Path(self.builder_config.image_root)
        skipped = self.skipped.setdefault(split, Counter())
        read = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                read += 1
                try:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise _Skip("bad_record", f"invalid JSON: {e}") from None
                    if not isinstance(record, dict):
                        raise _Skip("bad_record", "not a JSON object")
                    conv = _conversations(record)
                    paths = _image_paths(record)
                    images = [load_image_bytes(p if (p := Path(rel)).is_absolute() else root / rel)
                              for rel in paths]
                except _Skip as e:
                    skipped[e.reason] += 1
                    if sum(skipped.values()) <= _MAX_LOGGED_SKIPS:
                        log.warning("%s:%d: skipping record (%s)", path, lineno, e)
                    continue
                yield lineno, {"id": str(record.get("id", f"{path.stem}-{lineno}")), "images": images,
                               "image_paths": paths, "conversations": json.dumps(conv, ensure_ascii=False),
                               "line": lineno}
        total = sum(skipped.values())
        self.info.metadata["skipped"][split] = dict(skipped)
        self.info.metadata["read"][split] = read
        if total:
            log.warning("%s: skipped %d of %d records in split %r (%s)", path, total, read, split,
                        ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))


# ------------------------------------------------------------------------------------------- plain API
def _config_arg(cls, cfg: tfds.core.BuilderConfig):
    """``cfg``, or its name when the class predefines a config of that name (tfds refuses a custom config
    named like a predefined one)."""
    known = {c.name: c for c in cls.BUILDER_CONFIGS}
    if cfg.name not in known:
        return cfg
    if dataclasses.asdict(known[cfg.name]) != dataclasses.asdict(cfg):
        raise ValueError(f"config name {cfg.name!r} is taken by the predefined {known[cfg.name]}; pick another")
    return cfg.name


def prepare_synthetic(data_dir, n_train: int = 2000, n_val: int = 200, seed: int = 0, *, n_test: int | None = None,
                      domains=synthetic.DOMAINS) -> SyntheticTasks:
    """Build (or reuse) ``{data_dir}/synthetic_tasks/{config}/1.0.0`` as array_record; returns the builder."""
    cfg = synthetic_config(n_train, n_val, n_val if n_test is None else n_test, seed, domains)
    builder = SyntheticTasks(data_dir=str(data_dir), config=_config_arg(SyntheticTasks, cfg),
                             file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return builder


def prepare_local(data_dir, jsonl, image_root, *, name: str | None = None,
                  overwrite: bool = False) -> LocalConversations:
    """Build ``{data_dir}/local_conversations/{name}/1.0.0`` from ``jsonl`` (a path, or ``{split: path}``)
    with images resolved against ``image_root`` (absolute paths are used as they are). ``name`` defaults to
    the JSONL file's stem. An existing build is reused unless a JSONL file changed (its sha256 differs from
    the recorded one) or ``overwrite``. Returns the builder; ``builder.info.metadata["skipped"]`` holds the
    per-split counts of skipped records by reason."""
    cfg = local_config(jsonl, image_root, name)

    def make():
        return LocalConversations(data_dir=str(data_dir), config=_config_arg(LocalConversations, cfg),
                                  file_format="array_record")

    builder = make()
    if builder.is_prepared():
        recorded = builder.info.metadata.get("jsonl_sha256", {})
        current = {s: file_sha256(p) for s, p in cfg.jsonl.items()}
        if overwrite or recorded != current:
            log.warning("%s: rebuilding (%s)", builder.data_dir, "overwrite" if overwrite else "the JSONL changed")
            # a builder that found its data on disk cannot be re-prepared in place: delete, then start over
            shutil.rmtree(builder.data_dir)
            builder = make()
    builder.download_and_prepare(file_format="array_record")
    return builder


def dataset_dir(data_dir, name: str) -> Path:
    """The version folder of ``name`` (``"synthetic_tasks"``, ``"synthetic_tasks/n40_8_8_s0"``, or with the
    version): the only config if there is one, and the newest version."""
    d = Path(data_dir, *name.strip("/").split("/"))
    if not d.is_dir():
        raise FileNotFoundError(f"no dataset {name!r} under {data_dir} ({d} does not exist)")
    while not (d / "dataset_info.json").is_file():
        subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(("incomplete", ".")))
        versions = [p for p in subs if re.fullmatch(r"\d+\.\d+\.\d+", p.name)]
        if versions:
            d = max(versions, key=lambda p: tuple(int(x) for x in p.name.split(".")))
        elif len(subs) == 1:
            d = subs[0]
        else:
            raise ValueError(f"{d} holds {[p.name for p in subs] or 'no prepared dataset'}; pass "
                             f"name='{name.strip('/')}/<one of them>'")
    return d


class _RawImageBytes(tfds.decode.SkipDecoding):
    """Leave images encoded, for single images and sequences of images alike (numpy backend)."""

    def decode_batch_example_np(self, serialized):
        return [bytes(x) for x in serialized]


def load_split(data_dir, name: str, split: str, *, decode_images: bool = True):
    """A random-access data source (``len`` and ``[i]`` -> dict of numpy arrays / bytes) over one split
    (``split`` may slice: ``"train[:100]"``) of a prepared dataset; ``grain.MapDataset.source(...)`` takes it.

    ``name`` is ``"synthetic_tasks"`` / ``"local_conversations"``, optionally with ``/config`` (needed when
    several were built) and ``/version``. The dataset classes need not be imported: this reads the folder.
    ``decode_images=False`` keeps the encoded image bytes.
    """
    builder = tfds.builder_from_directory(str(dataset_dir(data_dir, name)))
    decoders = None
    if not decode_images:
        decoders = {k: _RawImageBytes() for k, f in builder.info.features.items()
                    if isinstance(f, tfds.features.Image)
                    or isinstance(f, tfds.features.Sequence) and isinstance(f.feature, tfds.features.Image)}
    return builder.as_data_source(split=split, decoders=decoders)


def skipped_counts(data_dir, name: str) -> dict[str, dict[str, int]]:
    """Per split, the number of JSONL records skipped by reason, as recorded when the dataset was built."""
    info = json.loads((dataset_dir(data_dir, name) / "metadata.json").read_text())
    return info.get("skipped", {})


__all__ = ["LocalConversations", "LocalConversationsConfig", "SyntheticTasks", "SyntheticTasksConfig", "dataset_dir",
           "load_image_bytes", "load_split", "local_config", "prepare_local", "prepare_synthetic", "skipped_counts",
           "split_seed", "synthetic_config", "to_record"]
