import random

import pytest

from audio.text_chunker import TextChunker, break_kind, is_abbreviation

TEXT = ("Sure, I can help with that. Mr. Smith paid $29.99 on 3.50 at 9:30 a.m. yesterday, e.g. for the premium "
        "plan. Email john@example.com or visit www.example.com/orders?id=45721 for details, and we will get back "
        "to you within 2 business days, as promised in our policy! The total was 1,299.00 dollars (about "
        "1.5 times more). Dr. J. Watson said: call 555-0134 at 10:45 p.m. Thanks!")
PROTECTED = ["$29.99", "3.50", "9:30", "a.m.", "john@example.com", "www.example.com/orders?id=45721", "1,299.00",
             "1.5", "555-0134", "10:45", "p.m.", "Mr. Smith", "e.g. for", "Dr. J. Watson"]


def chunk(text, splits, **kw):
    c = TextChunker(**kw)
    out = []
    for piece in splits:
        out += c.push(piece)
    return out + c.flush()


def random_splits(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(60, len(text) - 1))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=True)]


def test_same_phrases_for_any_token_split():
    whole = chunk(TEXT, [TEXT])
    rng = random.Random(7)
    for _ in range(300):
        assert chunk(TEXT, random_splits(TEXT, rng)) == whole
    assert chunk(TEXT, list(TEXT)) == whole  # one character at a time


def test_phrases_cover_the_text_and_never_split_protected_tokens():
    rng = random.Random(3)
    for _ in range(100):
        phrases = chunk(TEXT, random_splits(TEXT, rng))
        assert " ".join(phrases).split() == TEXT.split()  # nothing lost, nothing split mid-token
        for tok in PROTECTED:
            assert any(tok in p for p in phrases), (tok, phrases)


def test_first_fragment_is_short_then_sentence_sized():
    phrases = chunk(TEXT, [TEXT])
    assert phrases[0] == "Sure, I can help with that."
    assert len(phrases[0].split()) <= 6
    assert phrases[1] == "Mr. Smith paid $29.99 on 3.50 at 9:30 a.m. yesterday,"
    # no phrase ends on an abbreviation
    assert not any(is_abbreviation(p.split()[-1]) for p in phrases)


def test_first_fragment_without_punctuation_breaks_after_a_few_words():
    text = "Our store is open from nine in the morning until six in the evening on weekdays and on weekends too"
    phrases = chunk(text, [text + " "])
    assert 4 <= len(phrases[0].split()) <= 8
    assert phrases[0] == "Our store is open from nine"


def test_first_clause_break_needs_min_chars():
    assert chunk("Yes, of course. We can do that. ", ["Yes, of course. We can do that. "]) == \
        ["Yes, of course.", "We can do that."]
    assert chunk("Okay, sure, let me check. ", ["Okay, sure, let me check. "], first_min_chars=5)[0] == "Okay,"


def test_long_phrase_is_forced_at_word_boundary_not_on_a_function_word():
    words = " ".join(f"word{i}" for i in range(28)) + " of the thing and more words here "
    phrases = chunk("Hi there. " + words, ["Hi there. " + words], max_words=30)
    assert phrases[0] == "Hi there."
    assert phrases[1].split()[-1] not in {"of", "the", "and"}
    assert len(phrases[1].split()) <= 34


def test_paragraph_break_and_flush():
    c = TextChunker()
    assert c.push("Hello there friend\n\nNext") == ["Hello there friend"]
    assert c.flush() == ["Next"]
    assert c.flush() == []


def test_phrase_offsets_point_into_the_full_text():
    c = TextChunker()
    phrases = []
    for piece in random_splits(TEXT, random.Random(1)):
        phrases += c.push_phrases(piece)
    phrases += c.flush_phrases()
    for p in phrases:
        assert TEXT[p.start:p.end] == p.text
    assert [p.start for p in phrases] == sorted(p.start for p in phrases)
    assert phrases[-1].end == len(TEXT)


def test_break_kinds():
    assert break_kind("that.") == "sentence" and break_kind('"really?"') == "sentence"
    assert break_kind("a.m.") is None and break_kind("Mr.") is None and break_kind("J.") is None
    assert break_kind("yesterday,") == "clause" and break_kind("\u2014") == "clause"
    assert break_kind("$29.99") is None and break_kind("9:30") is None


def test_bad_input():
    with pytest.raises(TypeError):
        TextChunker().push(b"bytes")
    with pytest.raises(ValueError):
        TextChunker(max_words=0)


def test_numbers_with_sentence_punctuation_inside_many_random_texts():
    rng = random.Random(11)
    vocab = ["price", "is", "$4.99", "at", "9:15", "call", "me", "a.m.", "ok,", "see", "www.shop.com/a.b", "x@y.org",
             "3.14159", "done.", "great!", "e.g.", "1,000,000", "Mr.", "Lee"]
    for _ in range(200):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 60)))
        phrases = chunk(text, random_splits(text, rng))
        assert " ".join(phrases).split() == text.split()
        for p in phrases:  # every token of every phrase is a whole vocabulary token
            assert all(w in vocab for w in p.split()), p
