"""A synthetic byte-level BPE tokenizer of any vocabulary size, built with `tokenizers` (deterministic per seed).

No GLM-4 tokenizer is available offline, so the GLM-4-9B-shape benchmarks use one of GLM-4's size (151,552
tokens): the 256 byte symbols, then merges that grow English-like words (syllables, with and without the leading
space) plus JSON / number / punctuation pieces from left to right (each merge joins an existing token and one
more symbol, as real BPE vocabularies are prefix-closed), then a few special tokens. Its token-length and
prefix structure resemble a real vocabulary, which is what a grammar mask's cost depends on."""

from __future__ import annotations

import random

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z", "bl",
           "br", "ch", "cl", "cr", "dr", "fl", "fr", "gr", "pl", "pr", "sc", "sh", "sl", "sm", "sn", "sp", "st", "str",
           "th", "tr", "wh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oa", "oo", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rt", "st", "ck", "ll", "ss", "th", "ed", "er"]
_PIECES = ['{"', '":', '",', ' "', '"}', '}}', '}]', '[{', '": "', '", "', '": ', ', "', '":"', '","', '"]', '["',
           "\n", "\n\n", "  ", "    ", "true", "false", "null", ".", ",", "!", "?", ":", ";", "-", "_", "(", ")"]
SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _words(rng: random.Random):
    """An endless stream of word-like strings: numbers, JSON pieces, then syllable words (1-4 syllables)."""
    yield from (str(i) for i in range(1000))
    yield from _PIECES
    while True:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.15:
            w = w.capitalize()
        yield (" " + w) if rng.random() < 0.6 else w


def build_byte_bpe(vocab_size: int = 151_552, seed: int = 0, specials: tuple[str, ...] = SPECIALS):
    """A `tokenizers.Tokenizer` with exactly `vocab_size` tokens (the last len(specials) are special tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    vocab: dict[str, int] = {b2u[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    target = vocab_size - len(specials)
    if target < 256:
        raise ValueError(f"vocab_size must be >= {256 + len(specials)}, got {vocab_size}")
    rng = random.Random(seed)
    for word in _words(rng):
        if len(vocab) >= target:
            break
        syms = [b2u[b] for b in word.encode()]
        cur = syms[0]
        for s in syms[1:]:
            nxt = cur + s
            if nxt not in vocab:
                merges.append((cur, s))
                vocab[nxt] = len(vocab)
                if len(vocab) >= target:
                    break
            cur = nxt
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tk.get_vocab_size(with_added_tokens=True) == vocab_size
    return tk
