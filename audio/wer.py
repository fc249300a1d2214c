"""Word error rate with a normalizer for spoken customer-service text: case, punctuation, and the usual ways
Whisper writes numbers ("$29", "9", "45721", "john@example.com") are mapped to the words a person says."""

from __future__ import annotations

import re

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> list[str]:
    """Cardinal number in words, 0 <= n < 10**9 ("one hundred twenty three": no "and")."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = number_words(n % size) if n % size else []
            return number_words(n // size) + [name] + rest
    raise AssertionError(n)


def _spell_number(tok: str) -> list[str]:
    digits = tok.replace(",", "")
    if len(digits) >= 5 or (len(digits) > 1 and digits[0] == "0") or len(digits) > 9:
        return [_ONES[int(d)] for d in digits]  # order numbers, phone numbers: digit by digit
    return number_words(int(digits))


def normalize_words(text: str) -> list[str]:
    t = text.lower()
    t = re.sub(r"(\w)@(\w)", r"\1 at \2", t)
    t = re.sub(r"(\w)\.(com|org|net|edu|io)\b", r"\1 dot \2", t)
    t = re.sub(r"\$(\d[\d,]*)(?:\.(\d\d))?", lambda m: m.group(1) + " dollars"
               + (f" {int(m.group(2))} cents" if m.group(2) and int(m.group(2)) else ""), t)
    t = re.sub(r"(\d+)%", r"\1 percent", t)
    t = re.sub(r"\b(\d{1,2}):00\b", r"\1", t)
    t = re.sub(r"\b(\d{1,2}):(\d\d)\b", r"\1 \2", t)
    t = re.sub(r"\b(\d+)(st|nd|rd|th)\b", r"\1", t)
    t = t.replace("-", " ")
    t = re.sub(r"[^\w\s']", " ", t)
    words: list[str] = []
    for w in t.split():
        w = w.strip("'")
        if not w:
            continue
        words += _spell_number(w) if re.fullmatch(r"\d[\d,]*", w) else [w]
    return words


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(ref: str | list[str], hyp: str | list[str]) -> float:
    """(substitutions + deletions + insertions) / reference words, after normalize_words.

    Pass lists of strings to get the corpus WER (total errors / total reference words)."""
    refs = [ref] if isinstance(ref, str) else list(ref)
    hyps = [hyp] if isinstance(hyp, str) else list(hyp)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = total = 0
    for r, h in zip(refs, hyps, strict=True):
        rw, hw = normalize_words(r), normalize_words(h)
        errors += edit_distance(rw, hw)
        total += len(rw)
    if total == 0:
        return 0.0 if errors == 0 else 1.0  # nothing was said but something was heard
    return errors / total
