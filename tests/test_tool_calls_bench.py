"""The forced-tool-call benchmark (bench/tool_calls.py) on a few random schemas with the embedded model: every
constrained call completes and validates against its schema (the full >= 200-case run is the benchmark)."""

import pytest

from bench.tool_calls import check, make_cases, run


def test_random_schemas_cover_the_promised_kinds():
    kinds = set()

    def walk(s):
        kinds.add(s.get("type") + ("-enum" if "enum" in s else "") + ("-range" if "maximum" in s else ""))
        for v in s.get("properties", {}).values():
            walk(v)
        if "items" in s:
            walk(s["items"])

    for c in make_cases(40, seed=0):
        walk(c["schema"])
        assert c["schema"]["required"]
    assert {"object", "string-enum", "integer-range", "array", "boolean"} <= kinds
    assert check('{"a": 1}', {"type": "object", "required": ["a"]})
    assert not check('{"a": 1', {"type": "object"}) and not check(None, {"type": "object"})


@pytest.mark.slow
def test_constrained_forced_calls_are_all_valid():
    res = run(n=10, seed=1, modes=("constrained",), log=lambda *_: None)
    m = res["modes"]["constrained"]
    assert m["valid"] == m["complete_calls"] == 10, m["examples_of_failures"]
