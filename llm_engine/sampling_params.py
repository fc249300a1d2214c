"""SamplingParams: how one request picks its tokens and when it stops.

Constrained decoding (`json_schema=` or `grammar=`, llm_engine.grammar): the output is masked token by token so
it matches the grammar. Speculative decoding is OFF for constrained requests (`constrained` is True, so
`speculate` is set False): drafts are verified against the unmasked distribution and one grammar state masks one
row per step, so the engine decodes them one token per step."""

from __future__ import annotations

from dataclasses import dataclass

from llm_engine.grammar import Grammar


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # 0 -> off
    max_tokens: int = 256  # completion tokens at most
    stop_token_ids: tuple[int, ...] | list[int] = ()  # in addition to the tokenizer's eos ids
    stop: tuple[str, ...] | list[str] | str = ()  # stop strings, matched on the detokenized text, not emitted
    seed: int | None = None  # per-request generator: same seed, same tokens
    ignore_eos: bool = False  # do not stop on the tokenizer's eos ids
    speculate: bool = True  # allow speculative (prompt-lookup) decoding for this request when the engine has it
    # on; a constrained request (grammar / json_schema) never speculates: __post_init__ sets this False for it
    json_schema: dict | str | None = None  # constrain the output to one JSON instance of this schema
    grammar: Grammar | None = None  # or a general (possibly lazy) grammar; not both

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty str, got {self.stop!r}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if not isinstance(self.speculate, bool):
            raise ValueError(f"speculate must be a bool, got {self.speculate!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.json_schema is not None:
            if self.grammar is not None:
                raise ValueError("pass json_schema= or grammar=, not both")
            self.grammar = Grammar(json_schema=self.json_schema)
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise ValueError(f"grammar must be an llm_engine.grammar.Grammar, got {type(self.grammar).__name__}")
        if self.grammar is not None:
            self.speculate = False  # the drafting code (SpecPolicy.propose) reads only this

    @property
    def constrained(self) -> bool:
        """A grammar masks this request's tokens (speculative decoding is then off for it)."""
        return self.grammar is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
