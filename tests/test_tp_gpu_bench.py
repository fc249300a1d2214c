"""bench/tp_gpu.py's correctness piece, run on CPU (gloo) at tiny shapes: the same code the 2xH200 command runs —
RandomCheckpoint engines at TP=1 and TP=2, int8 included, logits error and greedy agreement, the records."""

from __future__ import annotations

import pytest

import bench.tp_gpu as tg

TINY = {
    "glm4-9b": dict(tg.SHAPES["glm4-9b"], vocab_size=301, hidden_size=64, intermediate_size=96, num_heads=4,
                    head_dim=16, num_layers=2),
    "llama3-8b": dict(tg.SHAPES["llama3-8b"], vocab_size=300, hidden_size=64, intermediate_size=128, num_heads=4,
                      num_kv_heads=2, head_dim=16),
}


@pytest.mark.slow
def test_check_piece_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(tg, "DEVICE", "cpu")
    monkeypatch.setattr(tg, "DTYPE", "float32")
    monkeypatch.setattr(tg, "SHAPES", TINY)
    monkeypatch.setattr(tg, "CHECKS", [("llama3-8b", "int8"), ("glm4-9b", "fp32")])  # (bf16: test_tensor_parallel)
    recs = tg.piece_check({"device": "cpu", "commit": "test"})
    assert [(r["model"], r["dtype"], r["compute"], r["tp"]) for r in recs] == \
        [("llama3-8b-4layer", "int8", "float32", 2), ("glm4-9b-4layer", "fp32", "float32", 2)]
    for r in recs:  # int8: row-parallel layers are quantized per shard, so TP=2 differs slightly from TP=1
        assert r["ok"], r
        assert 0 < r["logits"]["rel_norm"] < r["rel_norm_tol"] and len(r["greedy"]) == 4
    assert recs[0]["tie_rule"] == "top-2 gap <= 2 ulps of float32 at the top logit or <= 2x the max logits difference"
    assert recs[1]["tie_rule"] == "top-2 gap <= 2 ulps of float32 at the top logit"
    assert recs[1]["rel_norm_tol"] == 1e-4  # float32: the sharding is exact up to the reordered sums
    jsonl = tmp_path / "tp_gpu.jsonl"
    import json

    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tg.summary(str(jsonl))  # the table the command prints last


def test_plan_covers_the_issue_and_fits_the_budget():
    pieces = [tuple(p) for p, _ in tg.PLAN]
    for model, dtype, batch in (("glm4-9b", "bf16", "1"), ("glm4-9b", "bf16", "64"), ("glm4-9b", "int8", "1"),
                                ("glm4-32b", "bf16", "1")):
        for tp in ("1", "2"):
            assert ("perf", model, dtype, tp, batch) in pieces
    assert pieces[0] == ("diag",) and ("check",) in pieces and ("allreduce",) in pieces
    cfg = tg.model_config("glm4-32b")  # GLM-4-32B-0414's config.json
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == \
        (6144, 61, 48, 2, 23040)
    assert tg.BUDGET_S <= 400  # the device call's 7 minutes, with start-up to spare


def test_perf_piece_records_and_table_on_cpu(monkeypatch, tmp_path, capsys):
    import bench.decode_gpu as dg

    monkeypatch.setattr(tg, "DEVICE", "cpu")
    monkeypatch.setattr(tg, "DTYPE", "float32")
    monkeypatch.setattr(tg, "SHAPES", TINY)
    monkeypatch.setattr(dg, "copy_bw_gbs", lambda: 100.0)
    monkeypatch.setattr(tg, "graph_step_ms", lambda runner, b, ctx: 2.0)  # CPU runners have no CUDA graphs
    (rec,) = tg.piece_perf("glm4-9b", "bf16", 1, 2, {"device": "cpu", "commit": "test"})
    assert rec["tp"] == 1 and rec["batch"] == 2 and rec["tok_s"] > 0 and rec["graph_tok_s"] == 1000.0
    assert rec["limit_tok_s"] == pytest.approx(2 * 100e9 / rec["bytes_per_token_per_gpu"])
    jsonl = tmp_path / "tp_gpu.jsonl"
    jsonl.write_text(__import__("json").dumps(rec) + "\n")
    tg.summary(str(jsonl))
    assert "glm4-9b     bf16   1   2" in capsys.readouterr().out


def test_after_a_one_shot_hang_the_later_tp2_pieces_run_on_nccl_alone():
    perf2, perf1 = ["perf", "glm4-9b", "bf16", "2", "1"], ["perf", "glm4-9b", "bf16", "1", "1"]
    assert tg.plan_piece(perf2, False) == (perf2, True) and tg.plan_piece(["check"], False) == (["check"], True)
    assert tg.plan_piece(perf2, True) == ([*perf2, "nccl"], False)
    assert tg.plan_piece(["check"], True) == (["check", "nccl"], False)
    assert tg.plan_piece(perf1, True) == (perf1, False)  # TP=1 has no all-reduce
    assert tg.plan_piece([*perf2, "nccl"], False) == ([*perf2, "nccl"], False)
    assert tg.plan_piece(["diag"], True) == (["diag"], False)
