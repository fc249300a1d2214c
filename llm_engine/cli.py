"""`voicefast chat` and `voicefast generate`: the engine from a terminal, streaming text as it decodes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from llm_engine.outputs import RequestResult


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="HF checkpoint dir or .gguf (default: embedded SmolLM2-135M)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="auto: float32 on CPU, bfloat16 on CUDA (bfloat16 is ~2x faster on CPUs with AVX512-BF16)")
    ap.add_argument("--stats", action="store_true", help="print TTFT and decode tok/s to stderr at the end")
    ap.add_argument("--json-schema", metavar="FILE", default=None,
                    help="constrain the output to one JSON instance of the JSON Schema in FILE")


def _engine(args: argparse.Namespace):
    from llm_engine.config import EngineConfig
    from llm_engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=1,
                                  kv_cache_memory_mib=128))


def _params(args: argparse.Namespace):
    from llm_engine.sampling_params import SamplingParams

    schema = None
    if args.json_schema is not None:
        import json
        from pathlib import Path

        try:
            schema = json.loads(Path(args.json_schema).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--json-schema {args.json_schema}: {e}") from None
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, json_schema=schema)


def stream_text(engine, prompt_token_ids: list[int], params) -> Iterator[str | RequestResult]:
    """Text deltas of one request, then its RequestResult."""
    rid = engine.add_request(None, prompt_token_ids, params)
    try:
        while True:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                if out.text:
                    yield out.text
                if out.finished:
                    yield out.result
                    return
    finally:
        engine.abort(rid)  # no-op once finished; frees blocks on Ctrl-C


def _print_stream(engine, ids: list[int], params, show_stats: bool) -> str:
    text = ""
    for item in stream_text(engine, ids, params):
        if isinstance(item, RequestResult):
            if show_stats:
                tps = f"{item.decode_tok_s:.1f}" if item.decode_tok_s else "-"
                print(f"[{item.completion_tokens} tokens, ttft {1000 * (item.ttft_s or 0):.0f} ms, "
                      f"{tps} tok/s, {item.finish_reason}]", file=sys.stderr)
            if item.finish_reason == "error":
                print(f"error: {item.error}", file=sys.stderr)
        else:
            text += item
            sys.stdout.write(item)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text


def generate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="voicefast generate", description="One completion, streamed to stdout.")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    ap.add_argument("--system", default=None, help="system prompt (with --chat)")
    _common(ap)
    args = ap.parse_args(argv)
    try:
        params = _params(args)
        engine = _engine(args)
        tok = engine.tokenizer
        if args.chat:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            ids = tok.apply_chat_template(msgs + [{"role": "user", "content": args.prompt}])
        else:
            ids = tok.encode(args.prompt)
        _print_stream(engine, ids, params, args.stats)
    except (ValueError, FileNotFoundError) as e:
        print(f"voicefast generate: {e}", file=sys.stderr)
        return 2
    return 0


def chat_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="voicefast chat", description="Interactive streaming chat. "
                                 "Type a message; 'exit', 'quit' or EOF (Ctrl-D) ends.")
    ap.add_argument("--system", default="You are a helpful, concise assistant.")
    _common(ap)
    args = ap.parse_args(argv)
    try:
        params = _params(args)
        engine = _engine(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"voicefast chat: {e}", file=sys.stderr)
        return 2
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        line = line.strip()
        if line in ("exit", "quit"):
            break
        if not line:
            continue
        history.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write("assistant> ")
        try:
            reply = _print_stream(engine, engine.tokenizer.apply_chat_template(history), params, args.stats)
        except ValueError as e:  # e.g. the conversation outgrew max_model_len: drop the oldest turns
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
    return 0
