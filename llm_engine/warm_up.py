"""Engine warm-up: synthetic requests through the real scheduler and step path, so that every kernel
specialization a server meets is compiled (and every lazily loaded CUDA module loaded) before it says ready.

Why: Triton compiles a kernel again for each new specialization of its arguments (integers equal to 1 or divisible
by 16, pointers 16-byte aligned) and each new constexpr (the eager decode attention's split count grows with the
longest sequence); cuBLAS and SDPA pick and load kernels per shape on first use. Decode steps replay the CUDA
graphs captured at start-up (llm_engine.cuda_graphs), but prefill, mixed and sampled steps run eagerly, and on a
fresh GPU host the first step of each new class stalled 0.9-1.6 s (bench/gpu_voice/first_use.py).

`warm_up_plan` is a pure function: the requests and the warm-up step at which each arrives. It covers single
prefills of many token-count classes (1, 2, 3, odd lengths, multiples of 16 and their neighbours, the step's token
budget and a chunked prompt), prefix-cache hits (a cached prefix, then suffixes of several lengths: chunks whose
keys outnumber their queries), several sequences prefilled in one step (2, 3, 5, 8, 17 and max_num_seqs, mixed
lengths, so each sequence's rows start at an odd offset), one-token prompts (all-decode-shaped eager steps),
prefills beside running decodes, a self-repeating prompt (speculative drafts), duplicated prompts whose last token
alone is computed (the eager decode attention at each split count), greedy and sampled requests (temperature only,
temperature 0.3 with top-p 0.9, top-k, a seeded one), none constrained by a grammar; max_tokens 3, so the decode
graphs replay too. `run_warm_up` drives a plan through LLMEngine.step() and leaves no trace: every request
finished, every KV block free again, the prefix-cache entries it registered dropped, and the counters that
stats() / /metrics report restored to their values before it."""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm_engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llm_engine.engine import LLMEngine

MAX_TOKENS = 3  # per warm-up request: one prefill-sampled token, then two decode steps (graph replays)
MAX_LADDER_TOKENS = 8192  # the duplicated-prompt ladder stops here (its prefills cost ~3x this many tokens)
SINGLE_LENGTHS = (1, 2, 3, 5, 7, 11, 13, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 100, 127, 128, 129, 255,
                  256, 257)
MIX_LENGTHS = (1, 3, 7, 13, 16, 17, 29, 33, 50, 64, 65, 90, 127, 200)  # group members' prompt lengths, cycled
GROUP_SIZES = (2, 3, 5, 8, 17)  # sequences prefilled in one step (plus max_num_seqs)
ONE_TOKEN_GROUP_SIZES = (2, 5, 17)  # one-token prompts admitted together (plus max_num_seqs)
PREFIX_SUFFIXES = (1, 2, 9, 16, 17, 40)  # suffix lengths after a cached prefix
SPLIT_KEYS = 64  # keys per split of the eager decode attention for one sequence (kernels/decode_attention.py)


class EngineBusy(RuntimeError):
    """The warm-up was asked for while requests are in flight (it needs an idle engine)."""


def _params() -> list[SamplingParams]:
    """The sampling classes, cycled over the requests: greedy (the argmax path) and sampled ones (the Gumbel kernel
    alone, and after the top-p / top-k sort). ignore_eos: every request runs its MAX_TOKENS."""
    def sp(**kw) -> SamplingParams:
        return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **kw)
    return [sp(), sp(temperature=0.3, top_p=0.9), sp(), sp(temperature=0.7, top_k=20), sp(),
            sp(temperature=0.8), sp(temperature=0.5, seed=1234)]


@dataclass(frozen=True, slots=True)
class WarmUpRequest:
    label: str  # the class it covers (for logs and tests)
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_step: int  # added before the warm-up's step with this index (steps counted from 0)


@dataclass(frozen=True, slots=True)
class WarmUpReport:
    requests: int
    steps: int  # engine steps that ran a batch
    seconds: float
    errors: int  # requests that ended with finish_reason "error" (logged)


class _Planner:
    def __init__(self, vocab_size: int, max_num_seqs: int, max_model_len: int, block_size: int, budget: int,
                 num_kv_blocks: int | None, avoid: frozenset[int], seed: int):
        self.max_num_seqs, self.block_size, self.budget = max_num_seqs, block_size, budget
        self.num_kv_blocks = num_kv_blocks
        cap = max_model_len if num_kv_blocks is None else min(max_model_len, num_kv_blocks * block_size)
        self.max_prompt = cap - MAX_TOKENS  # longest prompt that fits with its completion
        self.pool = [t for t in range(vocab_size) if t not in avoid]
        if not self.pool:
            raise ValueError("no token id left to build warm-up prompts from")
        self.rng = random.Random(seed)
        self.params = _params()
        self.n = 0  # requests so far (cycles the sampling classes)
        self.start = 0  # the next phase's first step
        self.out: list[WarmUpRequest] = []

    def prompt(self, n: int) -> tuple[int, ...]:
        return tuple(self.rng.choice(self.pool) for _ in range(n))

    def fits(self, n: int) -> bool:
        return 1 <= n <= self.max_prompt

    def next_params(self) -> SamplingParams:
        self.n += 1
        return self.params[(self.n - 1) % len(self.params)]

    def blocks(self, n: int) -> int:
        return -(-(n + MAX_TOKENS) // self.block_size)

    def phase(self, items: list[tuple[str, tuple[int, ...], SamplingParams | None, int]]) -> None:
        """Add requests (label, prompt, params or None = the next class, step offset): those that fit, at most
        max_num_seqs per arrival step and the KV pool's worth of blocks in all; the next phase starts once these
        have had their steps (prefill chunks under the token budget, then MAX_TOKENS decodes)."""
        kept: list[tuple[str, tuple[int, ...], SamplingParams | None, int]] = []
        per_step: dict[int, int] = {}
        blocks = 0
        for label, prompt, params, offset in items:
            if not self.fits(len(prompt)) or per_step.get(offset, 0) >= self.max_num_seqs:
                continue
            if self.num_kv_blocks is not None and blocks + self.blocks(len(prompt)) > self.num_kv_blocks:
                continue
            per_step[offset] = per_step.get(offset, 0) + 1
            blocks += self.blocks(len(prompt))
            kept.append((label, prompt, params, offset))
        if not kept:
            return
        for label, prompt, params, offset in kept:
            self.out.append(WarmUpRequest(label, prompt, params or self.next_params(), self.start + offset))
        tokens = sum(len(p) for _, p, _, _ in kept)
        self.start += max(o for *_, o in kept) + -(-tokens // self.budget) + MAX_TOKENS + 1


def ladder_lengths(max_prompt: int, block_size: int) -> list[int]:
    """Prompt lengths n = 1 (mod block_size), so that a duplicate of the prompt computes its last token alone, at
    the first and the last such n of each split count of the eager decode attention (one split per SPLIT_KEYS keys,
    rounded up to a power of two: lengths in (top/2, top] for top = 64, 128, ...), up to MAX_LADDER_TOKENS."""
    bs, out, top = block_size, [], SPLIT_KEYS
    limit = min(max_prompt, MAX_LADDER_TOKENS)
    while top // 2 < limit:
        first = max(top // 2 + 1, bs + 1)  # >= one full block, or nothing is cached to hit
        first += (1 - first) % bs
        last = top - (top - 1) % bs
        out += [n for n in (first, last) if top // 2 < n <= min(top, limit) and n > bs]
        top *= 2
    return sorted(set(out))


def warm_up_plan(vocab_size: int, max_num_seqs: int, max_model_len: int, block_size: int, *,
                 max_num_batched_tokens: int = 512, num_kv_blocks: int | None = None,
                 avoid_token_ids: frozenset[int] | set[int] | tuple[int, ...] = (), seed: int = 0
                 ) -> list[WarmUpRequest]:
    """The warm-up's requests in arrival order (see the module note for the classes). Every prompt plus its
    MAX_TOKENS fits max_model_len and the KV pool, at most max_num_seqs requests arrive at one step, no prompt uses
    an id of avoid_token_ids (the eos ids), and only the prompts of the prefix and ladder phases share prefixes."""
    p = _Planner(vocab_size, max_num_seqs, max_model_len, block_size, max_num_batched_tokens, num_kv_blocks,
                 frozenset(avoid_token_ids), seed)
    budget = max_num_batched_tokens
    # 1. single prefills, one length class at a time (the step's budget, and a prompt chunked over 3 steps)
    for n in sorted(set(SINGLE_LENGTHS) | {budget - 1, budget, budget + 1, 2 * budget + 37}):
        p.phase([(f"single {n}", p.prompt(n), None, 0)])
    # 2. prefix-cache hits: a prefix of 3 blocks + 5 tokens, then suffixes alone, then max_num_seqs together
    plen = min(3 * block_size + 5, max(p.max_prompt - max(PREFIX_SUFFIXES), block_size + 1))
    prefix = p.prompt(plen)
    first = [("prefix first", prefix + p.prompt(7), p.params[0], 0)]
    wait = -(-(plen + 7) // budget)
    hits = [(f"prefix hit +{s}", prefix + p.prompt(s), None, wait + j * (MAX_TOKENS + 1))
            for j, s in enumerate(PREFIX_SUFFIXES)]
    p.phase(first + hits)
    p.phase([(f"prefix group {max_num_seqs}", prefix + p.prompt(PREFIX_SUFFIXES[j % len(PREFIX_SUFFIXES)] + j % 5),
              None, 0) for j in range(max_num_seqs)])
    # 3. several sequences prefilled in one step, mixed lengths
    for g in sorted({s for s in GROUP_SIZES if s <= max_num_seqs} | ({max_num_seqs} - {1})):
        p.phase([(f"group {g}", p.prompt(MIX_LENGTHS[(7 * j + g) % len(MIX_LENGTHS)]), None, 0) for j in range(g)])
    # 4. one-token prompts together: steps of one query per sequence that are not graph decodes
    for g in sorted({s for s in ONE_TOKEN_GROUP_SIZES if s <= max_num_seqs} | {max_num_seqs}):
        p.phase([(f"one-token group {g}", p.prompt(1), None, 0) for _ in range(g)])
    # 5. prefills beside running decodes; a self-repeating prompt (speculative drafts in the prefill's last chunk)
    pattern = p.prompt(5)
    p.phase([("mixed decode A", p.prompt(20), None, 0), ("repeating", pattern * 6, p.params[0], 0),
             ("mixed prefill B", p.prompt(37), None, 1), ("mixed prefill C", p.prompt(5), None, 1),
             ("mixed one-token", p.prompt(1), None, 2)])
    decoders = [(f"decoding {j}", p.prompt(MIX_LENGTHS[j]), None, 0) for j in range(min(8, max_num_seqs - 1))]
    p.phase(decoders + [("chunked beside decodes", p.prompt(2 * budget + 37), None, 1)])
    # 6. the duplicated-prompt ladder: the duplicate computes its last token alone, at each split-count class
    for n in ladder_lengths(p.max_prompt, block_size):
        prompt = p.prompt(n)
        p.phase([(f"ladder {n}", prompt, p.params[0], 0),
                 (f"ladder {n} duplicate", prompt, p.params[0], -(-n // budget) + MAX_TOKENS + 1)])
    return p.out


class _Counters:
    """What stats() reports (and the runner's RNG): saved before the warm-up, put back after it."""
    ENGINE = ("_steps", "_step_seqs", "_step_s", "num_finished")

    def __init__(self, eng: LLMEngine):
        self.eng = eng
        self.values = {a: getattr(eng, a) for a in self.ENGINE}
        self.recent = list(eng._recent)
        self.prefix_hit_tokens = eng.block_manager.prefix_hit_tokens
        self.preemptions = eng.scheduler.num_preemptions
        self.spec = (eng.spec.num_drafted, eng.spec.num_accepted, eng.spec.num_verifies) if eng.spec else None
        self.graph = {a: getattr(eng.runner, a) for a in ("num_graph_steps", "num_graph_verify_steps")
                      if hasattr(eng.runner, a)}
        self.rng = eng.runner.default_generator.get_state()

    def restore(self) -> None:
        eng = self.eng
        for a, v in self.values.items():
            setattr(eng, a, v)
        eng._recent.clear()
        eng._recent.extend(self.recent)
        eng.block_manager.prefix_hit_tokens = self.prefix_hit_tokens
        eng.scheduler.num_preemptions = self.preemptions
        if self.spec is not None:
            eng.spec.num_drafted, eng.spec.num_accepted, eng.spec.num_verifies = self.spec
        for a, v in self.graph.items():
            setattr(eng.runner, a, v)
        eng.runner.default_generator.set_state(self.rng)


def run_warm_up(eng: LLMEngine, plan: list[WarmUpRequest], log=None) -> WarmUpReport:
    """Drive `plan` through eng.step() (an idle engine: RuntimeError otherwise), then undo its traces (module
    note; prefix-cache entries from before it survive unless the KV pool is too small to also hold the warm-up's,
    which then evicts the oldest like any request does). A request the engine refuses is skipped and a step failure
    counted, both logged through `log` (a logging.Logger); neither stops the warm-up."""
    if eng.has_unfinished():
        raise EngineBusy("warm-up needs an idle engine (requests are in flight)")
    t0 = time.perf_counter()
    saved = _Counters(eng)
    bm = eng.block_manager
    cached_before = set(bm.hash_to_block)
    queue = deque(sorted(plan, key=lambda r: r.arrival_step))
    live: set[str] = set()
    step, errors, added = 0, 0, 0
    max_waiting = eng.config.max_waiting
    limit = 50 * len(plan) + sum(len(r.prompt_token_ids) for r in plan) + 100  # a bound no sane run reaches
    try:
        while queue or live:
            if not live and queue and queue[0].arrival_step > step:
                step = queue[0].arrival_step  # idle until the next arrival: skip ahead
            while queue and queue[0].arrival_step <= step and len(eng.scheduler.waiting) < max_waiting:
                r = queue.popleft()
                rid = f"warm-up-{added}"
                added += 1
                try:
                    eng.add_request(rid, list(r.prompt_token_ids), r.params)
                except (ValueError, RuntimeError) as e:  # EngineOverloaded is a RuntimeError
                    if log is not None:
                        log.warning("warm-up request %r skipped: %s", r.label, e)
                    continue
                live.add(rid)
            for out in eng.step():
                if out.finished:
                    live.discard(out.request_id)
                    if out.result is not None and out.result.finish_reason == "error":
                        errors += 1
                        if log is not None:
                            log.error("warm-up request %s failed: %s", out.request_id, out.result.error)
            step += 1
            if step > limit:
                raise RuntimeError(f"warm-up did not finish within {limit} steps")
    finally:
        for rid in list(live):  # only after an exception: release what is still in flight
            eng.abort(rid)
        while eng.has_unfinished():
            eng.step()  # hands back the aborts' outputs
        steps = eng._steps - saved.values["_steps"]
        bm.drop_cached(keep=cached_before)
        saved.restore()
    return WarmUpReport(requests=added, steps=steps, seconds=time.perf_counter() - t0, errors=errors)
