"""`voicefast` console script. Each subcommand lives in its own module and is imported lazily, so
`voicefast models` does not load torch and `voicefast chat` does not load the audio stack."""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", help). Each function takes argv (list[str]) and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("voicefast.serve:main", "start the WebSocket server and the browser demo"),
    "chat": ("llm_engine.cli:chat_main", "interactive text chat with the LLM engine (streaming)"),
    "generate": ("llm_engine.cli:generate_main", "one completion: voicefast generate --prompt ..."),
    "models": ("voicefast.cli:models_main", "show which model each stage uses and where it comes from"),
    "bench": ("bench.cli:main", "benchmarks: bench voice | engine | asr | tts"),
}


def models_main(argv: list[str]) -> int:
    import argparse

    from voicefast.assets import STAGES, Asset, describe_models

    ap = argparse.ArgumentParser(prog="voicefast models", description=models_main.__doc__)
    for stage in STAGES:
        ap.add_argument(f"--{stage}", metavar="PATH", help=f"user-supplied {stage} model to check instead")
    args = ap.parse_args(argv)
    failed = False
    for stage, res in describe_models(vars(args)):
        if isinstance(res, Asset):
            print(f"{stage.upper():4} {res.description}\n     path:    {res.path}\n"
                  f"     source:  {res.source}  (license: {res.license})")
        else:
            failed = True
            print(f"{stage.upper():4} MISSING: {res}")
    return 1 if failed else 0


models_main.__doc__ = ("For each stage (VAD, end-of-turn, ASR, LLM, TTS): the model it will use and where it comes "
                       "from.")


def _usage() -> str:
    lines = ["usage: voicefast <command> [options]", "", "commands:"]
    lines += [f"  {name:10} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from voicefast import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"voicefast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[name]
    mod_name, fn_name = target.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        print(f"voicefast {name}: not available in this build ({e})", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
