"""One tokenizer interface over two backends, with the GLM-4.1V special tokens resolved by name.

Backends:

* a Hugging Face ``tokenizer.json`` (the real GLM-4.1V-9B-Thinking tokenizer, a byte-level BPE), read with
  the ``tokenizers`` library;
* a sentencepiece ``.model`` (for models trained from scratch here), where the special tokens are
  ``user_defined_symbols`` so that they are always cut out of the text as single pieces. Build one with
  :func:`train_sentencepiece`.

Special-token ids are never hard-coded: :meth:`Tokenizer.token_id` looks each one up in the file and checks
that the string, written inside text, encodes to exactly that one id. :func:`check_ids` compares a model
config's ids against the tokenizer.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from glmv_jax.errors import ConfigError, DataError

# The GLM-4 / GLM-4.1V added tokens, in the order of their ids in the real tokenizer (151329 onwards for the
# first sixteen). The last six are the reasoning-format markers of GLM-4.1V-Thinking.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
)

# Markers that are part of the model's visible reply: ``decode(..., skip_special_tokens=True)`` keeps them
# (in the real tokenizer ``<think>`` survives skip_special_tokens). Every other SPECIAL_TOKENS entry is a
# control token and is dropped by skip_special_tokens. For a tokenizer.json the file's own ``special`` flags
# decide instead.
CONTENT_TOKENS: frozenset[str] = frozenset(
    {"<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>"})
CONTROL_TOKENS: tuple[str, ...] = tuple(t for t in SPECIAL_TOKENS if t not in CONTENT_TOKENS)

# Generation stops on these (HF generation_config of GLM-4.1V-9B-Thinking: <|endoftext|>, <|user|>,
# <|observation|>, </answer>); each is included in ``eos_ids`` only when the tokenizer has it.
EOS_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|user|>", "<|observation|>", "</answer>")

# Attribute name -> token. The names that end in ``token_id`` are the ones a model config uses.
ID_ATTRIBUTES: dict[str, str] = {
    "pad_token_id": "<|endoftext|>",
    "endoftext_id": "<|endoftext|>",
    "gmask_id": "[gMASK]",
    "sop_id": "<sop>",
    "system_id": "<|system|>",
    "user_id": "<|user|>",
    "assistant_id": "<|assistant|>",
    "observation_id": "<|observation|>",
    "image_token_id": "<|image|>",
    "video_token_id": "<|video|>",
    "image_start_token_id": "<|begin_of_image|>",
    "image_end_token_id": "<|end_of_image|>",
    "video_start_token_id": "<|begin_of_video|>",
    "video_end_token_id": "<|end_of_video|>",
    "think_start_id": "<think>",
    "think_end_id": "</think>",
    "answer_start_id": "<answer>",
    "answer_end_id": "</answer>",
    "box_start_id": "<|begin_of_box|>",
    "box_end_id": "<|end_of_box|>",
}


class Tokenizer:
    """A tokenizer.json or sentencepiece model behind one interface.

    ``encode`` never adds BOS/EOS or any other token (the chat template writes ``[gMASK]<sop>`` itself);
    special-token strings inside the text come out as their single ids.
    """

    def __init__(self, backend, path: str | os.PathLike, kind: str):
        if kind not in ("tokenizer.json", "sentencepiece"):
            raise ValueError(f"unknown tokenizer kind {kind!r}")
        self._tok = backend
        self.path = str(path)
        self.kind = kind
        self._ids: dict[str, int] = {}
        if kind == "sentencepiece":
            skip = {self._tok.piece_to_id(t) for t in CONTROL_TOKENS if self._has_piece(t)}
            skip |= {i for i in range(self._tok.get_piece_size())
                     if self._tok.is_control(i) or self._tok.is_unknown(i)}
            self._sp_skip = frozenset(skip)

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` (or a folder holding one) or a sentencepiece ``.model`` (or a folder
        holding ``tokenizer.model``)."""
        p = Path(path)
        if p.is_dir():
            for name in ("tokenizer.json", "tokenizer.model"):
                if (p / name).is_file():
                    p = p / name
                    break
            else:
                models = sorted(p.glob("*.model"))
                if len(models) != 1:
                    raise FileNotFoundError(
                        f"{path}: no tokenizer.json or tokenizer.model in this folder"
                        + (f" (and {len(models)} *.model files, so no unique choice)" if models else ""))
                p = models[0]
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        if p.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            return cls(HFTokenizer.from_file(str(p)), p, "tokenizer.json")
        if p.suffix == ".model":
            import sentencepiece as spm

            return cls(spm.SentencePieceProcessor(model_file=str(p)), p, "sentencepiece")
        raise DataError(f"{p}: expected a tokenizer.json or a sentencepiece .model file")

    # --------------------------------------------------------------------------------------- text <-> ids
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become single ids; nothing is added."""
        if self.kind == "tokenizer.json":
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._tok.encode(text, out_type=int))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Ids past the tokenizer's vocabulary (a model's padded embedding rows) are dropped."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if self.kind == "tokenizer.json":
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._sp_skip]
        return self._tok.decode(ids)

    def id_to_token(self, i: int) -> str:
        if self.kind == "tokenizer.json":
            tok = self._tok.id_to_token(int(i))
            if tok is None:
                raise KeyError(f"id {i} is outside the vocabulary of tokenizer {self.path}")
            return tok
        if not 0 <= int(i) < self._tok.get_piece_size():
            raise KeyError(f"id {i} is outside the vocabulary of tokenizer {self.path}")
        return self._tok.id_to_piece(int(i))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (the model's embedding table may
        be larger, e.g. 151552 for GLM-4.1V)."""
        if self.kind == "tokenizer.json":
            return self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.get_piece_size()

    # ------------------------------------------------------------------------------------ special tokens
    def _has_piece(self, name: str) -> bool:
        # piece_to_id answers unk_id for an unknown piece, whose own piece is "<unk>", not ``name``
        return self._tok.id_to_piece(self._tok.piece_to_id(name)) == name

    def _lookup(self, name: str) -> int | None:
        if self.kind == "tokenizer.json":
            return self._tok.token_to_id(name)
        return self._tok.piece_to_id(name) if self._has_piece(name) else None

    def token_id(self, name: str) -> int:
        """The id of the token written ``name`` (e.g. ``"<|image|>"``).

        Raises ``KeyError`` naming the token and the file when the tokenizer does not have it, and
        ``ValueError`` when it has it only as an ordinary vocabulary entry that text would not encode to.
        """
        if name in self._ids:
            return self._ids[name]
        i = self._lookup(name)
        if i is None:
            raise KeyError(f"token {name!r} is not in the {self.kind} tokenizer {self.path}")
        if self.encode(name) != [i]:
            raise ValueError(f"token {name!r} has id {i} in {self.path}, but the text {name!r} encodes to "
                             f"{self.encode(name)}; it must be an added/user-defined token")
        self._ids[name] = i
        return i

    def has_token(self, name: str) -> bool:
        try:
            self.token_id(name)
        except (KeyError, ValueError):
            return False
        return True

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids generation stops on: ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``, ``</answer>``,
        each when the tokenizer has it, in that order."""
        return tuple(self.token_id(t) for t in EOS_TOKENS if self.has_token(t))

    @property
    def special_ids(self) -> dict[str, int]:
        """Every SPECIAL_TOKENS entry this tokenizer has, name -> id."""
        return {t: self.token_id(t) for t in SPECIAL_TOKENS if self.has_token(t)}

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, {self.path!r}, vocab_size={self.vocab_size})"


def _id_property(token: str):
    def get(self: Tokenizer) -> int:
        return self.token_id(token)

    get.__doc__ = f"Id of ``{token}`` (KeyError if the tokenizer lacks it)."
    return property(get)


for _attr, _token in ID_ATTRIBUTES.items():
    setattr(Tokenizer, _attr, _id_property(_token))
del _attr, _token


# ------------------------------------------------------------------------------------------------ checks
def check_ids(tokenizer: Tokenizer, expected: Mapping[str, int | Sequence[int] | None]) -> None:
    """Raise ``ValueError`` listing every special id in ``expected`` that disagrees with ``tokenizer``.

    Keys are either attribute names from :data:`ID_ATTRIBUTES` (the model-config names such as
    ``image_token_id``, ``video_start_token_id``, ``pad_token_id``), token strings (``"<|image|>"``), or
    ``eos_token_id`` whose value (an int or a list) must consist of ids of the tokenizer's stop tokens
    (:attr:`Tokenizer.eos_ids`). ``None`` values are skipped.
    """
    problems: list[str] = []
    for key, want in expected.items():
        if want is None:
            continue
        if key in ("eos_token_id", "eos_ids"):
            wants = [int(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
            have = tokenizer.eos_ids
            bad = [w for w in wants if w not in have]
            if bad:
                names = [t for t in EOS_TOKENS if tokenizer.has_token(t)]
                problems.append(f"{key}={wants}: {bad} are not stop tokens of the tokenizer "
                                f"(its eos_ids are {list(have)} for {names})")
            continue
        token = ID_ATTRIBUTES.get(key, key)
        try:
            got = tokenizer.token_id(token)
        except (KeyError, ValueError) as e:
            problems.append(f"{key}={want}: {e.args[0]}")
            continue
        if int(want) != got:
            problems.append(f"{key}={want} but the tokenizer has {token}={got}")
    if problems:
        raise ConfigError(f"special token ids disagree with tokenizer {tokenizer.path}:\n  " + "\n  ".join(problems))


# -------------------------------------------------------------------------------------------- training
def train_sentencepiece(
    texts: Iterable[str],
    path_prefix: str | os.PathLike,
    vocab_size: int = 1024,
    *,
    model_type: str = "bpe",
    extra_symbols: Sequence[str] = (),
    character_coverage: float = 1.0,
    max_sentence_length: int = 1 << 16,
) -> Tokenizer:
    """Train a small sentencepiece model on ``texts`` and write ``{path_prefix}.model`` (and ``.vocab``).

    All :data:`SPECIAL_TOKENS` (then ``extra_symbols``) are user-defined symbols with ids 1, 2, ... in that
    order (id 0 is ``<unk>``; there is no ``<s>``/``</s>``). Byte fallback is on, the text is not normalised
    and no dummy space prefix is added, so ``decode(encode(s)) == s`` for any string. Training is
    single-threaded and unshuffled, so the same texts give the same model. ``vocab_size`` is an upper bound
    (a small corpus may yield fewer pieces) and must hold ``1 + symbols + 256 bytes + the corpus' characters``.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    symbols = list(dict.fromkeys([*SPECIAL_TOKENS, *extra_symbols]))
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("train_sentencepiece needs at least one non-empty text")
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=int(vocab_size),
            model_type=model_type, user_defined_symbols=symbols, byte_fallback=True,
            character_coverage=character_coverage, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, max_sentence_length=max_sentence_length,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"sentencepiece training failed for vocab_size={vocab_size} "
                         f"({len(symbols)} symbols + 256 byte pieces + <unk> are fixed): {e}") from e
    model_path = prefix.with_name(prefix.name + ".model")
    model_path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(prefix.with_name(prefix.name + ".vocab"), "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return Tokenizer.from_file(model_path)


__all__ = ["CONTENT_TOKENS", "CONTROL_TOKENS", "EOS_TOKENS", "ID_ATTRIBUTES", "SPECIAL_TOKENS", "Tokenizer",
           "check_ids", "train_sentencepiece"]
