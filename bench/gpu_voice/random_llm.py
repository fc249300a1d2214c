"""A GLM-4-9B-0414-shaped Hugging Face checkpoint directory with RANDOM bf16 weights and a SYNTHETIC tokenizer,
for timing the voice stack with a 9B-class LLM where no such model can be downloaded. Its words are noise; its
timing is real: the real shapes (40 layers, 4096 hidden, 32 query / 2 KV heads, 151,552-token vocabulary), the
real loading path (`voicefast serve --llm-model DIR`: config.json + sharded safetensors), prompts of realistic
token counts, and replies capped at a realistic length by the caller (--max-output-tokens).

The tokenizer is a byte-level BPE trained with `tokenizers` on English text (our docs and the persona) plus
generated pronounceable pseudo-words with punctuation, to exactly the vocabulary size less GLM-4's special
tokens, which take GLM-4's ids (151329 <|endoftext|>, 151331 [gMASK], 151333 <sop>, 151335 <|system|>, 151336
<|user|>, 151337 <|assistant|>, 151338 <|observation|>, the rest reserved). Random token ids therefore decode to
speakable noise ("Bakomi tunelo, ravisu."), so Piper's time per reply is like a real reply's. The chat template is
GLM-4's shape, minimal: [gMASK]<sop><|system|>\\n...<|user|>\\n...<|assistant|>\\n.

    python3 -m bench.gpu_voice.random_llm --out /tmp/vf_glm4_9b --device cuda   (~18.8 GB of safetensors)"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "voicefast_random.json"

# GLM-4-9B-0414 (Glm4ForCausalLM) config values (docs: /work/shared/reference/glm-and-decoding.md; the same
# shape bench/decode_gpu.py measures).
GLM4_9B_0414 = {
    "architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "vocab_size": 151552, "hidden_size": 4096,
    "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2,
    "head_dim": 128, "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1e-05,
    "attention_bias": True, "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu",
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "torch_dtype": "bfloat16",
}
N_SPECIAL = 223  # GLM-4's special tokens occupy the last 223 ids (151329..151551)
SPECIAL_NAMES = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>")
CHAT_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def special_tokens(vocab_size: int) -> list[str]:
    """Names of the ids vocab_size - N_SPECIAL .. vocab_size - 1, GLM-4's order."""
    n = min(N_SPECIAL, vocab_size // 4)
    names = list(SPECIAL_NAMES[:n])
    return names + [f"<|reserved_special_token_{k}|>" for k in range(n - len(names))]


def pseudo_corpus(n_lines: int, seed: int = 0) -> list[str]:
    """Sentences of pronounceable pseudo-words (CV syllables), with commas and sentence ends."""
    rng = random.Random(seed)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS] + [c + v + "n" for c in _CONSONANTS for v in _VOWELS]
    lines = []
    for _ in range(n_lines):
        words = ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
                 for _ in range(rng.randint(4, 14))]
        if len(words) > 6:
            words[rng.randrange(2, len(words) - 2)] += ","
        lines.append(" ".join(words).capitalize() + rng.choice(".....?!"))
    return lines


def english_corpus() -> list[str]:
    """English text from this repository (docs, README, the perplexity text, the persona, the caller prompts)."""
    texts = [p.read_text(errors="ignore") for p in sorted((ROOT / "docs").glob("*.md"))]
    for p in (ROOT / "README.md", ROOT / "bench" / "ppl_text.txt"):
        if p.exists():
            texts.append(p.read_text(errors="ignore"))
    try:
        from bench.voice.prompts import PROMPTS
        from voicefast.persona import DEFAULT_INSTRUCTIONS

        texts += [DEFAULT_INSTRUCTIONS, *PROMPTS]
    except ImportError:
        pass
    return texts


def synthetic_tokenizer(vocab_size: int, *, n_lines: int = 40_000, seed: int = 0):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly vocab_size ids, GLM-4's specials at the end."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = special_tokens(vocab_size)
    target = vocab_size - len(specials)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=target, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(english_corpus() + pseudo_corpus(n_lines, seed), trainer=trainer)
    short = target - tk.get_vocab_size()
    if short > 0:  # the corpus ran out of merges: unused ids keep GLM-4's special ids where they belong
        tk.add_special_tokens([AddedToken(f"<|unused_{k}|>", special=True, normalized=False) for k in range(short)])
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if tk.get_vocab_size() != vocab_size or tk.token_to_id("<|endoftext|>") != target:
        raise RuntimeError(f"synthetic tokenizer has {tk.get_vocab_size()} ids, wanted {vocab_size}")
    return tk


def glm4_config(**overrides) -> dict:
    return {**GLM4_9B_0414, **overrides}


def write_checkpoint(out: str | Path, config: dict, *, device: str = "cpu", seed: int = 0,
                     shard_bytes: int = 4 << 30, n_lines: int = 40_000) -> dict:
    """Write config.json, generation_config.json, tokenizer.json, tokenizer_config.json, the random weights
    (sharded safetensors + index) and a marker file into `out`. Returns the marker's content."""
    import torch
    from safetensors.torch import save_file

    from llm_engine.model_config import ModelConfig
    from llm_engine.parallel.random_checkpoint import RandomCheckpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    V = config["vocab_size"]
    tk = synthetic_tokenizer(V, n_lines=n_lines, seed=seed)
    tk.save(str(out / "tokenizer.json"))
    specials = special_tokens(V)
    eos = [V - len(specials) + specials.index(s) for s in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    cfg = {**config, "eos_token_id": eos, "pad_token_id": eos[0]}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos[0]}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg["max_position_embeddings"]}, indent=1))
    t_tok = time.perf_counter() - t0
    ckpt = RandomCheckpoint(ModelConfig.from_hf_config(cfg), seed=seed)
    shard: dict = {}
    shards: list[dict] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            shards.append({"file": name, "names": list(shard)})
            shard, size = {}, 0

    for name, t in ckpt.tensors(torch.device(device), torch.bfloat16):
        shard[name] = t.cpu()
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the server started next sizes its KV pool from the free GPU memory
    n = len(shards)
    weight_map = {}
    for k, s in enumerate(shards, 1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        (out / s["file"]).rename(out / final)
        weight_map.update({t: final for t in s["names"]})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    marker = {"what": "GLM-4-9B-0414 shape, RANDOM bf16 weights, synthetic byte-level BPE tokenizer: its words are "
                      "noise, its timing is real", "seed": seed, "config": cfg, "weight_bytes": total,
              "tokenizer_s": round(t_tok, 1), "total_s": round(time.perf_counter() - t0, 1)}
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return marker


def ensure_checkpoint(out: str | Path, config: dict | None = None, *, device: str = "cuda", seed: int = 0) -> dict:
    """Reuse `out` if it holds this random checkpoint already (a warm GPU machine keeps /tmp), else write it."""
    config = config or GLM4_9B_0414
    marker = Path(out) / MARKER
    if marker.exists():
        m = json.loads(marker.read_text())
        same = {k: v for k, v in m["config"].items() if k not in ("eos_token_id", "pad_token_id")} == \
            {k: v for k, v in config.items() if k not in ("eos_token_id", "pad_token_id")}
        if same and m.get("seed") == seed:
            return m | {"reused": True}
    return write_checkpoint(out, config, device=device, seed=seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_voice.random_llm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="where the random tensors are drawn (cuda is much faster)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    m = ensure_checkpoint(a.out, device=a.device, seed=a.seed)
    print(json.dumps({k: v for k, v in m.items() if k != "config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
