"""voicefast.asr_context: the conversation as Whisper's prompt (pure text)."""

from __future__ import annotations

from voicefast.asr_context import MAX_LAST_TURN_CHARS, asr_prompt, names
from voicefast.persona import DEFAULT_INSTRUCTIONS


def test_names_are_the_proper_names_of_the_instructions():
    assert names(DEFAULT_INSTRUCTIONS) == "Maple Street Outfitters, Main Street, Springfield, Monday, Saturday, Sunday"
    # a sentence's capitalised first word is no name; a capitalised run after a common first word is
    assert names("Reply briefly. The Grand Hotel is in New York. Shipping is free.") == "Grand Hotel, New York"
    assert names("") == ""


def test_prompt_order_and_bounds():
    p = asr_prompt(instructions="You work at Acme Corp.", last_assistant="How can I help?",
                   client_prompt="Order numbers have five digits.")
    assert p == "Order numbers have five digits. Acme Corp. How can I help?"  # the last reply weighs most: last
    long = " ".join(f"word{i}" for i in range(200))
    tail = asr_prompt(last_assistant=long)
    assert len(tail) <= MAX_LAST_TURN_CHARS and long.endswith(tail) and tail.startswith("word")
    assert asr_prompt() == ""
