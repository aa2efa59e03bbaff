"""Procedurally drawn images with verifiable answers, in four families that mirror the RL reward domains.

* ``counting``   -- count the shapes of a colour and/or kind; the answer is a number (0..10);
* ``arithmetic`` -- a rendered expression (``7 + 5``, ``12 ÷ 9``, ``3 + 4 × 2 = ?``); the answer is its exact
  value, an integer or a reduced fraction ``p/q``;
* ``ocr``        -- a rendered word, two words or a short code; the answer is the exact string;
* ``grounding``  -- one object among distractors; the answer is its box ``[x1,y1,x2,y2]`` on the 0..1000 scale
  (``x = pixel / width * 1000``; ``x1, y1`` rounded down and ``x2, y2`` rounded up from the exclusive pixel
  edge, so the box always covers every drawn pixel of the object and is at most one scale unit loose).

Every example is a pure function of ``(domain, seed)`` (a ``random.Random`` seeded with a string, so neither
``PYTHONHASHSEED`` nor the numpy version matter). Images are RGB PIL images with sides in 56..448 px and free
aspect ratios, drawn by ``data/drawing`` (shapes in the exact colours of its ``COLORS``, text in Pillow's
built-in font; nothing is downloaded).

The SFT reply (``target``) is ``chat.format_answer(thinking, answer)``:
``<think>\\n…</think>\\n<answer><|begin_of_box|>{answer}<|end_of_box|></answer>``.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from fractions import Fraction

from PIL import Image

from glmv_jax.data.chat import format_answer
from glmv_jax.data.drawing import (BACKGROUNDS, COLORS, INKS, MAX_SIDE, SHAPES, canvas_size, draw_objects,
                                   normalize_box, render_expression, text_mask)

DOMAINS: tuple[str, ...] = ("counting", "arithmetic", "ocr", "grounding")

WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish", "book", "door", "lamp", "road", "ship", "rain",
    "snow", "wind", "fire", "stone", "cloud", "bread", "milk", "glass", "clock", "chair", "table", "light",
    "paper", "music", "water", "plant", "train", "horse", "heart", "smile", "apple", "house", "river", "green",
    "seven", "north", "south", "happy", "quiet", "small", "zebra", "pizza", "robot", "jelly", "vivid", "maple",
)
CODE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")


# --------------------------------------------------------------------------------------------- helpers
def _rng(domain: str, seed: int) -> random.Random:
    return random.Random(f"glmv-synthetic/{domain}/{int(seed)}")


def example_seed(seed: int, index: int) -> int:
    """The seed of example ``index`` of ``generate(..., seed=seed)``: a 63-bit hash of ``(seed, index)``."""
    digest = hashlib.sha256(f"glmv-synthetic/{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _plural(n: int, noun: str) -> str:
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{word} {noun}" if n == 1 else f"{word} {noun}s"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _where(box: tuple[int, int, int, int], w: int, h: int) -> str:
    """Coarse position of a pixel box: top left / top / ... / center / ... / bottom right."""
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{row} {col}".strip() or "center"


def _reading_order(box: tuple[int, int, int, int], h: int) -> tuple[int, int]:
    return (int(3 * (box[1] + box[3]) / 2 / h), box[0])  # row band (thirds), then left to right


def _scene_caption(bg: str, objects: list[dict]) -> str:
    counts = Counter((o["color"], o["shape"]) for o in objects)
    parts = [_plural(c, f"{color} {shape}") for (color, shape), c in sorted(counts.items())]
    return f"A {bg} picture with {_join(parts)}."


# ----------------------------------------------------------------------------------------- the families
def _counting(rng: random.Random) -> dict:
    mode = rng.choice(("color", "shape", "both"))
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    match = {"color": lambda c, s: c == color, "shape": lambda c, s: s == shape,
             "both": lambda c, s: c == color and s == shape}[mode]
    noun = {"color": f"{color} shapes", "shape": f"{shape}s", "both": f"{color} {shape}s"}[mode]
    k = rng.choices(range(8), weights=(1, 6, 6, 6, 5, 4, 3, 3))[0]
    others = [(c, s) for c in sorted(COLORS) for s in SHAPES if not match(c, s)]
    d = rng.randint(1 if k == 0 else 0, min(5, 10 - k))
    if mode == "color":
        targets = [(color, rng.choice(SHAPES)) for _ in range(k)]
    elif mode == "shape":
        targets = [(rng.choice(sorted(COLORS)), shape) for _ in range(k)]
    else:
        targets = [(color, shape)] * k
    kinds = targets + [rng.choice(others) for _ in range(d)]
    rng.shuffle(kinds)
    img, bg, objects = draw_objects(rng, kinds)
    hits = sorted((o for o in objects if match(o["color"], o["shape"])),
                  key=lambda o: _reading_order(o["box"], img.height))
    question = rng.choice((f"How many {noun} are there in the image?", f"Count the {noun} in the picture.",
                           f"How many {noun} can you see?"))
    if hits:
        seen = "; ".join(f"{i}. {_a(o['color'] + ' ' + o['shape'])} at the {_where(o['box'], *img.size)}"
                         for i, o in enumerate(hits, 1))
        thinking = (f"I need to count the {noun}. Going from top to bottom and left to right: {seen}. "
                    f"That makes {k}.\n")
    else:
        thinking = (f"I need to count the {noun}. The picture only has "
                    f"{_join(sorted({o['color'] + ' ' + o['shape'] for o in objects}))}, none of which is one of "
                    f"the {noun}. So there are 0.\n")
    return {"image": img, "question": question, "caption": _scene_caption(bg, objects), "thinking": thinking,
            "answer": str(k), "ground_truth": k, "difficulty_hint": len(objects)}


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a / b}
_OP_WORDS = {"+": "plus", "-": "minus", "×": "times", "÷": "divided by"}


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "×":
        return rng.randint(0, 12), rng.randint(0, 12)
    if op == "÷":
        b = rng.randint(1, 9)
        return (b * rng.randint(0, 9) if rng.random() < 0.6 else rng.randint(1, 30)), b
    return rng.randint(0, 20), rng.randint(0, 20)


def _arithmetic(rng: random.Random) -> dict:
    if rng.random() < 0.7:  # a op b
        op = rng.choice(tuple(_OPS))
        a, b = _operands(rng, op)
        nums, ops = [a, b], [op]
        value = _OPS[op](Fraction(a), Fraction(b))
        if value.denominator == 1:
            steps = f"{a} {_OP_WORDS[op]} {b} is {_fmt(value)}."
        else:
            steps = (f"{b} does not divide {a} evenly, so {a} ÷ {b} is the fraction {a}/{b}"
                     + (f", which reduces to {_fmt(value)}." if value.denominator != b else "."))
    else:  # a op1 b op2 c, with + - × and the usual precedence
        op1, op2 = rng.choice("+-×"), rng.choice("+-×")
        nums = [rng.randint(0, 12 if "×" in (op1, op2) else 20) for _ in range(3)]
        a, b, c = nums
        ops = [op1, op2]
        if op2 == "×" and op1 != "×":
            bc = b * c
            value = Fraction(_OPS[op1](a, bc))
            steps = f"Multiplication comes first: {b} × {c} = {bc}. Then {a} {op1} {bc} = {_fmt(value)}."
        else:
            ab = _OPS[op1](a, b)
            value = Fraction(_OPS[op2](ab, c))
            first = "Multiplication comes first" if op1 == "×" else "From left to right"
            steps = f"{first}: {a} {op1} {b} = {ab}. Then {ab} {op2} {c} = {_fmt(value)}."
    expr = " ".join(f"{n} {o}" for n, o in zip(nums, ops)) + f" {nums[-1]}"
    ask = rng.random() < 0.5
    img, bg, ink = render_expression(rng, nums, ops, ask)
    question = rng.choice((
        "What is the value of the expression in the image?",
        "Compute the result of the calculation shown.",
        "Evaluate the expression in the picture. Give a fraction if the result is not a whole number.",
    ))
    thinking = f"The image shows {expr}{' = ?' if ask else ''}. {steps}\n"
    caption = f"The expression {expr}{' = ?' if ask else ''} written in {ink} on a {bg} background."
    gt = value.numerator if value.denominator == 1 else _fmt(value)
    return {"image": img, "question": question, "caption": caption, "thinking": thinking,
            "answer": _fmt(value), "ground_truth": gt, "difficulty_hint": sum(len(str(n)) for n in nums)}


def _ocr(rng: random.Random) -> dict:
    r = rng.random()
    if r < 0.6:
        words = [rng.choice(WORDS)]
    elif r < 0.8:
        words = [rng.choice(WORDS), rng.choice(WORDS)]
    else:
        words = ["".join(rng.choice(CODE_CHARS) for _ in range(rng.randint(3, 5)))]
    if r < 0.8:
        case = rng.choice((str.lower, str.upper, str.title))
        words = [case(wd) for wd in words]
    text = " ".join(words)
    size = rng.randint(14, 48)
    mask = text_mask(text, size)
    while mask.width + 8 > MAX_SIDE and size > 10:
        size -= 4
        mask = text_mask(text, size)
    w, h = canvas_size(rng, mask.width + 8, mask.height + 8)
    bg, ink = rng.choice(sorted(BACKGROUNDS)), rng.choice(sorted(INKS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    img.paste(INKS[ink], (rng.randint(4, w - mask.width - 4), rng.randint(4, h - mask.height - 4)), mask)
    what = "code" if r >= 0.8 else "word" if len(words) == 1 else "words"
    if len(words) == 1:
        spelled = f"Reading it character by character: {'-'.join(text)}."
    else:
        spelled = "Reading it word by word: " + ", then ".join(f'"{wd}" ({"-".join(wd)})' for wd in words) + "."
    question = rng.choice(("What text is written in the image?", "Read the text in the image.",
                           "What does the image say? Answer with the exact text."))
    thinking = f"There is one line of {ink} text. {spelled} So the text is \"{text}\".\n"
    caption = f"The {what} \"{text}\" in {ink} letters on a {bg} background."
    return {"image": img, "question": question, "caption": caption, "thinking": thinking, "answer": text,
            "ground_truth": text, "difficulty_hint": len(text)}


def _grounding(rng: random.Random) -> dict:
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    kinds = [(color, shape)]
    for _ in range(rng.randint(1, 5)):
        r = rng.random()
        if r < 0.35:
            kinds.append((color, rng.choice([s for s in SHAPES if s != shape])))
        elif r < 0.6:
            kinds.append((rng.choice([c for c in sorted(COLORS) if c != color]), shape))
        else:
            kinds.append(rng.choice([(c, s) for c in sorted(COLORS) for s in SHAPES if (c, s) != (color, shape)]))
    order = list(range(len(kinds)))
    rng.shuffle(order)
    img, bg, objects = draw_objects(rng, [kinds[i] for i in order])
    target = objects[order.index(0)]
    box = normalize_box(target["box"], *img.size)
    answer = "[" + ",".join(map(str, box)) + "]"
    question = rng.choice((
        f"Where is the {color} {shape}? Answer with its bounding box [x1,y1,x2,y2] on a 0-1000 scale.",
        f"Locate the {color} {shape} in the image and give its box as [x1,y1,x2,y2], scaled 0 to 1000.",
        f"Find the {color} {shape}. Output [x1,y1,x2,y2] with coordinates from 0 to 1000.",
    ))
    others = len(objects) - 1
    thinking = (f"There {'is' if others == 1 else 'are'} {_plural(others, 'other shape')} besides the {color} "
                f"{shape}, which is at the {_where(target['box'], *img.size)} of the image. On the 0-1000 scale "
                f"its left edge is at {box[0]}, its top at {box[1]}, its right edge at {box[2]} and its bottom "
                f"at {box[3]}.\n")
    parts = [f"{_a(o['color'] + ' ' + o['shape'])} at the {_where(o['box'], *img.size)}"
             for o in sorted(objects, key=lambda o: _reading_order(o["box"], img.height))]
    caption = f"A {bg} picture with {_join(parts)}."
    return {"image": img, "question": question, "caption": caption, "thinking": thinking, "answer": answer,
            "ground_truth": box, "difficulty_hint": len(objects)}


# ------------------------------------------------------------------------------ the easy level (demo)
# The thinking is one short sentence stating what the image shows (the count, the expression and its value, the
# text, where the shape is), then the answer: replies of 16-33 tokens, so that SFT, rollouts and the evaluation
# stay cheap; the caption (what pretraining teaches) stays in the example's ``caption``. The counting thinking
# names no shapes: the demo's model cannot see form (variants measured in glmv_jax/presets/demo/sft.yaml).
EASY_SIDE = 112        # easy images are drawn at 56..112 px, the size the demo shows them: nothing is shrunk
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def _easy_counting(rng: random.Random) -> dict:
    """1..3 large shapes of one colour (sometimes none) among 0..2 of other colours; the question names a colour."""
    color = rng.choice(sorted(COLORS))
    k = rng.choices(range(4), weights=(1, 3, 3, 3))[0]
    d = rng.randint(1 if k == 0 else 0, min(2, 4 - k))
    others = [c for c in sorted(COLORS) if c != color]
    kinds = [(color, rng.choice(SHAPES)) for _ in range(k)] + [(rng.choice(others), rng.choice(SHAPES))
                                                              for _ in range(d)]
    rng.shuffle(kinds)
    img, bg, objects = draw_objects(rng, kinds, big=True, max_side=EASY_SIDE)
    noun = f"{color} shapes"
    thinking = f"I count {k} {color} shape{'' if k == 1 else 's'}.\n"   # no shape names: see the level's note
    return {"image": img, "question": rng.choice((f"How many {noun} are there in the image?",
                                                  f"Count the {noun} in the picture.")),
            "caption": _scene_caption(bg, objects), "thinking": thinking, "answer": str(k), "ground_truth": k,
            "difficulty_hint": len(objects)}


def _easy_arithmetic(rng: random.Random) -> dict:
    """a + b or a - b (a >= b) with single digits, in large print; the answer is a whole number 0..18."""
    op = rng.choice("+-")
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if op == "-" and a < b:
        a, b = b, a
    value = _OPS[op](a, b)
    img, bg, ink = render_expression(rng, [a, b], [op], False, sizes=(24, 36), max_side=EASY_SIDE)
    return {"image": img, "question": "What is the value of the expression in the image?",
            "caption": f"The expression {a} {op} {b} written in {ink} on a {bg} background.",
            "thinking": f"{a} {op} {b} = {value}.\n", "answer": str(value),
            "ground_truth": value, "difficulty_hint": 2}


def _easy_ocr(rng: random.Random) -> dict:
    """One or two large capital letters."""
    text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 2)))
    mask = text_mask(text, rng.randint(28, 44))
    w, h = canvas_size(rng, mask.width + 8, mask.height + 8, EASY_SIDE)
    bg, ink = rng.choice(sorted(BACKGROUNDS)), rng.choice(sorted(INKS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    img.paste(INKS[ink], (rng.randint(4, w - mask.width - 4), rng.randint(4, h - mask.height - 4)), mask)
    return {"image": img, "question": "What text is written in the image?",
            "caption": f"The letters \"{text}\" in {ink} on a {bg} background.",
            "thinking": f"The text is \"{text}\".\n",
            "answer": text, "ground_truth": text, "difficulty_hint": len(text)}


def _easy_grounding(rng: random.Random) -> dict:
    """One large shape, alone or beside one of another colour."""
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    kinds = [(color, shape)] + [(rng.choice([c for c in sorted(COLORS) if c != color]), rng.choice(SHAPES))
                                for _ in range(rng.randint(0, 1))]
    img, bg, objects = draw_objects(rng, kinds, big=True, max_side=EASY_SIDE)
    box = normalize_box(objects[0]["box"], *img.size)
    return {"image": img, "question": f"Where is the {color} {shape}? Answer with its bounding box [x1,y1,x2,y2] on "
                                      "a 0-1000 scale.",
            "caption": _scene_caption(bg, objects),
            "thinking": f"The {color} {shape} is at the {_where(objects[0]['box'], *img.size)}.\n",
            "answer": "[" + ",".join(map(str, box)) + "]", "ground_truth": box, "difficulty_hint": len(objects)}


_FAMILIES = {"counting": _counting, "arithmetic": _arithmetic, "ocr": _ocr, "grounding": _grounding}
_EASY = {"counting": _easy_counting, "arithmetic": _easy_arithmetic, "ocr": _easy_ocr, "grounding": _easy_grounding}
LEVELS: tuple[str, ...] = ("standard", "easy")


# ------------------------------------------------------------------------------------------------- API
def make_example(domain: str, seed: int, level: str = "standard") -> dict:
    """One example of ``domain``, a pure function of ``(domain, seed, level)``. ``level`` "easy": the demo's
    level (images 56..112 px, large shapes and print: 0..3 shapes of a colour among at most 4 to count, a + b or
    a - b with single digits, one or two capital letters, one shape to ground beside at most one other).

    Keys: ``id``, ``domain``, ``image`` (RGB ``PIL.Image``), ``question``, ``caption``, ``thinking``,
    ``answer`` (the string in the box), ``target`` (``chat.format_answer(thinking, answer)``),
    ``ground_truth`` (int, ``"p/q"`` string, text, or ``[x1,y1,x2,y2]``) and ``difficulty_hint`` (int: number
    of shapes, digits or characters).
    """
    if domain not in _FAMILIES:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    ex = (_EASY if level == "easy" else _FAMILIES)[domain](_rng(domain, seed))
    name = f"{domain}-{int(seed)}" if level == "standard" else f"{domain}-{level}-{int(seed)}"
    return {"id": name, "domain": domain, "image": ex["image"], "question": ex["question"],
            "caption": ex["caption"], "thinking": ex["thinking"], "answer": ex["answer"],
            "target": format_answer(ex["thinking"], ex["answer"]), "ground_truth": ex["ground_truth"],
            "difficulty_hint": int(ex["difficulty_hint"])}


def example_at(index: int, seed: int = 0, domains: Sequence[str] = DOMAINS, level: str = "standard") -> dict:
    """Example ``index`` of ``generate(..., seed=seed, domains=domains, level=level)`` (domains round robin)."""
    return make_example(domains[index % len(domains)], example_seed(seed, index), level)


def generate(n: int, seed: int = 0, domains: Sequence[str] = DOMAINS, start: int = 0,
             level: str = "standard") -> Iterator[dict]:
    """Examples ``start .. start+n-1``: example ``i`` is ``make_example(domains[i % len(domains)],
    example_seed(seed, i))``, so each one depends only on ``(seed, i)`` and the domain list."""
    domains = tuple(domains)
    for d in domains:
        if d not in _FAMILIES:
            raise ValueError(f"unknown domain {d!r}; expected some of {DOMAINS}")
    for i in range(start, start + n):
        yield example_at(i, seed, domains, level)


def messages(example: dict, *, with_target: bool = True) -> list[dict]:
    """The example as a chat for :func:`glmv_jax.data.chat.render` / ``encode``: a user turn with the image
    and the question, then (``with_target``) the assistant's SFT reply."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example["question"]}]}]
    if with_target:
        msgs.append({"role": "assistant", "content": example["target"]})
    return msgs


def corpus(n: int = 2000, seed: int = 0, domains: Sequence[str] = DOMAINS) -> list[str]:
    """Texts for training a tokenizer: the question, caption and target of ``n`` generated examples."""
    out: list[str] = []
    for ex in generate(n, seed, domains):
        out += [ex["question"], ex["caption"], ex["target"]]
    return out


def build_tokenizer(path_prefix, n: int = 2000, vocab_size: int = 1024, seed: int = 0, **kwargs):
    """Train a sentencepiece tokenizer (all GLM-4.1V special tokens as user-defined symbols) on
    ``corpus(n, seed)`` and write ``{path_prefix}.model``; deterministic. Returns the ``Tokenizer``."""
    from glmv_jax.data.tokenizer import train_sentencepiece

    return train_sentencepiece(corpus(n, seed), path_prefix, vocab_size=vocab_size, **kwargs)


__all__ = ["CODE_CHARS", "DOMAINS", "EASY_SIDE", "LETTERS", "LEVELS", "NUMBER_WORDS", "WORDS", "build_tokenizer", "corpus", "example_at", "example_seed",
           "generate", "make_example", "messages"]
