"""Incremental text chunker: LLM token deltas in, speakable phrases out (pure Python, no I/O).

Phrases end only at whitespace, so a number (3.50), time (9:30), price ($29.99), email (john@example.com) or
URL (www.example.com/x) is never split mid-token; a break after an abbreviation (Mr., e.g., a.m.) is not a
sentence end. The first phrase is short so speech starts early (the first clause break once it has
`first_min_chars`, or after `first_max_words` words); later phrases end at sentences, at clause breaks once
they have `clause_min_chars`, or after `max_words`. Each break depends only on the text up to it, so the
phrases are the same however the text is split into deltas."""

from __future__ import annotations

import re
from dataclasses import dataclass

ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "a.m", "p.m",
    "inc", "ltd", "corp", "approx", "dept", "ave", "blvd", "rd", "apt",
    "fig", "mt", "ft", "oz", "lb", "lbs", "sq", "hr", "hrs", "u.s", "u.k", "p.s", "jan", "feb",
    "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "mon", "tue", "wed", "thu", "fri"})
_CLOSERS = "\"')]}\u201d\u2019\u00bb"
_SENTENCE_END = (".", "!", "?", "\u2026")
_CLAUSE_END = (",", ";", ":")
_DASHES = {"-", "--", "\u2013", "\u2014"}
# Forced (word-count) breaks avoid leaving these dangling at the end of a phrase.
_FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "to", "at", "in", "on", "for", "and", "or", "but", "with", "my",
    "your", "our", "their", "his", "her", "its", "is", "are", "was", "be", "by", "from", "as", "that", "this"})
_TOKEN = re.compile(r"\S+(?=\s)")  # tokens whose end is known (whitespace has arrived after them)


@dataclass(frozen=True, slots=True)
class Phrase:
    text: str  # stripped phrase
    start: int  # character offset of text[0] in the full text
    end: int  # character offset just past the phrase in the full text


def is_abbreviation(token: str) -> bool:
    core = token.rstrip(_CLOSERS).lstrip("\"'([{\u201c\u2018").lower()
    if not core.endswith("."):
        return False
    body = core[:-1]
    if body in ABBREVIATIONS:
        return True
    return len(body) == 1 and body.isalpha()  # an initial: "J. Smith"


def break_kind(token: str) -> str | None:
    """'sentence', 'clause' or None for the token just before a whitespace."""
    if token in _DASHES:
        return "clause"
    core = token.rstrip(_CLOSERS)
    if core.endswith(_SENTENCE_END) and not is_abbreviation(token):
        return "sentence"
    if core.endswith(_CLAUSE_END) or core.endswith(("\u2014", "\u2013")):
        return "clause"
    return None


class TextChunker:
    def __init__(self, *, first_min_chars: int = 8, first_max_words: int = 6, clause_min_chars: int = 50,
                 max_words: int = 30):
        if min(first_min_chars, first_max_words, clause_min_chars, max_words) < 1:
            raise ValueError("TextChunker limits must be >= 1")
        self.first_min_chars = first_min_chars
        self.first_max_words = first_max_words
        self.clause_min_chars = clause_min_chars
        self.max_words = max_words
        self._text = ""  # the full text so far
        self._pos = 0  # offset where the pending (unemitted) text starts
        self.phrases_emitted = 0

    @property
    def text(self) -> str:
        return self._text

    def push(self, delta: str) -> list[str]:
        return [p.text for p in self.push_phrases(delta)]

    def flush(self) -> list[str]:
        return [p.text for p in self.flush_phrases()]

    def push_phrases(self, delta: str) -> list[Phrase]:
        if not isinstance(delta, str):
            raise TypeError(f"TextChunker.push expects str, got {type(delta).__name__}")
        self._text += delta
        out = []
        while (p := self._next_phrase()) is not None:
            out.append(p)
        return out

    def flush_phrases(self) -> list[Phrase]:
        """Everything still pending, as one last phrase (if it has any non-space text)."""
        pending = self._text[self._pos:]
        out = []
        if pending.strip():
            out.append(self._make(len(self._text)))
        self._pos = len(self._text)
        return out

    def _make(self, end: int) -> Phrase:
        raw = self._text[self._pos:end]
        lead = len(raw) - len(raw.lstrip())
        text = raw.strip()
        phrase = Phrase(text, self._pos + lead, self._pos + lead + len(text))
        self._pos = end
        self.phrases_emitted += 1
        return phrase

    def _next_phrase(self) -> Phrase | None:
        pending = self._text[self._pos:]
        first = self.phrases_emitted == 0
        max_words = self.first_max_words if first else self.max_words
        for words, m in enumerate(_TOKEN.finditer(pending), 1):
            tok = m.group()
            kind = break_kind(tok)
            n_chars = len(pending[:m.end()].strip())
            if pending.startswith("\n\n", m.end()):
                return self._make(self._pos + m.end())  # paragraph break
            if first:
                if kind is not None and n_chars >= self.first_min_chars:
                    return self._make(self._pos + m.end())
            elif kind == "sentence" or (kind == "clause" and n_chars >= self.clause_min_chars):
                return self._make(self._pos + m.end())
            if words >= max_words:
                dangling = tok.lower() in _FUNCTION_WORDS or is_abbreviation(tok) or tok[-1:].isdigit()
                if not dangling or words >= max_words + 4:
                    return self._make(self._pos + m.end())
        return None
