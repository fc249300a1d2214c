"""The transcript as the second witness of an end of turn (pure text rules, no model).

An audio end-of-turn model hears prosody, not grammar: a phrase cut off with a falling pitch ("I'd like to book a
table for") sounds finished. The words say otherwise. `unfinished(text)` names why a transcript cannot be a whole
turn yet, or returns None:

  trailing preposition   "... a table for", "... talk to", "... the status of"   (not the particle of a phrasal
                         verb that ends a sentence: "hold on", "come in", "log in")
  trailing article       "... I would like to order a", "... change the"
  trailing conjunction   "... Saturday and", "... but", "... because"
  trailing possessive    "... my", "... your", "... our"
  digits one by one      "... four five", "... 4 5" (a number being read out; the next group usually follows), or
                         an identifier cut short: "phone number is 555", "my zip code is 12" (< 5 digits)
  a copula left open     "my name is", "boots that are" (not after a pronoun: "yes it is", "here you are")
  trailing hesitation    "... um", "... uh", or the transcript trails off ("...", a dash)

Deliberately left out, because a whole turn often ends with them: "so", "that", "though", "her", "like", a number
said as one quantity ("a table for four"), and a question mark does not overrule the rules ("Can I get a table
for?" is still unfinished).

Whisper's own completions: given a phrase cut off at a function word, Whisper tiny.en often writes a word nobody
said — a filler ("a table for" -> "a table for it.") or a homophone ("calling about my" -> "about mine.", "take
to" -> "take two") — with a low probability. When the ASR says it was unsure of the last word, a filler is
dropped and a homophone read as its function-word twin before the rules judge the text."""

from __future__ import annotations

import re

PREPOSITIONS = frozenset({
    "about", "across", "after", "against", "among", "at", "before", "between", "by", "during", "for", "from", "in",
    "into", "of", "on", "onto", "per", "than", "through", "till", "to", "toward", "towards", "until", "upon", "via",
    "with", "within", "without"})
# "<verb> in/on" ends many whole sentences: the particle of a phrasal verb, not a preposition waiting for its object.
PHRASAL_PARTICLE_VERBS = frozenset({
    "hold", "come", "go", "carry", "log", "logged", "sign", "signed", "check", "checked", "turn", "switch", "plug",
    "move", "get", "keep", "hang", "drop", "stop", "walk", "call", "fill", "break", "count", "put", "jump", "dive"})
ARTICLES = frozenset({"a", "an", "the"})
CONJUNCTIONS = frozenset({"and", "or", "but", "nor", "because", "cause", "if", "unless", "although", "whereas",
                          "whether", "while", "plus"})
POSSESSIVES = frozenset({"my", "your", "our", "their", "its", "whose"})
HESITATIONS = frozenset({"um", "umm", "uh", "uhh", "er", "erm", "ah"})
COPULAS = frozenset({"is", "are", "was", "were", "be", "been"})
COPULA_SUBJECT_PRONOUNS = frozenset({"i", "you", "he", "she", "it", "we", "they", "there", "here", "one"})
IDENTIFIERS = frozenset({"number", "code", "zip", "postcode", "phone", "pin", "account", "order", "card", "reference",
                         "confirmation", "id", "extension"})
# Whisper's completions of a cut-off phrase, when it was unsure of them: fillers it adds, homophones it picks.
FILLERS = frozenset({"it", "that", "this", "them", "one", "there", "those", "these", "him", "me", "you", "us"})
HOMOPHONES = {"two": "to", "too": "to", "four": "for", "mine": "my", "yours": "your", "ours": "our",
              "theirs": "their", "an": "and"}
DIGITS = frozenset({"zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"})

# Below this the ASR's last word may be its own completion of a cut-off phrase (Whisper tiny.en on Piper phrases
# cut at a function word: 0.29-0.62 for the invented word; complete sentences' last words 0.51-0.98, so a doubtful
# word after a function word waits, a doubtful word after a content word does not: bench/turns.py measures it).
DOUBTFUL_LAST_WORD_P = 0.75
_WORD = re.compile(r"[a-z0-9']+")
_TRAILING_OFF = ("...", "\u2026", "-", "\u2013", "\u2014")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _is_digit_token(w: str) -> bool:
    return w in DIGITS or (len(w) == 1 and w.isdigit())


def unfinished(text: str, last_word_probability: float | None = None) -> str | None:
    """Why `text` (a transcript up to a pause) cannot be a finished turn, or None if nothing says so.

    `last_word_probability`: how sure the ASR was of the last word. Whisper completes a phrase cut off at a
    function word with a word nobody said ("a table for" -> "a table for it.", "calling about my" -> "calling
    about mine."), with a low probability; below DOUBTFUL_LAST_WORD_P the rules also judge the text without it."""
    stripped = text.strip()
    words = _words(stripped)
    if not words:
        return None  # nothing was said: the words cannot testify
    if stripped.endswith(_TRAILING_OFF):
        return "trails off"
    why = _why(words)
    last = words[-1]
    if why is None and last_word_probability is not None and last_word_probability < DOUBTFUL_LAST_WORD_P \
            and len(words) > 1 and (last in FILLERS or last in HOMOPHONES):
        guess = words[:-1] + ([HOMOPHONES[last]] if last in HOMOPHONES else [])
        before = _why(guess)
        if before is not None and not before.startswith("a number"):
            return f"{before} (Whisper's doubtful {last!r}, p={last_word_probability:.2f})"
    return why


def _why(words: list[str]) -> str | None:
    last = words[-1]
    prev = words[-2] if len(words) > 1 else ""
    if last in HESITATIONS:
        return f"trailing hesitation {last!r}"
    if last in ARTICLES:
        return f"trailing article {last!r}"
    if last in CONJUNCTIONS:
        return f"trailing conjunction {last!r}"
    if last in POSSESSIVES:
        return f"trailing possessive {last!r}"
    if last in PREPOSITIONS and not (last in ("in", "on") and prev in PHRASAL_PARTICLE_VERBS):
        return f"trailing preposition {last!r}"
    if _is_digit_token(last) and _is_digit_token(prev):
        return "a number read digit by digit"
    if last.isdigit() and len(last) < 5 and any(w in IDENTIFIERS for w in words[-4:-1]):
        return f"an identifier cut short ({len(last)} digits)"
    if last in COPULAS and prev not in COPULA_SUBJECT_PRONOUNS and len(words) > 1:
        return f"a copula left open {last!r}"
    return None


BACKCHANNELS = frozenset({
    "mm", "mmm", "mhm", "mmhm", "mmhmm", "mm-hm", "mm-hmm", "hm", "hmm", "uh-huh", "uh", "huh", "uhhuh", "ah", "oh",
    "okay", "ok", "kay", "yeah", "yes", "yep", "yup", "right", "sure", "alright", "all", "i", "see", "got", "it",
    "cool", "great", "nice", "good", "fine", "wow", "thanks", "aha"})


def is_backchannel(text: str) -> bool:
    """A listener's acknowledgement ("mm-hm", "okay", "yeah, right", "I see") rather than a turn of its own: at most
    three words, each one of BACKCHANNELS. An empty transcript counts (nothing was understood)."""
    words = re.findall(r"[a-z'-]+", text.lower().replace("\u2019", "'"))
    words = [w.strip("-'") for w in words if w.strip("-'")]
    return len(words) <= 3 and all(w in BACKCHANNELS for w in words)
