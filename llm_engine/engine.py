"""LLMEngine: the synchronous core. step() = scheduler.schedule() -> runner.run() -> scheduler.postprocess(),
then detokenize the new tokens, apply stop strings and build StreamOutputs. Not thread-safe: AsyncLLMEngine
drives it from one thread."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from llm_engine.block_manager import BlockManager
from llm_engine.config import EngineConfig
from llm_engine.grammar import GrammarCompiler
from llm_engine.kv_cache import cuda_kv_budget_bytes, num_blocks_for_memory
from llm_engine.model_config import ModelConfig
from llm_engine.model_runner import ModelRunner
from llm_engine.outputs import EngineStats, RequestResult, StreamOutput
from llm_engine.sampling_params import SamplingParams
from llm_engine.scheduler import Scheduler
from llm_engine.sequence import Sequence, checked_prompt
from llm_engine.spec_decode import SpecPolicy
from llm_engine.stop_strings import StopStringMatcher
from llm_engine.tool_format import ToolDialect, dialect_for
from llm_engine.warm_up import WarmUpReport, run_warm_up, warm_up_plan

log = logging.getLogger("llm_engine")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    return torch.device(device)


def pick_runner_class(device: torch.device) -> type[ModelRunner]:
    """GpuModelRunner on CUDA when its module imports; the plain runner otherwise."""
    if device.type == "cuda":
        try:
            from llm_engine.gpu_runner import GpuModelRunner
            return GpuModelRunner
        except ImportError as e:
            log.warning("GpuModelRunner unavailable (%s); using the eager ModelRunner", e)
    return ModelRunner


class _Request:
    """Engine-side per-request state: detokenizer and stop-string matcher."""
    __slots__ = ("detok", "stop", "text")

    def __init__(self, detok: Any, stop: StopStringMatcher | None):
        self.detok = detok
        self.stop = stop
        self.text = ""  # completion text emitted so far


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, model: torch.nn.Module | None = None,
                 tokenizer: Any = None):
        """Loads config.model (or the embedded model). Tests may pass an already built `model` (a CausalLM with
        .config) and optionally a tokenizer (None -> token ids only: no text, no stop strings)."""
        self.config = cfg = config or EngineConfig()
        self.device = resolve_device(cfg.device)
        if cfg.dtype != "auto":
            self.dtype = _DTYPES[cfg.dtype]
        else:
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        self.tp = None  # llm_engine.parallel.TensorParallel when the model is split over ranks
        if model is None and (cfg.tensor_parallel > 1 or not isinstance(cfg.model, (str, Path, type(None)))):
            model, tokenizer = self._load_parallel(cfg)
        elif cfg.tensor_parallel > 1:
            raise ValueError("tensor_parallel > 1: every rank loads its own shard, so pass EngineConfig.model (a "
                             "checkpoint path or a RandomCheckpoint), not a built model")
        elif model is None:
            model, tokenizer = self._load(cfg)
            if cfg.quantize:
                from llm_engine.quant.swap import quantize_model

                quantize_model(model, cfg.quantize, include_lm_head=cfg.quantize_lm_head)
        self.model = model
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        mc = self.model_config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        num_blocks = cfg.num_kv_blocks or self._size_kv_pool()
        self.block_manager = BlockManager(num_blocks, cfg.kv_block_size, cfg.enable_prefix_caching)
        k = cfg.speculative_tokens if cfg.speculative_tokens is not None else 4 if self.device.type == "cuda" else 1
        self.num_speculative_tokens = k
        self.spec = SpecPolicy(k, cfg.speculative_ngram_min, cfg.speculative_ngram_max) if k > 0 else None
        spec_rows = min(cfg.speculative_max_rows, cfg.max_num_batched_tokens) if self.spec else 0
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens, max_waiting=cfg.max_waiting,
                                   max_model_len=self.max_model_len, spec=self.spec, spec_max_rows=spec_rows)
        runner_cls = pick_runner_class(self.device)
        if self.tp is not None:
            runner_cls = self.tp.runner_class(runner_cls)  # broadcasts every step to the worker ranks
        self.runner = runner_cls(model, mc, num_kv_blocks=num_blocks, block_size=cfg.kv_block_size,
                                 max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                                 max_model_len=self.max_model_len, device=self.device, dtype=self.dtype,
                                 seed=cfg.seed, enforce_eager=cfg.enforce_eager, max_decode_rows=spec_rows)
        eos = tokenizer.eos_token_ids if tokenizer is not None else mc.eos_token_ids
        self.eos_token_ids = frozenset(int(t) for t in eos)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[StreamOutput] = []  # outputs made outside step() (aborts), returned by the next step
        self._ids = itertools.count()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) of recent steps
        self._steps, self._step_seqs, self._step_s = 0, 0, 0.0  # cumulative, over steps that ran a batch
        slow = cfg.slow_step_ms if cfg.slow_step_ms is not None else (250.0 if self.device.type == "cuda" else 0.0)
        self._slow_step_s = slow / 1e3
        self._slow_logged_s, self._slow_unlogged = 0.0, 0
        self.num_finished = 0
        self._grammar: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()

    def _load(self, cfg: EngineConfig) -> tuple[torch.nn.Module, Any]:
        from llm_engine.loader import load_model
        from llm_engine.tokenizer import Tokenizer

        path = cfg.model_path()
        model, _ = load_model(path, device=self.device, dtype=self.dtype)
        return model, Tokenizer.from_path(path)

    def _load_parallel(self, cfg: EngineConfig) -> tuple[torch.nn.Module, Any]:
        """tensor_parallel > 1: spawn the worker ranks, load rank 0's shard (llm_engine.parallel). With 1 rank
        (a RandomCheckpoint model): the plain model."""
        from llm_engine.parallel.group import TPGroup
        from llm_engine.parallel.launch import TensorParallel, load_rank_model

        if cfg.tensor_parallel == 1:
            return load_rank_model(cfg, TPGroup(0, 1, self.device), self.dtype, tokenizer=True)
        self.tp = TensorParallel(cfg, self.device, self.dtype)
        return self.tp.model, self.tp.tokenizer

    def close(self) -> None:
        """Stop the tensor-parallel worker ranks (nothing to do otherwise). Idempotent."""
        if self.tp is not None:
            self.tp.close()

    def _size_kv_pool(self) -> int:
        cfg, mc = self.config, self.model_config
        if self.device.type == "cuda":
            budget = cuda_kv_budget_bytes(self.device, cfg.gpu_memory_utilization)
        else:
            budget = cfg.kv_cache_memory_mib * 2**20
        wanted = cfg.max_num_seqs * ((self.max_model_len + cfg.kv_block_size - 1) // cfg.kv_block_size)
        return min(wanted, num_blocks_for_memory(mc, cfg.kv_block_size, self.dtype, budget))

    # ---- requests ----------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def make_sequence(self, request_id: str | None, prompt_token_ids: list[int],
                      params: SamplingParams | None = None) -> Sequence:
        """Validate a request without touching engine state (safe from any thread)."""
        params = params or SamplingParams()
        ids = checked_prompt(prompt_token_ids, self.model_config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(request_id or self.new_request_id(), ids, params, stop_ids)
        self.scheduler.check_fits(seq)
        if params.grammar is not None:  # compile (ValueError if invalid) and start the matcher
            seq.grammar = self.grammar_compiler().new_state(params.grammar)
            if not params.grammar.triggers and params.grammar.max_tokens is not None:
                seq.max_tokens = params.grammar.max_tokens  # a forced grammar has its own budget
        return seq

    @property
    def tool_dialect(self) -> ToolDialect:
        """How this model writes tool calls, from its chat template (llm_engine.tool_format)."""
        ct = getattr(self.tokenizer, "chat_template", None)
        return dialect_for(getattr(ct, "source", None))

    def grammar_compiler(self) -> GrammarCompiler:
        """The grammar compiler for this engine's tokenizer, built on first use (thread-safe)."""
        with self._grammar_lock:
            if self._grammar is None:
                if self.tokenizer is None:
                    raise ValueError("constrained decoding needs a tokenizer")
                self._grammar = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                                sorted(self.eos_token_ids))
            return self._grammar

    def add_request(self, request_id: str | None, prompt_token_ids: list[int],
                    params: SamplingParams | None = None) -> str:
        """Queue a request; raises EngineOverloaded when max_waiting requests wait, ValueError if it can never fit."""
        seq = self.make_sequence(request_id, prompt_token_ids, params)
        self.add_sequence(seq)
        return seq.request_id

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self._seqs:
            raise ValueError(f"request id {seq.request_id!r} is already in flight")
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        stop = StopStringMatcher(seq.params.stop) if seq.params.stop else None
        seq.user = _Request(detok, stop)
        self.scheduler.add(seq)
        self._seqs[seq.request_id] = seq

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; its final output (finish_reason "abort") comes from the next
        step(). Idempotent: False if the request is unknown or already finished."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self._pending.append(self._final(seq, StreamOutput(request_id)))
        return True

    def stop(self) -> list[StreamOutput]:
        """Abort every request, run the step that reports them (each ends with finish_reason "abort"), and close:
        how an engine loop (AsyncLLMEngine's thread, ProcessLLMEngine's process) ends."""
        for rid in list(self._seqs):
            self.abort(rid)
        outs = self.step()
        self.close()  # tensor-parallel workers stop with the engine
        return outs

    def fail_all(self, message: str) -> list[StreamOutput]:
        """End every in-flight request with finish_reason "error" (after an unexpected engine failure)."""
        outs = []
        for seq in list(self._seqs.values()):
            self.scheduler.finish(seq, "error")
            outs.append(self._final(seq, StreamOutput(seq.request_id), error=message))
        return outs

    def has_unfinished(self) -> bool:
        return bool(self._seqs) or bool(self._pending)

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[StreamOutput]:
        outs, self._pending = self._pending, []
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not len(batch):
            return outs
        t_sched = time.perf_counter()
        try:
            sampled = self.runner.run(batch)
        except Exception as e:  # the step failed: end the affected requests, keep the engine alive
            log.error("engine step failed", exc_info=True)
            for seq in batch.seqs:
                if seq.request_id in self._seqs:
                    self.scheduler.finish(seq, "error")
                    outs.append(self._final(seq, StreamOutput(seq.request_id), error=f"{type(e).__name__}: {e}"))
            return outs
        now = time.perf_counter()
        new = self.scheduler.postprocess(batch, sampled)
        n_tokens = 0
        for seq, toks in new:
            if seq.grammar is not None and not seq.is_finished:
                self._advance_grammar(seq, toks)
            if seq.first_token_s is None:
                seq.first_token_s = now
            seq.last_token_s = now
            outs.append(self._emit(seq, toks))
            n_tokens += len(toks)
        self._recent.append((now, n_tokens))
        while self._recent and now - self._recent[0][0] > 5.0:
            self._recent.popleft()
        self._steps += 1
        self._step_seqs += len(batch.seqs)
        t_end = time.perf_counter()
        self._step_s += t_end - t0
        if self._slow_step_s and t_end - t0 > self._slow_step_s:
            self._log_slow_step(batch, t0, t_sched, now, t_end)
        return outs

    def _log_slow_step(self, batch, t0: float, t_sched: float, t_run: float, t_end: float) -> None:
        """What a slow step held and where its time went, at most once a second (the rest are counted)."""
        if t_end - self._slow_logged_s < 1.0:
            self._slow_unlogged += 1
            return
        d = batch.num_decodes
        log.warning("slow engine step: %.0f ms (schedule %.0f, run %.0f, postprocess %.0f ms): %d prefill seq(s), "
                    "%d prefill tokens, %d decode seq(s), %d rows; %d more slow step(s) since the last report",
                    (t_end - t0) * 1e3, (t_sched - t0) * 1e3, (t_run - t_sched) * 1e3, (t_end - t_run) * 1e3,
                    len(batch.seqs) - d, sum(batch.num_tokens[d:]), d, batch.total_tokens, self._slow_unlogged)
        self._slow_logged_s, self._slow_unlogged = t_end, 0

    def _advance_grammar(self, seq: Sequence, toks: list[int]) -> None:
        """The matcher consumes the new tokens (the next step's mask depends on them; a constrained request is never
        drafted, so it is one token); a trigger starts the grammar (and its own token budget); a complete grammar
        ends the request."""
        g = seq.grammar
        first = seq.num_completion_tokens - len(toks) + 1  # completion count after toks[0]
        for j, tok in enumerate(toks):
            if g.accept(tok, first + j) and g.grammar.max_tokens is not None:
                seq.max_tokens = first + j + g.grammar.max_tokens
            if g.error is not None:
                log.warning("request %s: %s", seq.request_id, g.error)
                self.scheduler.finish(seq, "error")
                return
            if g.done:
                self.scheduler.finish(seq, "stop")
                return

    def _emit(self, seq: Sequence, toks: list[int]) -> StreamOutput:
        """The output for a step's new tokens of seq (several after an accepted speculative draft)."""
        out = StreamOutput(seq.request_id, token_ids=list(toks))
        req: _Request = seq.user
        if req.detok is not None:
            hit_stop_id = seq.is_finished and seq.finish_reason == "stop" and toks[-1] in seq.stop_token_ids
            delta = "".join(req.detok.push(t) for t in (toks[:-1] if hit_stop_id else toks))
            if seq.is_finished:
                delta += req.detok.flush()
            if req.stop is not None:
                delta, matched = req.stop.push(delta, final=seq.is_finished)
                if matched and not seq.is_finished:
                    self.scheduler.finish(seq, "stop")
            out.text = delta
            req.text += delta
        if seq.is_finished:
            return self._final(seq, out)
        return out

    def _final(self, seq: Sequence, out: StreamOutput, error: str | None = None) -> StreamOutput:
        self._seqs.pop(seq.request_id, None)
        self.num_finished += 1
        if seq.grammar is not None:  # free the matcher now (the Sequence may outlive the request)
            error = error or seq.grammar.error
            seq.grammar = None
        req: _Request | None = seq.user
        text = req.text if req is not None else ""
        n = seq.num_completion_tokens
        decode = None
        if n > 1 and seq.last_token_s and seq.first_token_s and seq.last_token_s > seq.first_token_s:
            decode = (n - 1) / (seq.last_token_s - seq.first_token_s)
        out.finished = True
        out.result = RequestResult(
            request_id=seq.request_id, prompt_tokens=seq.num_prompt_tokens, completion_tokens=n,
            cached_tokens=seq.num_cached_tokens,
            ttft_s=None if seq.first_token_s is None else seq.first_token_s - seq.arrival_s,
            decode_tok_s=decode, finish_reason=seq.finish_reason or "abort", text=text, error=error,
            draft_tokens=seq.spec.num_drafted if seq.spec else 0,
            accepted_draft_tokens=seq.spec.num_accepted if seq.spec else 0)
        return out

    # ---- warm-up -----------------------------------------------------------------------------------
    def warm_up(self, *, force: bool = False) -> WarmUpReport | None:
        """Run synthetic requests through the real step path (llm_engine.warm_up) so that every Triton kernel
        specialization, cuBLAS / SDPA shape class and lazily loaded CUDA module a server meets is ready before its
        first caller: a few seconds at start-up instead of ~1 s stalls on first use. CUDA only: on CPU (nothing is
        compiled there) it returns None at once, unless force=True (tests). Leaves no trace: every warm-up request
        finished, every KV block free, its prefix-cache entries dropped, stats() counters as before. Needs an idle
        engine (RuntimeError otherwise). Logs at INFO how long it took and how many steps ran."""
        if self.device.type != "cuda" and not force:
            return None
        plan = warm_up_plan(self.model_config.vocab_size, self.config.max_num_seqs, self.max_model_len,
                            self.config.kv_block_size, max_num_batched_tokens=self.config.max_num_batched_tokens,
                            num_kv_blocks=self.block_manager.num_blocks, avoid_token_ids=self.eos_token_ids,
                            seed=self.config.seed)
        report = run_warm_up(self, plan, log)
        log.info("engine warm-up: %d requests in %d steps, %.2f s%s", report.requests, report.steps, report.seconds,
                 f" ({report.errors} failed)" if report.errors else "")
        return report

    # ---- introspection -----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        recent = list(self._recent)
        tok_s = 0.0
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            tok_s = sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           free_blocks=self.block_manager.num_free_blocks,
                           total_blocks=self.block_manager.num_blocks,
                           prefix_hit_tokens=self.block_manager.prefix_hit_tokens, decode_tok_s=tok_s,
                           num_preemptions=self.scheduler.num_preemptions, finished_requests=self.num_finished,
                           spec_draft_tokens=self.spec.num_drafted if self.spec else 0,
                           spec_accepted_tokens=self.spec.num_accepted if self.spec else 0,
                           spec_verifies=self.spec.num_verifies if self.spec else 0,
                           steps=self._steps, step_seconds=self._step_s, step_seqs=self._step_seqs)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[tuple[list[int], RequestResult]]:
        """Run prompts to completion (offline helper): [(completion token ids, result)] in prompt order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        rids = [self.add_request(None, p, sp) for p, sp in zip(prompts, plist, strict=True)]
        toks: dict[str, list[int]] = {r: [] for r in rids}
        results: dict[str, RequestResult] = {}
        while len(results) < len(rids):
            for out in self.step():
                if out.request_id in toks:
                    toks[out.request_id] += out.token_ids
                    if out.result is not None:
                        results[out.request_id] = out.result
        return [(toks[r], results[r]) for r in rids]
