"""The conversation as Whisper's prompt: what the ASR should expect to hear next (pure text, no I/O).

Whisper reads a prompt as the text that came just before the audio: names it has seen there it spells the same
way, and the last thing the assistant said makes the caller's answer more predictable. The prompt is

    <the client's own input_audio_transcription.prompt> <names from the instructions>. <the last assistant turn>

kept short (about 60 tokens): a prompt costs a decoder step per token on every final, and the end of it weighs
most. `bench/voice/wer.py` measures the WER with and without it (docs/benchmarks.md)."""

from __future__ import annotations

import re

MAX_CLIENT_CHARS = 300
MAX_NAMES_CHARS = 120
MAX_LAST_TURN_CHARS = 160
_SENTENCE = re.compile(r"(?<=[.!?:;\n])\s+")
_NAME_RUN = re.compile(r"\b(?:[A-Z][\w'&-]*)(?:\s+(?:[A-Z][\w'&-]*|of|and|&))*")
_COMMON = frozenset({"I", "The", "A", "An", "You", "We", "It", "Our", "Your", "Reply", "Customers", "Shipping",
                     "Delivery", "This", "That", "If", "When", "Please", "Yes", "No", "Do", "Don't", "Be", "Keep"})


def names(instructions: str, max_chars: int = MAX_NAMES_CHARS) -> str:
    """Proper names in the instructions (runs of capitalised words, each once, in order): "Maple Street
    Outfitters, Main Street, Springfield, Monday, Saturday, ...". A sentence's first word counts only when a
    capitalised word follows it ("Maple Street" yes, "Shipping is free" no)."""
    out: list[str] = []
    for sentence in _SENTENCE.split(instructions):
        for m in _NAME_RUN.finditer(sentence):
            words = m.group(0).split()
            while words and words[-1] in ("of", "and", "&"):
                words.pop()
            if not sentence[:m.start()].strip() and (len(words) < 2 or words[0] in _COMMON):
                words = words[1:]  # a sentence's capitalised first word is no evidence of a name
            name = " ".join(words)
            if name and name not in _COMMON and name not in out:
                out.append(name)
    text = ""
    for n in out:
        if len(text) + len(n) + 2 > max_chars:
            break
        text = f"{text}, {n}" if text else n
    return text


def _tail(text: str, max_chars: int) -> str:
    """The end of `text`, cut at a word boundary."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:]
    return cut[cut.find(" ") + 1:] if " " in cut else cut


def asr_prompt(*, instructions: str = "", last_assistant: str = "", client_prompt: str = "") -> str:
    """The prompt for the next user turn's transcription ("" when there is no context at all)."""
    parts = [_tail(client_prompt, MAX_CLIENT_CHARS)]
    vocab = names(instructions)
    parts.append(vocab + "." if vocab else "")
    parts.append(_tail(last_assistant, MAX_LAST_TURN_CHARS))
    return " ".join(p for p in parts if p)
