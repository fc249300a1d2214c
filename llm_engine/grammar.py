"""Constrained decoding: a per-request grammar (a JSON Schema or a Lark grammar) becomes a token mask applied in
the sampler, so the output cannot leave the grammar. The grammar library is llguidance (JSON Schema and Lark ->
Earley parser over a token trie; a mask costs tens of microseconds on the host; no Python dependencies).

A request's `Grammar` may be *lazy*: with `triggers`, decoding is free until one of the trigger strings appears
in the output; from there on the grammar applies to the output *starting at the trigger* (the grammar includes
it), e.g. a tool call `<tool_call>{...}</tool_call>` after some spoken words. Without triggers it applies from
the first token. Once active it may get its own token budget (`max_tokens`).

Per step: `GrammarState.active` rows get a bitmask [k, ceil(V / 32)] int32 filled on the host (`fill_bitmasks`,
parallel over rows) and applied to their logits (`apply_bitmask`: -inf where the bit is 0) before sampling; each
sampled token is then consumed by the matcher (`GrammarState.accept`), so the next mask needs this step's token on
the host (the engine already brings it back every step). Speculative decoding is not combined with a constraint:
speculation is off for constrained requests (see SamplingParams)."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llg() -> Any:
    try:
        import llguidance
    except ImportError as e:  # a declared dependency: say how to get it
        raise ImportError("constrained decoding needs llguidance: pip install 'llguidance>=1.9'") from e
    return llguidance


@dataclass(frozen=True, slots=True)
class Grammar:
    """What a constrained request's output must match. Exactly one of `json_schema` / `lark`."""
    json_schema: dict | str | None = None  # the output is one JSON instance of this schema (compact separators)
    lark: str | None = None  # a Lark grammar in llguidance's dialect (`%json {...}` embeds a schema)
    triggers: tuple[str, ...] = ()  # lazy: free text until one of these appears; the grammar starts at it
    max_tokens: int | None = None  # tokens allowed once the grammar is active (own budget); None -> max_tokens

    def __post_init__(self) -> None:
        if (self.json_schema is None) == (self.lark is None):
            raise ValueError("Grammar needs exactly one of json_schema= or lark=")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str)):
            raise ValueError(f"json_schema must be a dict or a JSON string, got {type(self.json_schema).__name__}")
        if self.lark is not None and (not isinstance(self.lark, str) or not self.lark.strip()):
            raise ValueError("lark must be a non-empty grammar string")
        object.__setattr__(self, "triggers", tuple(self.triggers))
        if any(not isinstance(t, str) or not t for t in self.triggers):
            raise ValueError(f"triggers must be non-empty strings, got {self.triggers!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise ValueError(f"Grammar.max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")

    def source(self) -> str:
        """The llguidance grammar text (raises ValueError for a schema that is not a JSON object)."""
        llg = _llg()
        if self.lark is not None:
            return llg.LLMatcher.grammar_from_lark(self.lark)
        schema = self.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("json_schema must be a JSON object")
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)


def validate_grammar(grammar: Grammar, compiler: GrammarCompiler | None = None) -> str:
    """The grammar's llguidance text; ValueError naming the problem if llguidance cannot compile it (a bad
    schema, a Lark error)."""
    llg = _llg()
    src = grammar.source()
    is_error, msgs = llg.LLMatcher.validate_grammar_with_warnings(src, compiler.lltok if compiler else None)
    if is_error:
        raise ValueError(f"invalid grammar: {msgs[0] if msgs else 'unknown error'}")
    return src


class GrammarCompiler:
    """Per engine: llguidance's view of the tokenizer (built once, ~0.2-1 s) and a small cache of compiled
    grammar texts. Thread-safe: requests are validated on caller threads, matchers run on the engine thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...] | list[int]):
        llg = _llg()
        tk = getattr(tokenizer, "_tk", tokenizer)  # llm_engine.tokenizer.Tokenizer or a tokenizers.Tokenizer
        self.vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's vocab)
        self.lltok = llg.LLTokenizer(tk.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.words = (vocab_size + 31) // 32  # int32 words per mask row
        self._executor = llg.LLExecutor(num_threads=max(1, min(8, os.cpu_count() or 1)))  # batch mask fills
        self._cache: dict[Grammar, str] = {}
        self._lock = threading.Lock()

    def compile(self, grammar: Grammar) -> str:
        """Grammar -> llguidance grammar text, validated against this tokenizer (ValueError if invalid)."""
        with self._lock:
            src = self._cache.get(grammar) if isinstance(grammar.json_schema, (str, type(None))) else None
        if src is not None:
            return src
        src = validate_grammar(grammar, self)
        if isinstance(grammar.json_schema, (str, type(None))):  # dict schemas are unhashable: not cached
            with self._lock:
                if len(self._cache) >= 256:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[grammar] = src
        return src

    def new_state(self, grammar: Grammar) -> GrammarState:
        return GrammarState(self, grammar, self.compile(grammar))

    def fill_bitmasks(self, states: list[GrammarState], out: np.ndarray) -> None:
        """Write row i of out [>= len(states), words] int32 with the allowed tokens of states[i] (all active)."""
        if not states:
            return
        if len(states) == 1:
            row = out[0]
            states[0].matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            return
        self._executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)], out.ctypes.data,
                                               out.shape[1] * 4, out.shape[0])


class GrammarState:
    """One request's constraint: waiting for a trigger (lazy) or active (a live llguidance matcher)."""

    def __init__(self, compiler: GrammarCompiler, grammar: Grammar, source: str):
        self.compiler = compiler
        self.grammar = grammar
        self._source = source
        self.matcher: Any = None
        self.error: str | None = None  # set when the matcher rejected the output (cannot happen under the mask)
        self._out = b""  # output bytes while waiting for a trigger
        self._triggers = [t.encode() for t in grammar.triggers]
        self.activated_at: int | None = None  # completion tokens when the grammar became active
        if not self._triggers:
            self._start(b"", 0)

    @property
    def active(self) -> bool:
        return self.matcher is not None and self.error is None and not self.matcher.is_stopped()

    @property
    def done(self) -> bool:
        """The grammar is complete (nothing but its end may follow)."""
        return self.matcher is not None and self.matcher.is_stopped()

    def _start(self, prefix: bytes, num_completion_tokens: int, trigger: bytes = b"") -> None:
        """Start the matcher on the output from the trigger on. The token that completed the trigger was sampled
        freely and may carry whitespace the grammar does not expect right after it (`<tool_call> {`): then the
        matcher is fed the trigger and the rest without that whitespace."""
        llg = _llg()
        self.activated_at = num_completion_tokens
        tail = prefix[len(trigger):]
        for text in dict.fromkeys((prefix, trigger + tail.lstrip())):
            self.matcher = llg.LLMatcher(self.compiler.lltok, self._source, log_level=0)
            if self.matcher.is_error():
                self.error = self.matcher.get_error()
                return
            if not text or self.matcher.consume_tokens(self.compiler.lltok.tokenize_bytes(text)):
                self.error = None
                return
            self.error = f"grammar rejected the text at its trigger: {self.matcher.get_error()}"

    def accept(self, token_id: int, num_completion_tokens: int) -> bool:
        """Consume one sampled token. Returns True when the grammar just became active (a trigger appeared)."""
        if self.matcher is not None:
            if self.error is None and not self.matcher.is_stopped() and not self.matcher.consume_token(token_id):
                self.error = self.matcher.get_error() or f"token {token_id} rejected"
            return False
        self._out += self.compiler.lltok.decode_bytes([token_id])
        best, trig = None, b""
        for t in self._triggers:
            i = self._out.find(t)
            if i != -1 and (best is None or i < best):
                best, trig = i, t
        if best is None:
            keep = max(len(t) for t in self._triggers) - 1  # a trigger may still straddle the next token
            self._out = self._out[-keep:] if keep > 0 else b""
            return False
        self._start(self._out[best:], num_completion_tokens, trig)
        self._out = b""
        return True
