"""Where an eager prefill step's host work goes: operations per step, by phase, for 1 / 8 / 32 sequences.

Counted with torch's own interposition, no profiler: `torch` = calls from Python into torch (TorchFunctionMode;
each crosses into C++ and, for every dispatched op, drops and retakes the GIL — what a GIL contended by ASR / TTS
threads turns into waits), metadata reads (.shape, .stride(), .data_ptr(), ...) left out; `aten` = operators
dispatched (TorchDispatchMode, those inside composite ops included: about one device kernel or allocation each);
`triton` = Triton kernel launches; `host_reads` = calls that read device values back on the host (.item(),
.tolist(), bool/int/float of a tensor, .cpu(), .numpy()): each is a full device sync on CUDA.

Phases: the runner's stages (prepare_inputs, forward, compute_logits, sample, to_host); inside forward,
`attention` (qkv_proj, rotary + KV store, o_proj), `attn_core` (ops.paged_attention itself) and `mlp`; the rest of
forward (embedding, fused norms + residual adds) stays `forward`.

On a CPU the counter runs the CUDA step's code path (ops.kernels_on_cpu) with Triton launches counted but not
executed, on a model with SmolLM2-135M's structure (30 layers, 9 query / 3 KV heads) and tiny widths: the counts
depend on the structure, not the widths. bench/prefill_gpu.py counts the real thing on a GPU with the same class.

    python3 -m bench.prefill_ops [--json out.json]"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_METADATA = {"__get__", "stride", "size", "dim", "data_ptr", "element_size", "numel", "is_contiguous",
             "storage_offset", "__len__", "untyped_storage", "get_device", "is_floating_point", "__hash__",
             "__format__", "__repr__"}
_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
RUNNER_PHASES = ("prepare_inputs", "forward", "compute_logits", "apply_grammar", "sample", "to_host")


class OpCounter:
    """`with OpCounter() as c:` counts every torch call / aten op / Triton launch into c.counts[phase][kind]; attach
    it to an engine runner and model with `instrument` for the phases. skip_triton: launches are counted but not
    run (CPU counting of the CUDA path: outputs are garbage, counts are exact)."""

    def __init__(self, skip_triton: bool = False):
        self.skip_triton = skip_triton
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self._stack = ["step"]
        self._es: ExitStack | None = None

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[self._stack[-1]][kind] += n

    @contextmanager
    def phase(self, name: str):
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    def reset(self) -> None:
        self.counts.clear()

    def __enter__(self) -> OpCounter:
        from triton.runtime.jit import KernelInterface

        counter = self
        orig = KernelInterface.__getitem__

        def getitem(kernel, grid):
            launch = orig(kernel, grid)

            def run(*a, **kw):
                counter.add("triton")
                return None if counter.skip_triton else launch(*a, **kw)
            return run

        self._es = es = ExitStack()
        KernelInterface.__getitem__ = getitem
        es.callback(setattr, KernelInterface, "__getitem__", orig)
        es.enter_context(_Functions(self))
        es.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._es.close()

    def per_phase(self) -> dict[str, dict[str, int]]:
        return {p: dict(c) for p, c in sorted(self.counts.items())}

    def totals(self) -> dict[str, int]:
        tot: Counter = Counter()
        for c in self.counts.values():
            tot.update(c)
        return dict(tot)


class _Functions(TorchFunctionMode):
    def __init__(self, c: OpCounter):
        super().__init__()
        self.c = c

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.c.add("host_reads")
        if name not in _METADATA:
            self.c.add("torch")
        return func(*args, **(kwargs or {}))


class _Dispatch(TorchDispatchMode):
    def __init__(self, c: OpCounter):
        super().__init__()
        self.c = c

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in _ATEN_METADATA:
            self.c.add("aten")
        return func(*args, **(kwargs or {}))


_ATEN_METADATA = {torch.ops.aten.sym_size, torch.ops.aten.sym_stride, torch.ops.aten.sym_numel,
                  torch.ops.aten.sym_storage_offset, torch.ops.aten.is_contiguous}


def instrument(counter: OpCounter, runner, model) -> None:
    """Phase attribution: wraps the runner's stage methods (instance attributes: the class is untouched) and hooks
    each decoder layer's self_attn / mlp and llm_engine.ops.paged_attention. Lasts for the process (bench only)."""
    from llm_engine import ops

    def wrap(name, fn):
        def run(*a, **kw):
            with counter.phase(name):
                return fn(*a, **kw)
        return run

    for name in RUNNER_PHASES:
        setattr(runner, name, wrap(name, getattr(runner, name)))
    if not getattr(ops.paged_attention, "_counted", False):
        ops.paged_attention = wrap("attn_core", ops.paged_attention)
        ops.paged_attention._counted = True
    def enter(name):
        def hook(module, args) -> None:
            counter._stack.append(name)
        return hook

    def leave(module, args, output) -> None:  # (returns None: a forward hook's return value replaces the output)
        counter._stack.pop()

    for layer in model.model.layers:
        for name, mod in (("attention", layer.self_attn), ("mlp", layer.mlp)):
            mod.register_forward_pre_hook(enter(name))
            mod.register_forward_hook(leave)


# ---------------------------------------------------------------- the prefill steps measured (shared with prefill_gpu)

def make_engine(model, device: str, *, max_num_seqs: int = 64, budget: int = 8192, num_kv_blocks: int | None = None,
                block_size: int = 16, max_model_len: int = 2048):
    """An engine as `voicefast serve` runs it, except a token budget that fits 32 x 200 new tokens in one step."""
    from llm_engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(device=device, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                  kv_block_size=block_size, num_kv_blocks=num_kv_blocks,
                                  max_model_len=max_model_len, speculative_tokens=0), model=model)


class PrefillSteps:
    """Steps that prefill n sequences at once: `cached` tokens of a shared prefix already in the prefix cache plus
    `new` fresh random tokens each (so nothing past the prefix hits the cache), sampled like the server (temperature
    0.3, top-p 0.9) for one token, so each request ends in that step. `step(n, cached, new)` runs one and returns
    (wall seconds of LLMEngine.step(), tokens the step computed)."""

    def __init__(self, eng, seed: int = 0):
        from llm_engine import SamplingParams

        self.eng = eng
        self.rng = random.Random(seed)
        self.vocab = eng.model_config.vocab_size
        self.sp = SamplingParams(temperature=0.3, top_p=0.9, max_tokens=1, ignore_eos=True)
        self._prefixes: dict[int, list[int]] = {}
        self.last_tokens = 0
        inner = eng.runner.run

        def run(batch):
            self.last_tokens = batch.total_tokens
            return inner(batch)
        eng.runner.run = run

    def _rand(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab - 8) for _ in range(n)]

    def prefix(self, cached: int) -> list[int]:
        if cached and cached not in self._prefixes:
            p = self._rand(cached)
            self._prefixes[cached] = p
            self.eng.add_request(None, p + self._rand(1), self.sp)  # registers the prefix's full blocks
            while self.eng.has_unfinished():
                self.eng.step()
        return self._prefixes.get(cached, [])

    def step(self, n: int, cached: int, new: int) -> tuple[float, int]:
        import time

        pre = self.prefix(cached)
        for _ in range(n):
            self.eng.add_request(None, pre + self._rand(new), self.sp)
        if self.eng.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.eng.step()
        dt = time.perf_counter() - t0
        tokens = self.last_tokens
        while self.eng.has_unfinished():  # (a step that could not take them all: finish, report the tokens)
            self.eng.step()
        return dt, tokens


CASES = [(1, 176, 24), (8, 176, 24), (32, 176, 24), (1, 0, 200), (8, 0, 200), (32, 0, 200)]


def count_cases(eng, steps: PrefillSteps, counter: OpCounter, cases=CASES) -> list[dict]:
    """Ops of one step per case (the step after an uncounted one of the same shape)."""
    rows = []
    for n, cached, new in cases:
        with counter:
            steps.step(n, cached, new)
            counter.reset()
            _, tokens = steps.step(n, cached, new)
        per = counter.per_phase()
        layers = eng.model_config.num_layers
        in_layers = sum(per.get(p, {}).get("torch", 0) for p in ("attention", "attn_core", "mlp"))
        rows.append({"seqs": n, "cached": cached, "new": new, "tokens": tokens, "totals": counter.totals(),
                     "torch_per_layer": round(in_layers / layers, 1), "phases": per})
    return rows


def smollm2_structure(hidden: int = 72, vocab: int = 512):
    """SmolLM2-135M's structure (30 layers, 9 / 3 heads, tied embeddings) at tiny widths, random weights (CPU)."""
    from llm_engine.model_config import ModelConfig
    from llm_engine.models import build_model
    from llm_engine.models.weights import init_random_weights

    cfg = ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=hidden // 9 * 2, rope_theta=100000.0,
                      tie_word_embeddings=True, max_position_embeddings=2048)
    return init_random_weights(build_model(cfg), seed=0)


def print_rows(rows: list[dict], label: str) -> None:
    for r in rows:
        t = r["totals"]
        att = r["phases"].get("attn_core", {})
        print(f"{label:>8} {r['seqs']:>3} seqs x ({r['cached']:>3} cached + {r['new']:>3} new): "
              f"torch {t.get('torch', 0):>6}  aten {t.get('aten', 0):>6}  triton {t.get('triton', 0):>4}  "
              f"host reads {t.get('host_reads', 0):>3}  | attention core torch {att.get('torch', 0):>5}  "
              f"per layer torch {r['torch_per_layer']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the per-phase counts here")
    a = ap.parse_args(argv)
    from llm_engine import ops
    from llm_engine.kernels import set_prefill_attention_backend
    from llm_engine.pinned_upload import PinnedUpload

    torch.set_num_threads(2)
    model = smollm2_structure()
    eng = make_engine(model, "cpu", num_kv_blocks=4096)
    up = PinnedUpload("cpu")  # the GPU runner's packed upload (its views are counted as on CUDA)
    eng.runner._upload = up.upload
    steps = PrefillSteps(eng)
    counter = OpCounter(skip_triton=True)
    instrument(counter, eng.runner, model)
    out = {}
    with ops.kernels_on_cpu():
        for backend in ("sdpa", "triton"):
            set_prefill_attention_backend(backend)
            out[backend] = count_cases(eng, steps, counter)
            print_rows(out[backend], backend)
    set_prefill_attention_backend("triton")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
