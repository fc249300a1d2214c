"""Forced tool calls with random argument schemas on the embedded model: how often the arguments are valid JSON for
the schema with schema-constrained decoding, beside two unconstrained baselines.

    python -m bench.tool_calls [--n 200] [--seed 0] [--out FILE.json] [--model PATH]

Each case draws a random tool (objects with enums, integers with ranges, booleans, nested arrays and objects,
required fields), renders it in the model's tool dialect (llm_engine.tool_format; the embedded SmolLM2 has no tool
syntax, so the generic system-prompt format) with a user request, and decodes at the server's defaults
(temperature 0.3, top-p 0.9, seeded per case):
- constrained: tool_choice forcing the tool (the grammar of voicefast's forced call, own budget of 256 tokens);
- free: the same prompt decoded freely, the first <tool_call> parsed out of the reply;
- free+prefix: the call's opening text `<tool_call>{"name": "...", "arguments": ` appended to the prompt so the
  model only has to write the arguments, still free.
Validity = the arguments parse as JSON and jsonschema-validate against the tool's schema as given."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

WORDS = ["red", "blue", "green", "small", "large", "express", "standard", "morning", "evening", "cash", "card",
         "north", "south", "adult", "child", "window", "aisle", "vegan", "classic", "gold", "silver"]
TOOLS = ["book_table", "check_order_status", "schedule_delivery", "reserve_seat", "order_pizza", "rent_bike",
         "create_ticket", "update_address", "transfer_call", "apply_discount"]
PROPS = ["size", "color", "quantity", "day", "guests", "priority", "items", "options", "contact", "notes", "city",
         "zone", "level", "count", "extras", "address"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema: 1-4 properties of mixed kinds, a random required subset."""
    props = {}
    for name in rng.sample(PROPS, rng.randint(1, 4)):
        kind = rng.choice(["enum", "int", "bool", "string", "array", "object"] if depth == 0 else
                          ["enum", "int", "bool", "string"])
        if kind == "enum":
            props[name] = {"type": "string", "enum": rng.sample(WORDS, rng.randint(2, 4))}
        elif kind == "int":
            lo = rng.randint(0, 50)
            props[name] = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 200)}
        elif kind == "bool":
            props[name] = {"type": "boolean"}
        elif kind == "string":
            props[name] = {"type": "string", "maxLength": rng.randint(8, 32)}
        elif kind == "array":
            item = rng.choice([{"type": "string", "enum": rng.sample(WORDS, 3)},
                               {"type": "integer", "minimum": 0, "maximum": 99}, random_schema(rng, depth + 1)])
            props[name] = {"type": "array", "items": item, "minItems": rng.randint(0, 1), "maxItems": rng.randint(2, 4)}
        else:
            props[name] = random_schema(rng, depth + 1)
    required = sorted(rng.sample(sorted(props), rng.randint(1, len(props))))
    return {"type": "object", "properties": props, "required": required}


def make_cases(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        name = rng.choice(TOOLS)
        schema = random_schema(rng)
        cases.append({"i": i, "name": name, "schema": schema,
                      "request": f"Please use {name.replace('_', ' ')} for me with sensible values."})
    return cases


def check(args_text: str | None, schema: dict) -> bool:
    import jsonschema

    if args_text is None:
        return False
    try:
        jsonschema.validate(json.loads(args_text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def first_call_args(text: str, dialect, tool) -> str | None:
    from llm_engine.tool_parser import ToolCallParser

    p = ToolCallParser(dialect, [tool])
    p.push(text)
    p.finish()
    return p.calls[0][1] if p.calls else None


def run(n: int = 200, seed: int = 0, model: str | None = None, modes=("constrained", "free", "free+prefix"),
        engine=None, log=print) -> dict:
    from llm_engine import EngineConfig, LLMEngine, SamplingParams
    from llm_engine.tool_format import Tool
    from voicefast.persona import DEFAULT_INSTRUCTIONS
    from voicefast.tools import FILLERS

    eng = engine or LLMEngine(EngineConfig(model=model, max_num_seqs=8, kv_cache_memory_mib=256, max_waiting=4096))
    tok, dialect = eng.tokenizer, eng.tool_dialect
    cases = make_cases(n, seed)
    out: dict = {"n": n, "seed": seed, "dialect": dialect.name, "modes": {}}
    for mode in modes:
        prompts, params, tools = [], [], []
        for c in cases:
            tool = Tool.make(c["name"], f"Do {c['name'].replace('_', ' ')}", c["schema"])
            msgs = [{"role": "system", "content": DEFAULT_INSTRUCTIONS}, {"role": "user", "content": c["request"]}]
            ids = dialect.render(tok, msgs, [tool])
            grammar = None
            if mode == "constrained":
                grammar = dialect.grammar([tool], choice=tool.name, parallel=False, max_tokens=256, fillers=FILLERS)
            elif mode == "free+prefix":
                ids = ids + tok.encode(dialect.call_prefix(tool))
            prompts.append(ids)
            params.append(SamplingParams(temperature=0.3, top_p=0.9, seed=seed * 100_003 + c["i"],
                                         max_tokens=256, grammar=grammar))
            tools.append(tool)
        t0 = time.perf_counter()
        results = eng.generate(prompts, params)
        wall = time.perf_counter() - t0
        valid = complete = 0
        fails = []
        for c, tool, (_ids, res) in zip(cases, tools, results, strict=True):
            text = res.text
            if mode == "free+prefix":
                args = first_call_args(dialect.call_prefix(tool) + text, dialect, tool)
            else:
                args = first_call_args(text, dialect, tool)
            complete += args is not None
            ok = check(args, c["schema"])
            valid += ok
            if not ok and len(fails) < 5:
                fails.append({"case": c["i"], "finish": res.finish_reason, "text": text[:200]})
        toks = sum(r.completion_tokens for _, r in results)
        out["modes"][mode] = {"valid": valid, "complete_calls": complete, "valid_rate": valid / n,
                              "completion_tokens": toks, "wall_s": round(wall, 1), "examples_of_failures": fails}
        log(f"{mode:12s} valid {valid}/{n} ({100 * valid / n:.1f}%), complete calls {complete}, "
            f"{toks} tokens in {wall:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tool_calls", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="HF checkpoint dir or .gguf (default: embedded SmolLM2)")
    ap.add_argument("--modes", default="constrained,free,free+prefix")
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    args = ap.parse_args(argv)
    res = run(args.n, args.seed, args.model, tuple(args.modes.split(",")))
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
