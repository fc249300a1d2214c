"""The whole voice stack on a GPU host (issue 14): staging the packages and models a bare GPU machine lacks
(stage.py), host-side measurements (asr_host.py), the run itself (run.py: `voicefast serve` + `voicefast bench
voice` at 1..64 callers with CPU/GPU/engine sampling), the GLM-4-9B-shaped random checkpoint (random_llm.py), the
merged report (report.py) and the device call plan (plan.py). Nothing here is imported by voicefast itself.

stage.py must run on the GPU machine's bare Python (standard library only), before anything is installed."""
