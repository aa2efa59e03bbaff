"""The language-mix and repetition gates [code ``LanguageMixVerifier`` and ``detect_repeat``]: a response that
trips either gets the minimum reward (see the package docstring)."""
from __future__ import annotations

import re

REPEAT_WINDOW, REPEAT_MIN = 50, 10          # [code] detect_repeat defaults
MIX_MIN_CHINESE, MIX_MIN_ENGLISH = 50, 200  # [code] detect_long_paragraph_mixing defaults


_ZH_RE = re.compile(r"[\u4e00-\u9fff]")
_EN_WORD_RE = re.compile(r"\b[a-zA-Z]{2,}\b")
_PARAGRAPH_RE = re.compile(r"\n{2,}")
_TABLE_RULE_RE = re.compile(r"\|[-]+\|")
_FORMAT_RUNS_RE = [re.compile(re.escape(ch) + "{3,}") for ch in ("=", "|", "-", "~", "_", "#", "*", ".", "%",
                                                                  "－", "█", " ", "─")]


def has_language_mix(text: str, min_chinese_chars: int = MIX_MIN_CHINESE,
                     min_english_words: int = MIX_MIN_ENGLISH) -> bool:
    """[code ``detect_long_paragraph_mixing``] True iff ``text`` has both a long Chinese paragraph (>=
    ``min_chinese_chars`` characters in U+4E00..U+9FFF, > 80% of the paragraph's characters) and a long
    English one (>= ``min_english_words`` words of >= 2 ASCII letters, > 70% of its whitespace tokens);
    paragraphs are separated by blank lines."""
    zh = en = False
    for para in _PARAGRAPH_RE.split(text):
        para = para.strip()
        if not para:
            continue
        n_zh = sum(1 for _ in _ZH_RE.finditer(para))
        if n_zh >= min_chinese_chars and n_zh / len(para) > 0.8:
            zh = True
        n_en = sum(1 for _ in _EN_WORD_RE.finditer(para))
        if n_en >= min_english_words and n_en / (len(para.split()) + 1e-5) > 0.7:
            en = True
        if zh and en:
            return True
    return False


def has_repetition(text: str, window: int = REPEAT_WINDOW, min_repetition: int = REPEAT_MIN) -> bool:
    """[code ``detect_repeat``] True iff some ``window``-character substring occurs at least
    ``min_repetition`` times (overlaps count), after table rules and runs of >= 3 formatting characters
    (``= | - ~ _ # * . % － █ ─`` and spaces) are removed."""
    text = _TABLE_RULE_RE.sub("|", text)
    for pat in _FORMAT_RUNS_RE:
        text = pat.sub("", text)
    n = len(text)
    if n < window + min_repetition - 1:
        return False
    times: dict[int, int] = {}
    for i in range(window, n + 1):
        h = hash(text[i - window:i])
        c = times.get(h, 0) + 1
        if c >= min_repetition:
            return True
        times[h] = c
    return False
