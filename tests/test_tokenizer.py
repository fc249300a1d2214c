"""Tokenizer built from the embedded SmolLM2 GGUF's metadata (byte-level BPE), the same tokenizer from an HF-style
directory, the chat template, end-of-sequence ids, and the incremental detokenizer's UTF-8 safety."""

from __future__ import annotations

import json

import pytest

from llm_engine.chat_template import ChatTemplate, ChatTemplateError
from llm_engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The store opens at 8:30 am, closes at 21:00.",
    "  leading spaces, double  spaces,\ttabs\nand\n\nnewlines  ",
    "Prices: $12,345.67 (-3%) & 1e-5; email: a.b@c.io #tag {json: [1, 2]}",
    "café naïve Zürich — “quotes” 日本語のテキスト 👍🏽 emoji",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from voicefast.assets import resolve_llm

    return Tokenizer.from_path(resolve_llm().path)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_bpe_round_trips(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_gguf_bpe_known_tokenization(tok):
    # SmolLM2 splits digits one by one and keeps leading spaces on words (GPT-2 byte-level).
    ids = tok.encode("open at 830")
    assert [tok.id_to_token(i) for i in ids] == ["open", "Ġat", "Ġ", "8", "3", "0"]
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert tok.decode([1, 2, 0]) == ""  # control tokens vanish when decoding for the user


def test_eos_ids_include_template_end_of_turn(tok):
    assert 2 in tok.eos_token_ids  # <|im_end|>: GGUF eos and the template's end of turn
    assert 0 in tok.eos_token_ids  # <|endoftext|>
    assert 1 not in tok.eos_token_ids


def test_chat_template_renders_chatml(tok):
    msgs = [{"role": "system", "content": "You answer for Green Leaf Grocery."},
            {"role": "user", "content": "When do you open?"}]
    text = tok.render_chat(msgs)
    assert text == ("<|im_start|>system\nYou answer for Green Leaf Grocery.<|im_end|>\n"
                    "<|im_start|>user\nWhen do you open?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs)
    assert ids[0] == 1 and ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
    assert tok.decode(ids, skip_special_tokens=False) == text
    no_system = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert not no_system.endswith("assistant\n")


def test_bad_messages_are_clear_errors(tok):
    with pytest.raises(ValueError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        tok.apply_chat_template([{"role": "user", "content": 3}])


def test_template_raise_exception_and_sandbox():
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                     "{{ bos_token }}{{ messages[0]['content'] }}", bos_token="<s>")
    assert t.render([{"role": "user", "content": "x"}]) == "<s>x"
    with pytest.raises(ChatTemplateError, match="user first"):
        t.render([{"role": "system", "content": "x"}])
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        evil.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("text", ["café 日本 👍", TEXTS[3], "a\u00e9\u00e9\u00e9 \U0001f600\U0001f600 end"])
def test_incremental_detokenizer_never_splits_characters(tok, text):
    d = tok.detokenizer()
    deltas = [d.push(i) for i in tok.encode(text)]
    deltas.append(d.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)
    assert sum(1 for x in deltas if x == "") >= 1  # some byte-level tokens were really held back


def test_incremental_detokenizer_flushes_an_invalid_tail(tok):
    d = tok.detokenizer()
    partial = tok.encode("日")[:1]  # first byte(s) of a 3-byte character only
    assert d.push_many(partial) == ""
    assert d.flush() == "\ufffd"


def test_hf_directory_tokenizer_matches_gguf(tok, tmp_path):
    tok._tk.save(str(tmp_path / "tokenizer.json"))
    template = tok.chat_template.source
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    hf = Tokenizer.from_path(tmp_path)
    for text in TEXTS:
        assert hf.encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "When do you open?"}]
    assert hf.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    assert set(hf.eos_token_ids) == set(tok.eos_token_ids)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_path(tmp_path)
