"""Word error rate of a hypothesis against a reference (case and punctuation ignored)."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9']+")


def normalize_words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("-", " "))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by Levenshtein alignment over words.
    An empty reference gives 0.0 for an empty hypothesis and 1.0 otherwise."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))  # distances for the empty reference prefix
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


def wer_fn():
    """The audio engineer's `audio.wer.word_error_rate` when present (one definition project-wide), else ours."""
    try:
        from audio.wer import word_error_rate as shared
    except ImportError:
        return word_error_rate
    return shared
