"""Drawing for the synthetic tasks: canvas sizes, colours, Pillow's built-in font, operators, shapes and their
non-overlapping layout, and the rendering of a scene or an arithmetic expression.

Every function draws from the ``random.Random`` it is given, in a fixed order, so a synthetic example stays a
pure function of its seed. Images are RGB with sides in ``MIN_SIDE..MAX_SIDE`` px. Shapes are drawn without
anti-aliasing, so their pixels have exactly their colour in :data:`COLORS`. Text uses Pillow's built-in default
font (``ImageFont.load_default(size=...)``, a scalable FreeType font when Pillow has FreeType, else the bitmap
font scaled up); nothing is downloaded. That font has no ``×``/``÷``/``−`` glyphs, so operators are drawn as
lines and dots.
"""
from __future__ import annotations

import random
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont, features

MIN_SIDE, MAX_SIDE = 56, 448

# Shape colours (exact pixel values: shapes are drawn without anti-aliasing).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (228, 228, 228),
    "cream": (250, 243, 222),
    "pale blue": (222, 234, 248),
}
INKS: dict[str, tuple[int, int, int]] = {  # text colours
    "black": (20, 20, 20),
    "dark blue": (25, 40, 120),
    "dark red": (130, 20, 20),
    "dark green": (20, 85, 35),
}
GAP = 4  # minimum free pixels between the boxes of two shapes


def canvas_size(rng: random.Random, min_w: int = MIN_SIDE, min_h: int = MIN_SIDE,
                max_side: int = MAX_SIDE) -> tuple[int, int]:
    """A random (width, height) in ``max(min, MIN_SIDE)..max_side``."""
    lo_w, lo_h = min(max(min_w, MIN_SIDE), max_side), min(max(min_h, MIN_SIDE), max_side)
    return rng.randint(lo_w, max_side), rng.randint(lo_h, max_side)


# ------------------------------------------------------------------------------------------------ text
@lru_cache(maxsize=None)
def _freetype() -> bool:
    return bool(features.check("freetype2"))


@lru_cache(maxsize=64)
def _font(size: int):
    return ImageFont.load_default(size=size)


def _bitmap_font():
    load = getattr(ImageFont, "load_default_imagefont", None)
    return load() if load is not None else ImageFont.load_default()


def text_mask(text: str, size: int) -> Image.Image:
    """A tight ``L`` mask of ``text`` about ``size`` px high (FreeType), or the bitmap font scaled up."""
    if _freetype():
        font = _font(size)
        x0, y0, x1, y1 = font.getbbox(text)
        mask = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
        ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=font)
        return mask
    font = _bitmap_font()
    x0, y0, x1, y1 = font.getbbox(text)
    mask = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=font)
    scale = max(1, round(size / 11))
    return mask.resize((mask.width * scale, mask.height * scale), Image.NEAREST)


def _draw_operator(draw: ImageDraw.ImageDraw, op: str, x: int, cy: int, s: int, ink) -> None:
    """``+ - × ÷ =`` as lines and dots in an ``s``-wide cell starting at ``x``, centred on height ``cy``."""
    t = max(1, s // 6)
    h = s // 2
    cx = x + h
    if op in "+-":
        draw.line([(x, cy), (x + s, cy)], fill=ink, width=t)
        if op == "+":
            draw.line([(cx, cy - h), (cx, cy + h)], fill=ink, width=t)
    elif op == "×":
        d = int(h * 0.8)
        draw.line([(cx - d, cy - d), (cx + d, cy + d)], fill=ink, width=t)
        draw.line([(cx - d, cy + d), (cx + d, cy - d)], fill=ink, width=t)
    elif op == "÷":
        draw.line([(x, cy), (x + s, cy)], fill=ink, width=t)
        r = max(1, t)
        for dy in (-h + r, h - r):
            draw.ellipse([cx - r, cy + dy - r, cx + r, cy + dy + r], fill=ink)
    elif op == "=":
        for dy in (-max(2, s // 5), max(2, s // 5)):
            draw.line([(x, cy + dy), (x + s, cy + dy)], fill=ink, width=t)
    else:
        raise ValueError(f"unknown operator {op!r}")


# ----------------------------------------------------------------------------------------------- shapes
def _shape_points(shape: str, x: int, y: int, s: int):
    x1, y1 = x + s - 1, y + s - 1
    if shape == "triangle":
        return [(x + (s - 1) / 2, y), (x1, y1), (x, y1)]
    if shape == "diamond":
        return [(x + (s - 1) / 2, y), (x1, y + (s - 1) / 2), (x + (s - 1) / 2, y1), (x, y + (s - 1) / 2)]
    return [x, y, x1, y1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, s: int, fill) -> None:
    pts = _shape_points(shape, x, y, s)
    if shape == "circle":
        draw.ellipse(pts, fill=fill)
    elif shape == "square":
        draw.rectangle(pts, fill=fill)
    elif shape in ("triangle", "diamond"):
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _pixel_box(shape: str, x: int, y: int, s: int) -> tuple[int, int, int, int]:
    """Tight box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of the pixels ``_draw_shape`` paints."""
    mask = Image.new("1", (x + s + 2, y + s + 2), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, x, y, s, 1)
    return mask.getbbox()


def _layout(rng: random.Random, n: int, w: int, h: int, big: bool = False,
            max_side: int = MAX_SIDE) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Positions ``(x, y, size)`` of ``n`` non-overlapping shapes (``GAP`` px apart); shrinks the shapes, then
    grows the canvas (up to ``max_side``), until they fit. ``big``: sides 1/4..1/2 of the canvas's short side
    (else 1/16..1/4, at most 64 px)."""
    if big:
        smin, smax = max(14, min(w, h) // 4), max(14, min(w, h) // 2)
    else:
        smin = max(10, min(w, h) // 16)
        smax = max(smin, min(64, min(w, h) // 4))
    while True:
        sizes = [rng.randint(smin, smax) for _ in range(n)]
        placed: list[tuple[int, int, int]] = []
        for s in sizes:
            for _ in range(60):
                x, y = rng.randint(1, max(1, w - s - 1)), rng.randint(1, max(1, h - s - 1))
                if x + s < w and y + s < h and all(
                        x + s + GAP <= px or px + ps + GAP <= x or y + s + GAP <= py or py + ps + GAP <= y
                        for px, py, ps in placed):
                    placed.append((x, y, s))
                    break
            else:
                break
        if len(placed) == n:
            return w, h, placed
        if smax > smin:
            smax = max(smin, int(smax * 0.8))
        elif smin > 10:
            smin = smax = max(10, int(smin * 0.8))
        else:
            w, h = min(max_side, w + 28), min(max_side, h + 28)


def draw_objects(rng: random.Random, kinds: list[tuple[str, str]], big: bool = False, max_side: int = MAX_SIDE):
    """Draw ``kinds`` (colour, shape) on a fresh canvas (sides up to ``max_side``; ``big`` shapes: see
    ``_layout``); returns image, background name and the objects as dicts with their tight pixel boxes."""
    w, h = canvas_size(rng, max_side=max_side)
    w, h, places = _layout(rng, len(kinds), w, h, big, max_side)
    bg = rng.choice(sorted(BACKGROUNDS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    objects = []
    for (color, shape), (x, y, s) in zip(kinds, places):
        _draw_shape(draw, shape, x, y, s, COLORS[color])
        objects.append({"color": color, "shape": shape, "box": _pixel_box(shape, x, y, s)})
    return img, bg, objects


def normalize_box(box: tuple[int, int, int, int], w: int, h: int) -> list[int]:
    """Pixel box (x1, y1 exclusive) -> ``[x1, y1, x2, y2]`` on the 0..1000 scale, covering the pixels."""
    x0, y0, x1, y1 = box
    return [max(0, (x0 * 1000) // w), max(0, (y0 * 1000) // h),
            min(1000, -((-x1 * 1000) // w)), min(1000, -((-y1 * 1000) // h))]


def render_expression(rng: random.Random, nums: list[int], ops: list[str], ask: bool,
                      sizes: tuple[int, int] = (14, 44), max_side: int = MAX_SIDE):
    """``nums`` joined by ``ops`` (then ``= ?`` when ``ask``) on a fresh canvas (text ``sizes`` px, sides up to
    ``max_side``); returns image, background, ink."""
    size = rng.randint(*sizes)
    tokens: list[tuple[str, str]] = [("num", str(nums[0]))]
    for o, n in zip(ops, nums[1:]):
        tokens += [("op", o), ("num", str(n))]
    if ask:
        tokens += [("op", "="), ("num", "?")]
    while True:
        masks = [text_mask(t, size) if kind == "num" else None for kind, t in tokens]
        digit_h = text_mask("0", size).height
        opw = max(6, int(size * 0.55))
        gap = max(3, size // 4)
        width = sum(m.width if m is not None else opw for m in masks) + gap * (len(tokens) - 1)
        height = max(m.height for m in masks if m is not None)
        if width + 8 <= max_side or size <= 10:
            break
        size -= 4
    w, h = canvas_size(rng, width + 8, height + 8, max_side)
    bg, ink = rng.choice(sorted(BACKGROUNDS)), rng.choice(sorted(INKS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    x = rng.randint(4, w - width - 4)
    base = rng.randint(4 + height, h - 4)  # baseline (bottom of the digits)
    for (_, token), m in zip(tokens, masks):
        if m is None:
            _draw_operator(draw, token, x, base - digit_h // 2, opw, INKS[ink])
            x += opw + gap
        else:
            img.paste(INKS[ink], (x, base - m.height), m)
            x += m.width + gap
    return img, bg, ink


__all__ = ["BACKGROUNDS", "COLORS", "GAP", "INKS", "MAX_SIDE", "MIN_SIDE", "SHAPES", "canvas_size", "draw_objects",
           "normalize_box", "render_expression", "text_mask"]
