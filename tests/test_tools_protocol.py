"""Function calling at the protocol/session layer (fakes, no sockets): tool settings and their errors, function_call
output items and their events, function_call_output items, budgets, cancellation, and context trimming."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import FakeEngine
from test_session import Harness

from llm_engine.tool_format import ToolDialect
from voicefast.config import ServerConfig
from voicefast.conversation import Conversation, Item
from voicefast.errors import ProtocolError

pytestmark = pytest.mark.anyio

ORDER_TOOL = {"type": "function", "name": "check_order_status", "description": "Look up an order",
              "parameters": {"type": "object", "properties": {"order_number": {"type": "string"}},
                             "required": ["order_number"]}}
BOOK_TOOL = {"type": "function", "name": "book_slot", "description": "Book a fitting",
             "parameters": {"type": "object", "properties": {"day": {"type": "string", "enum": ["mon", "tue"]},
                                                             "people": {"type": "integer", "minimum": 1}},
                            "required": ["day"]}}
CALL = '<tool_call>{"name": "check_order_status", "arguments": {"order_number": "A1234"}}</tool_call>'
# Arguments of 20 words: at 0.1 s a word they stream for ~2 s, so a cancel or barge-in lands inside the call.
SLOW_CALL = '<tool_call>{"name": "check_order_status", "arguments": {"order_number": "' + \
    " ".join(f"w{i}" for i in range(20)) + '"}}</tool_call>'


@pytest.fixture
def anyio_backend():
    return "asyncio"


def tool_harness(reply=None, *, modality="text", token_s=0.001, **session):
    eng = FakeEngine(reply or (lambda msgs: CALL), token_s=token_s)
    h = Harness(engine=eng, opts=ServerConfig(output_lead_ms=100, tool_call_max_tokens=200))
    h.send("session.update", session={"type": "realtime", "output_modalities": [modality], "tools": [ORDER_TOOL],
                                      "audio": {"input": {"turn_detection": None}}, **session})
    return h, eng


def errors_for(h, type_, **data) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        h.send(type_, **data)
    return e.value


# ---------------------------------------------------------------- settings

async def test_session_update_echoes_tools_ga_and_beta():
    h, _ = tool_harness(tool_choice={"type": "function", "name": "check_order_status"}, parallel_tool_calls=False)
    s = h.of("session.updated")[-1]["session"]
    assert s["tools"] == [ORDER_TOOL]
    assert s["tool_choice"] == {"type": "function", "name": "check_order_status"}
    assert s["parallel_tool_calls"] is False
    b = Harness(beta=True)
    b.send("session.update", session={"tools": [BOOK_TOOL], "tool_choice": "required"})
    s = b.of("session.updated")[-1]["session"]
    assert s["tools"][0]["name"] == "book_slot" and s["tool_choice"] == "required"


@pytest.mark.parametrize("session, param", [
    ({"tools": {"name": "x"}}, "session.tools"),
    ({"tools": [{"type": "code_interpreter", "name": "x"}]}, "session.tools[0].type"),
    ({"tools": [{"type": "function"}]}, "session.tools[0].name"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "session.tools[0].name"),
    ({"tools": [ORDER_TOOL, ORDER_TOOL]}, "session.tools[1].name"),
    ({"tools": [{**ORDER_TOOL, "parameters": "{}"}]}, "session.tools[0].parameters"),
    ({"tools": [{**ORDER_TOOL, "parameters": {"type": "string"}}]}, "session.tools[0].parameters"),
    ({"tools": [{**ORDER_TOOL, "parameters": {"type": "object", "properties": {"n": {"type": "integr"}}}}]},
     "session.tools[0].parameters"),
    ({"tools": [ORDER_TOOL], "tool_choice": "sometimes"}, "session.tool_choice"),
    ({"tools": [ORDER_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "session.tool_choice"),
    ({"tools": [ORDER_TOOL], "tool_choice": {"type": "function"}}, "session.tool_choice.name"),
    ({"tool_choice": "required"}, "session.tool_choice"),
    ({"tools": [ORDER_TOOL], "parallel_tool_calls": "yes"}, "session.parallel_tool_calls"),
])
async def test_bad_tool_settings_are_errors_and_change_nothing(session, param):
    h = Harness()
    before = h.session.cfg.to_dict(beta=False)
    e = errors_for(h, "session.update", session={"type": "realtime", "instructions": "changed", **session})
    assert e.param == param, e.message
    assert h.session.cfg.to_dict(beta=False) == before  # not half applied


async def test_response_create_validates_its_tool_overrides():
    h, _ = tool_harness()
    e = errors_for(h, "response.create", response={"tool_choice": {"type": "function", "name": "nope"}})
    assert e.param == "response.tool_choice"
    e = errors_for(h, "response.create", response={"tools": [{"type": "function", "name": 3}]})
    assert e.param == "response.tools[0].name"
    assert h.session.active is None


# ---------------------------------------------------------------- calls in responses

async def test_forced_call_streams_a_function_call_item_and_completes():
    h, eng = tool_harness(tool_choice="required")
    h.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "Where is A1234?"}]})
    h.send("response.create")
    done = (await h.wait_for("response.done"))["response"]
    assert done["status"] == "completed"
    assert [o["type"] for o in done["output"]] == ["function_call"]  # a call-only response: no message item
    call = done["output"][0]
    assert call["name"] == "check_order_status" and call["status"] == "completed"
    assert json.loads(call["arguments"]) == {"order_number": "A1234"}
    added = [e for e in h.of("response.output_item.added")]
    assert len(added) == 1 and added[0]["item"]["type"] == "function_call" and added[0]["output_index"] == 0
    assert added[0]["item"]["call_id"] == call["call_id"]
    deltas = h.of("response.function_call_arguments.delta")
    assert len(deltas) > 1 and "".join(d["delta"] for d in deltas) == call["arguments"]
    assert all(d["call_id"] == call["call_id"] and d["item_id"] == call["id"] for d in deltas)
    args_done = h.of("response.function_call_arguments.done")[0]
    assert args_done["name"] == "check_order_status" and args_done["arguments"] == call["arguments"]
    t = h.types()
    assert t.index("response.output_item.added") < t.index("response.function_call_arguments.delta") < \
        t.index("response.function_call_arguments.done") < t.index("response.output_item.done") < \
        t.index("response.done")
    assert not h.of("response.content_part.added")
    # the engine got a forced grammar with the call's own budget, and the tools to render
    params, tools = eng.params[done["id"]]
    assert params.grammar is not None and params.grammar.triggers == () and params.grammar.max_tokens == 200
    assert "Let me check that." in params.grammar.lark  # a forced call may open with a filler phrase
    assert [t.name for t in tools] == ["check_order_status"]
    assert h.session.conv.find(call["id"]).type == "function_call"


async def test_speak_then_call_in_audio_exposes_the_call_before_the_audio_ends():
    h, eng = tool_harness(lambda msgs: "Let me check that for you. " + CALL, modality="audio")
    h.send("response.create")
    done = (await h.wait_for("response.done", timeout_s=20))["response"]
    assert [o["type"] for o in done["output"]] == ["message", "function_call"]
    assert done["output"][0]["content"][0]["transcript"] == "Let me check that for you."
    t = h.types()
    assert t.index("response.function_call_arguments.done") < t.index("response.output_audio.done")
    call_added = [e for e in h.of("response.output_item.added") if e["item"]["type"] == "function_call"][0]
    assert call_added["output_index"] == 1
    params, _ = eng.params[done["id"]]
    assert params.grammar.triggers == ("<tool_call>",)  # auto: lazy, from the call opener on
    assert params.max_tokens == h.session.cfg.max_output_tokens


async def test_call_cut_by_its_budget_leaves_no_half_call():
    h, eng = tool_harness(lambda msgs: "Let me check. " + CALL)
    h.send("response.create", response={"max_output_tokens": 7})  # the fake stops mid-arguments
    done = (await h.wait_for("response.done"))["response"]
    assert done["status"] == "incomplete" and done["status_details"]["reason"] == "max_output_tokens"
    assert [o["type"] for o in done["output"]] == ["message"]
    dropped = [e for e in h.of("response.output_item.done") if e["item"]["type"] == "function_call"]
    assert dropped and dropped[0]["item"]["status"] == "incomplete"
    assert h.of("conversation.item.deleted")[0]["item_id"] == dropped[0]["item"]["id"]
    assert not h.of("response.function_call_arguments.done")
    assert all(it.type != "function_call" for it in h.session.conv.items)


async def test_cancel_during_a_call_drops_it_cleanly():
    h, eng = tool_harness(lambda msgs: SLOW_CALL, token_s=0.1, tool_choice="required")
    h.send("response.create")
    await h.wait_for("response.function_call_arguments.delta")
    h.send("response.cancel")
    done = (await h.wait_for("response.done"))["response"]
    assert done["status"] == "cancelled" and done["output"] == []
    assert all(it.type != "function_call" for it in h.session.conv.items)
    assert done["id"] in eng.aborted  # the engine request was aborted (its blocks freed)
    assert h.session.active is None


# ---------------------------------------------------------------- outputs and the next response

async def test_function_call_output_round_trip_and_errors():
    h, eng = tool_harness(tool_choice="required")
    h.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "Where is A1234?"}]})
    h.send("response.create")
    call = (await h.wait_for("response.done"))["response"]["output"][0]
    n = len(h.session.conv.items)
    e = errors_for(h, "conversation.item.create", item={"type": "function_call_output", "call_id": "call_nope",
                                                        "output": "{}"})
    assert e.param == "item.call_id" and "call_nope" in e.message
    e = errors_for(h, "conversation.item.create", item={"type": "function_call_output", "call_id": call["call_id"]})
    assert e.param == "item.output"
    assert len(h.session.conv.items) == n  # nothing half added
    h.send("conversation.item.create", item={"type": "function_call_output", "call_id": call["call_id"],
                                             "output": json.dumps({"status": "shipped", "arrives": "Friday"})})
    added = h.of("conversation.item.added")[-1]["item"]
    assert added["type"] == "function_call_output" and added["call_id"] == call["call_id"]
    assert h.of("conversation.item.done")[-1]["item"]["id"] == added["id"]
    e = errors_for(h, "conversation.item.create", item={"type": "function_call_output", "call_id": call["call_id"],
                                                        "output": "again"})
    assert "already has an output" in e.message
    eng.reply = lambda msgs: "Your order has shipped and arrives on Friday."
    h.send("response.create", response={"tool_choice": "auto"})
    done = (await h.wait_for("response.done", 2))["response"]
    assert done["status"] == "completed" and done["output"][0]["type"] == "message"
    msgs = eng.requests[-1][1]
    calls = [m for m in msgs if m.get("tool_calls")]
    results = [m for m in msgs if m["role"] == "tool"]
    assert calls[0]["tool_calls"][0]["id"] == call["call_id"]
    assert results[0]["tool_call_id"] == call["call_id"] and "shipped" in results[0]["content"]
    assert msgs.index(calls[0]) < msgs.index(results[0])


async def test_client_created_function_call_items():
    h, eng = tool_harness()
    h.send("conversation.item.create", item={"type": "function_call", "call_id": "c1", "name": "check_order_status",
                                             "arguments": '{"order_number": "B2"}'})
    assert h.of("conversation.item.added")[-1]["item"]["type"] == "function_call"
    e = errors_for(h, "conversation.item.create", item={"type": "function_call", "call_id": "c2",
                                                        "name": "check_order_status", "arguments": "{not json"})
    assert e.param == "item.arguments"
    e = errors_for(h, "conversation.item.create", item={"type": "function_call", "call_id": "c1", "name": "x"})
    assert e.param == "item.call_id"
    h.send("conversation.item.create", item={"type": "function_call_output", "call_id": "c1", "output": "lost"})
    h.send("response.create")
    await h.wait_for("response.done")
    assert any(m["role"] == "tool" and m["content"] == "lost" for m in eng.requests[-1][1])


# ---------------------------------------------------------------- context trimming

def test_trimming_drops_a_call_and_its_output_together():
    conv = Conversation()
    conv.items += [Item("u1", "user", "old question " * 5),
                   Item("c1", "assistant", type="function_call", call_id="k1", name="f", arguments='{"a": 1}'),
                   Item("o1", "tool", "result " * 20, type="function_call_output", call_id="k1", name="f"),
                   Item("a1", "assistant", "answer"),
                   Item("c2", "assistant", type="function_call", call_id="k2", name="f", arguments="{}"),  # pending
                   Item("o9", "tool", "orphan", type="function_call_output", call_id="gone", name="f"),
                   Item("u2", "user", "new question")]
    words = lambda s: len(s.split())  # noqa: E731
    full = conv.messages("sys", count_tokens=words, max_prompt_tokens=1000)
    assert [m["role"] for m in full] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert full[2]["tool_calls"][0]["id"] == "k1" and full[3]["tool_call_id"] == "k1"
    assert all("orphan" not in m["content"] for m in full)  # orphan output and pending call left out
    tight = conv.messages("sys", count_tokens=words, max_prompt_tokens=30)
    roles = [m["role"] for m in tight]
    assert "tool" not in roles and not any(m.get("tool_calls") for m in tight)  # both left together
    assert tight[-1]["content"] == "new question"


def test_generic_dialect_renders_calls_and_results():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is A1?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "k", "name": "check_order_status",
                                                                 "arguments": '{"order_number": "A1"}'}]},
            {"role": "tool", "tool_call_id": "k", "name": "check_order_status", "content": '{"status": "shipped"}'}]
    from llm_engine.tool_format import Tool
    out = ToolDialect().template_messages(msgs, [Tool.make("check_order_status")])
    assert "<tool_call>" in out[0]["content"] and out[0]["content"].startswith("Be brief.")
    assert out[2]["content"] == '<tool_call>{"name": "check_order_status", "arguments": {"order_number": "A1"}}' \
                                '</tool_call>'
    assert out[3] == {"role": "user", "content": "The check_order_status tool says: status is shipped. "
                                                 "Now answer my question in one sentence."}


async def test_output_sent_while_the_filler_still_plays():
    """docs/server.md's flow: the client answers at arguments.done, before response.done, then asks again."""
    filler = "Let me check that for you, it will only take a moment while I look it up in our system. "
    h, eng = tool_harness(lambda msgs: filler + CALL, modality="audio", tool_choice="required")
    h.send("response.create")
    args_done = await h.wait_for("response.function_call_arguments.done")  # the filler's audio is still playing
    h.send("conversation.item.create", item={"type": "function_call_output", "call_id": args_done["call_id"],
                                             "output": '{"status": "shipped"}'})
    first = (await h.wait_for("response.done", timeout_s=20))["response"]
    assert first["status"] == "completed" and [o["type"] for o in first["output"]] == ["message", "function_call"]
    eng.reply = lambda msgs: "It has shipped."
    h.send("response.create", response={"tool_choice": "auto"})
    second = (await h.wait_for("response.done", 2, timeout_s=20))["response"]
    assert second["status"] == "completed"
    types = [it.type for it in h.session.conv.items]
    assert types == ["message", "function_call", "function_call_output", "message"]


async def test_beta_client_gets_the_same_call_events_in_beta_shapes():
    eng = FakeEngine(lambda msgs: CALL, token_s=0.001)
    h = Harness(beta=True, engine=eng)
    h.send("session.update", session={"modalities": ["text"], "tools": [ORDER_TOOL], "tool_choice": "required",
                                      "turn_detection": None})
    h.send("response.create")
    await h.wait_for("response.done")
    frames = [json.loads(f) for e in h.events for f in h.proto.events_to_send(e)]
    types = [f["type"] for f in frames]
    assert "conversation.item.added" not in types
    created = [f for f in frames if f["type"] == "conversation.item.created"]
    assert created and created[-1]["item"]["type"] == "function_call"
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = [f for f in frames if f["type"] == "response.done"][0]["response"]
    assert done["output"][0]["type"] == "function_call" and done["output"][0]["name"] == "check_order_status"


async def test_function_call_output_needs_a_call_id():
    h, _ = tool_harness()
    e = errors_for(h, "conversation.item.create", item={"type": "function_call_output", "output": "x"})
    assert e.param == "item.call_id" and e.code == "missing_required_parameter"
    assert h.session.conv.items == []


async def test_barge_in_during_a_call_cancels_and_leaves_no_half_call():
    from fakes import silence, speech_like

    eng = FakeEngine(lambda msgs: "Let me check. " + SLOW_CALL, token_s=0.1)
    h = Harness(engine=eng)
    h.send("session.update", session={"type": "realtime", "tools": [ORDER_TOOL], "tool_choice": "required"})
    h.audio(np.concatenate([speech_like(500), silence(700)]))  # a spoken turn: server VAD creates the response
    await h.wait_for("response.function_call_arguments.delta")
    h.audio(speech_like(400))  # the caller talks over it: barge-in after the 300 ms guard
    done = (await h.wait_for("response.done"))["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    assert all(o["type"] != "function_call" for o in done["output"])
    assert done["id"] in eng.aborted
    assert all(it.type != "function_call" for it in h.session.conv.items)
    dropped = [e for e in h.of("response.output_item.done") if e["item"]["type"] == "function_call"]
    assert dropped[0]["item"]["status"] == "incomplete"


# ---------------------------------------------------------------- voice turns (speculative held replies)

async def test_a_held_speculative_reply_that_calls_a_tool_behaves_like_a_normal_one_once_released():
    """semantic_vad: a reply started (held) at the first pause is dropped when speech resumes, the one started at
    the second is released at the end of the turn. The call's events come out only after release, behind the
    user's transcript and response.created; the dropped reply leaves no call; the round trip then goes on."""
    from fakes import FakeASR, FakeTurnModel, silence, speech_like
    from test_session_turns import until

    asr = FakeASR(["Can you check the status of", "Can you check the status of my order A1234?"])
    h = Harness(asr=asr, turn_model=FakeTurnModel(0.97), engine=FakeEngine(lambda msgs: CALL, ttft_s=0.05),
                opts=ServerConfig(output_lead_ms=100))
    h.send("session.update", session={"type": "realtime", "output_modalities": ["text"], "tools": [ORDER_TOOL],
                                      "tool_choice": "required"})
    h.audio(np.concatenate([speech_like(700), silence(800)]))  # "... of" is unfinished: a held reply, no turn
    await until(lambda: h.stack.engine.requests and h.session.turns.utt.check.complete is not None)
    assert "input_audio_buffer.speech_stopped" not in h.types() and "response.created" not in h.types()
    h.audio(np.concatenate([speech_like(900), silence(400)]))
    done = await h.wait_for("response.done")
    eng = h.stack.engine
    assert len(eng.requests) == 2 and eng.requests[0][0] in eng.aborted  # the first speculation was dropped
    assert all(eng.params[rid][0].grammar is not None for rid, _ in eng.requests)  # both were constrained
    assert done["response"]["status"] == "completed"
    assert done["response"]["metadata"]["voicefast_timings"]["speculative"] is True
    (call,) = [o for o in done["response"]["output"] if o["type"] == "function_call"]
    assert json.loads(call["arguments"]) == {"order_number": "A1234"}
    t = h.types()
    assert t.count("response.created") == 1 and t.count("response.output_item.added") == 1
    assert t.index("conversation.item.input_audio_transcription.completed") < t.index("response.created") \
        < t.index("response.output_item.added") < t.index("response.function_call_arguments.done")
    assert [(it.role, it.type) for it in h.session.conv.items] == [("user", "message"), ("assistant", "function_call")]
    h.send("conversation.item.create", item={"type": "function_call_output", "call_id": call["call_id"],
                                             "output": '{"status": "shipped"}'})
    h.send("response.create", response={"tool_choice": "none"})
    await h.wait_for("response.done", 2)
    assert [it.type for it in h.session.conv.items][-2:] == ["function_call_output", "message"]
    await h.session.close()
