"""GGUF (llama.cpp) checkpoints: read a `llama`-architecture .gguf with the `gguf` package, dequantize its tensors
(F32, F16, BF16, Q4_0, Q4_1, Q8_0, ... whatever gguf.quants supports) to float32, map tensor names and
llama.* metadata to Hugging Face names and a ModelConfig, and cache the result as safetensors + JSON.

Parsing + dequantizing takes seconds; the cache (default ~/.cache/voicefast/gguf/<key>/, or
$VOICEFAST_CACHE_DIR/gguf/<key>/, key = sha256 of path + size + mtime) loads in well under a second and is
rebuilt whenever the source file changes.

Rotary trap: llama.cpp's converter permutes q/k rows into the interleaved (GPT-J) rotary layout, so the raw
GGUF weights are used as they are, with rope_interleaved=True."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_engine.model_config import ModelConfig

log = logging.getLogger("voicefast.llm_engine")

CACHE_FORMAT = 1  # bump when the cache layout or the name mapping changes
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                   "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                   "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id", "tokenizer.ggml.unknown_token_id",
                   "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                   "tokenizer.ggml.add_eos_token", "tokenizer.chat_template")


def cache_root() -> Path:
    base = os.environ.get("VOICEFAST_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "voicefast"
    return root / "gguf"


def cache_dir_for(path: str | Path) -> Path:
    """The cache directory for this exact file version (absolute path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{CACHE_FORMAT}|{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_root() / key


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} is not supported (llama architecture without extras only)")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _config_from_metadata(reader: Any, tied: bool) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def need(key: str) -> Any:
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return v

    hidden, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // n_heads))
    rot = int(_field(reader, "llama.rope.dimension_count", head_dim))
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:  # older converters: the embedding's row count (GGUF dims are listed fastest-first)
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise ValueError("GGUF has neither llama.vocab_size nor token_embd.weight")
        vocab = int(embd.shape[-1])
    scaling_type = _field(reader, "llama.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported")
    eos = [_field(reader, k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return ModelConfig(
        family="llama", vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
        num_heads=n_heads, num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim, rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)), partial_rotary_factor=rot / head_dim,
        rope_interleaved=True,  # llama.cpp stores q/k rows already permuted for GPT-J-style rotary
        tie_word_embeddings=tied, max_position_embeddings=int(_field(reader, "llama.context_length", 4096)),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), dtype=torch.float32)


def _tokenizer_metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for key in _TOKENIZER_KEYS:
        v = _field(reader, key)
        if v is not None:
            meta[key] = v
    return meta


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Parse and dequantize (slow path, no cache): (config, HF-named float32 state dict, tokenizer metadata)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/struct errors on junk
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    names = {t.name for t in reader.tensors}
    cfg = _config_from_metadata(reader, tied="output.weight" not in names)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}") from e
        # gguf lists dims fastest-first (ne0 = in_features); numpy data is already [out, in].
        shape = tuple(int(d) for d in reversed(t.shape))
        state[_hf_name(t.name)] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # owned copy
    return cfg, state, _tokenizer_metadata(reader)


def ensure_cache(path: str | Path) -> Path:
    """Build (once per file version) and return the cache dir: model.safetensors, model_config.json,
    gguf_tokenizer.json. Written to a temp dir and renamed, so a crash never leaves a half cache."""
    from safetensors.torch import save_file

    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {src} does not exist")
    final = cache_dir_for(src)
    if (final / "model_config.json").exists():
        return final
    log.info("dequantizing %s -> %s (one-time)", src, final)
    cfg, state, tok_meta = read_gguf(src)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"source": str(src.resolve())})
        (tmp / "gguf_tokenizer.json").write_text(json.dumps(tok_meta))
        (tmp / "model_config.json").write_text(json.dumps(cfg.to_json_dict(), indent=1))
        try:
            tmp.rename(final)
        except OSError:  # another process won the race: its cache is as good as ours
            if not (final / "model_config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, HF-named float32 state dict) for a .gguf file, via the dequantized cache."""
    from safetensors.torch import load_file

    d = ensure_cache(path)
    cfg = ModelConfig.from_json_dict(json.loads((d / "model_config.json").read_text()))
    return cfg, load_file(str(d / "model.safetensors"))


def load_gguf_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The tokenizer.* metadata of a .gguf file (tokens, merges, token types, special ids, chat template)."""
    return json.loads((ensure_cache(path) / "gguf_tokenizer.json").read_text())
