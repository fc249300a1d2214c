"""What the engine hands back: StreamOutput per step and request, RequestResult at the end, EngineStats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestResult:
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    ttft_s: float | None  # arrival -> first token (None if no token came)
    decode_tok_s: float | None  # completion tokens after the first / time since the first
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    text: str  # the whole completion text (stop string excluded)
    error: str | None = None  # the message when finish_reason == "error"
    draft_tokens: int = 0  # speculative drafts verified for this request
    accepted_draft_tokens: int = 0  # of which the target accepted (each one a token that cost no extra step)


@dataclass(slots=True)
class StreamOutput:
    request_id: str
    text: str = ""  # new UTF-8-safe text since the previous output
    token_ids: list[int] = field(default_factory=list)  # new token ids
    finished: bool = False
    result: RequestResult | None = None  # set on the last output


@dataclass(slots=True)
class EngineStats:
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    prefix_hit_tokens: int  # cumulative
    decode_tok_s: float  # generated tokens per second over the last few seconds
    num_preemptions: int
    finished_requests: int = 0
    spec_draft_tokens: int = 0  # cumulative speculative drafts verified
    spec_accepted_tokens: int = 0  # cumulative drafts accepted
    spec_verifies: int = 0  # cumulative decode steps (per sequence) that carried drafts
    # Cumulative over steps that ran a batch: how many, their wall time inside step() (schedule + model run +
    # postprocess) and the sequences they carried; deltas between two reads give the mean batch size and step
    # time of that interval (bench/gpu_voice samples them through /metrics).
    steps: int = 0
    step_seconds: float = 0.0
    step_seqs: int = 0
