"""Tokenizer: text <-> token ids for a checkpoint, built from an HF `tokenizer.json` (tokenizers library) or from
GGUF metadata (tokenizer.ggml.model "gpt2": byte-level BPE from tokens + merges + token types), with the chat
template, all end-of-sequence ids, and an IncrementalDetokenizer that streams UTF-8-safe text deltas."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llm_engine.chat_template import ChatTemplate

log = logging.getLogger("voicefast.llm_engine")

# Strings that end a turn or a document when they are special tokens of the vocab.
_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>",
               "<|end|>", "</s>")
# These end the assistant's turn only where the chat template uses them (GLM: the next turn's opener).
_TEMPLATE_STOP_TOKENS = ("<|user|>", "<|observation|>")
# llama.cpp pre-tokenizer names -> our pre-tokenizer recipe
_SPLIT_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    """encode / decode / apply_chat_template / eos_token_ids over a `tokenizers.Tokenizer`."""

    def __init__(self, tk: Any, *, chat_template: str | None = None, bos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), add_bos_token: bool = False):
        self._tk = tk
        self.bos_token_id = bos_token_id
        self.add_bos_token = add_bos_token and bos_token_id is not None
        bos = tk.id_to_token(bos_token_id) if bos_token_id is not None else None
        ids = [i for i in eos_token_ids if i is not None]
        specials = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
        for s in _END_TOKENS:
            if s in specials:
                ids.append(tk.token_to_id(s))
        for s in _TEMPLATE_STOP_TOKENS:
            if chat_template and s in chat_template and s in specials:
                ids.append(tk.token_to_id(s))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in ids))
        eos = tk.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None
        self.chat_template = ChatTemplate(chat_template, bos_token=bos, eos_token=eos) if chat_template else None

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_path(cls, path: str | Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """From a HF checkpoint dir (tokenizer.json) or a .gguf file."""
        p = Path(path).expanduser()
        if p.is_dir():
            return cls.from_hf_dir(p, extra_eos_token_ids)
        if p.suffix == ".gguf" and p.is_file():
            return cls.from_gguf(p, extra_eos_token_ids)
        raise ValueError(f"{p}: no tokenizer (expected a checkpoint dir with tokenizer.json, or a .gguf file)")

    @classmethod
    def from_hf_dir(cls, d: str | Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        from tokenizers import Tokenizer as TkTokenizer

        d = Path(d)
        if not (d / "tokenizer.json").exists():
            raise ValueError(f"{d}: no tokenizer.json (slow/sentencepiece-only tokenizers are not supported)")
        tk = TkTokenizer.from_file(str(d / "tokenizer.json"))
        tc = _read_json(d / "tokenizer_config.json")
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text()
        eos_ids = list(extra_eos_token_ids)
        for src in (_read_json(d / "generation_config.json"), _read_json(d / "config.json")):
            e = src.get("eos_token_id")
            eos_ids += e if isinstance(e, list) else ([e] if e is not None else [])
        eos_tok = _token_str(tc.get("eos_token"))
        if eos_tok and tk.token_to_id(eos_tok) is not None:
            eos_ids.append(tk.token_to_id(eos_tok))
        bos_tok = _token_str(tc.get("bos_token"))
        bos_id = tk.token_to_id(bos_tok) if bos_tok else None
        # tokenizer.json's post-processor already adds BOS where the model wants it; never add it twice.
        return cls(tk, chat_template=template, bos_token_id=bos_id, eos_token_ids=eos_ids, add_bos_token=False)

    @classmethod
    def from_gguf(cls, path: str | Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        from llm_engine.gguf_loader import load_gguf_tokenizer_metadata

        meta = load_gguf_tokenizer_metadata(path)
        tk = build_gguf_bpe(meta)
        eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id")]
        return cls(tk, chat_template=meta.get("tokenizer.chat_template"),
                   bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=[*extra_eos_token_ids, *eos],
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)))

    # ---------------------------------------------------------------- use

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; special-token strings in text (e.g. <|im_start|>) map to their ids."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self._tk.token_to_id(s)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    **extra: Any) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; pass prompt text or token ids instead")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **extra)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            **extra: Any) -> list[int]:
        """Prompt token ids for a conversation (the template itself places any BOS)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(text, add_bos=False)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


def _read_json(p: Path) -> dict[str, Any]:
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON ({e})") from e


def build_gguf_bpe(meta: dict[str, Any]) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF tokenizer.ggml.* metadata (model "gpt2")."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TkTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = TkTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SPLIT_DIGITS_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in ("default", "gpt2", "gpt-2"):
            log.warning("GGUF pre-tokenizer %r unknown; using the GPT-2 split", pre)
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    # CONTROL (3) tokens are special (skipped when decoding); USER_DEFINED (4) are matched whole but kept.
    if len(types) != len(tokens):
        raise ValueError(f"GGUF tokenizer: {len(tokens)} tokens but {len(types)} token types")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types, strict=True) if ty == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types, strict=True) if ty == 4])
    return tk


class IncrementalDetokenizer:
    """Token ids in, UTF-8-safe text deltas out. Decodes a small window of recent tokens so that a multibyte
    character split across byte-level tokens is held back until complete (no U+FFFD in any delta) and
    leading-space handling stays right for any decoder."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are fully emitted
        self._read = 0  # tokens before it have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes ("" while a character is still partial)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def push_many(self, token_ids: Iterable[int]) -> str:
        self._ids.extend(int(i) for i in token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (an invalid trailing byte sequence decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._tok.decode(self._ids[self._prefix:self._read])
        now = self._tok.decode(self._ids[self._prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before):]
