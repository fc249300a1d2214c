"""Function calling over the Realtime API (pure bookkeeping, no I/O): the session's and a response's tool settings
(`tools`, `tool_choice`, `parallel_tool_calls`, validated into clear ProtocolErrors), the function_call /
function_call_output items a client creates, and the per-response stream that turns the LLM's tool-call syntax
into function_call items and their events.

Voice policy around a call (docs/server.md "Function calling"):
- The call is exposed the moment its name is decoded (`response.output_item.added`), its arguments stream as
  `response.function_call_arguments.delta`, and `.done` comes as soon as they are complete, so the client can run
  the tool while any spoken words before the call are still playing.
- Filler: with `tool_choice` "auto" the model may speak first; with a forced call (`required` or a named tool)
  the grammar lets the model open with one short filler phrase (FILLERS) before the call (hermes and generic
  dialects; GLM-4's call must open the turn). The filler is spoken while the client runs the tool.
- A response that made calls ends `completed`; the session then waits for each `function_call_output` for as long
  as it lives (calls with no output yet are left out of later prompts). A call cut off (barge-in, cancel, or its own
  token budget spent) never stays half made: its item ends `incomplete` and is deleted from the conversation
  (`conversation.item.deleted`), and `response.done` does not list it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_engine.tool_format import NAME_RE, Tool, decoding_schema
from voicefast.conversation import Conversation, Item, new_id
from voicefast.errors import ProtocolError

FILLERS = ("Let me check that.", "One moment.")
CHOICES = ("auto", "none", "required")


def parse_tools(value: object, param: str) -> list[Tool]:
    """[{type: "function", name, description?, parameters?}] (the chat-style nested `function` is accepted too)."""
    if not isinstance(value, list):
        raise ProtocolError(f"{param} must be an array of tools", param=param)
    if len(value) > 128:
        raise ProtocolError(f"{param} has {len(value)} tools; at most 128 are supported", param=param)
    tools: list[Tool] = []
    for i, t in enumerate(value):
        p = f"{param}[{i}]"
        if not isinstance(t, dict):
            raise ProtocolError(f"{p} must be an object", param=p)
        if t.get("type", "function") != "function":
            raise ProtocolError(f"{p}.type {t.get('type')!r} is not supported (only 'function')", param=f"{p}.type")
        fn = t["function"] if isinstance(t.get("function"), dict) else t
        name, desc, params = fn.get("name"), fn.get("description", ""), fn.get("parameters")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ProtocolError(f"{p}.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                                code="invalid_value" if name is not None else "missing_required_parameter",
                                param=f"{p}.name")
        if any(x.name == name for x in tools):
            raise ProtocolError(f"{p}.name {name!r} is used by another tool", param=f"{p}.name")
        if desc is not None and not isinstance(desc, str):
            raise ProtocolError(f"{p}.description must be a string", param=f"{p}.description")
        if params is not None and not isinstance(params, dict):
            raise ProtocolError(f"{p}.parameters must be a JSON Schema object", param=f"{p}.parameters")
        tool = Tool.make(name, desc or "", params)
        check_schema(tool.schema, f"{p}.parameters")
        tools.append(tool)
    return tools


def check_schema(schema: dict, param: str) -> None:
    """The arguments' schema must compile to a grammar (llguidance): otherwise a clear error naming it."""
    from llm_engine.grammar import Grammar, validate_grammar

    if schema.get("type", "object") != "object":
        raise ProtocolError(f"{param} must describe an object (type 'object'), got type {schema.get('type')!r}",
                            param=param)
    try:
        validate_grammar(Grammar(json_schema=decoding_schema(schema)))
    except ValueError as e:
        raise ProtocolError(f"{param} is not a usable JSON Schema: {e}", code="invalid_schema", param=param) from None


def parse_choice(value: object, tools: list[Tool], param: str) -> str:
    """'auto' | 'none' | 'required' | {type: 'function', name} -> 'auto' | 'none' | 'required' | the tool name."""
    if isinstance(value, str):
        if value not in CHOICES:
            raise ProtocolError(f"{param} must be 'auto', 'none', 'required' or {{type: 'function', name}}, "
                                f"got {value!r}", param=param)
        choice = value
    elif isinstance(value, dict) and value.get("type") == "function":
        fn = value["function"] if isinstance(value.get("function"), dict) else value
        choice = fn.get("name")
        if not isinstance(choice, str) or choice in CHOICES:
            raise ProtocolError(f"{param}.name must name a tool", param=f"{param}.name")
    else:
        raise ProtocolError(f"{param} must be 'auto', 'none', 'required' or {{type: 'function', name}}", param=param)
    return choice


@dataclass(slots=True)
class ToolSettings:
    tools: list[Tool] = field(default_factory=list)
    choice: str = "auto"  # "auto" | "none" | "required" | a tool name (forced)
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Calls may be made (there are tools and tool_choice is not 'none')."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice != "auto"

    def apply(self, d: dict, prefix: str) -> ToolSettings:
        """A copy with d's `tools` / `tool_choice` / `parallel_tool_calls` applied (ProtocolError if invalid)."""
        tools = parse_tools(d["tools"], f"{prefix}.tools") if "tools" in d else list(self.tools)
        choice = parse_choice(d["tool_choice"], tools, f"{prefix}.tool_choice") if "tool_choice" in d \
            else self.choice
        parallel = self.parallel
        if "parallel_tool_calls" in d:
            if not isinstance(d["parallel_tool_calls"], bool):
                raise ProtocolError(f"{prefix}.parallel_tool_calls must be a boolean",
                                    param=f"{prefix}.parallel_tool_calls")
            parallel = d["parallel_tool_calls"]
        if choice not in CHOICES and all(t.name != choice for t in tools):
            raise ProtocolError(f"{prefix}.tool_choice names {choice!r}, which is not one of the tools",
                                param=f"{prefix}.tool_choice")
        if choice == "required" and not tools:
            raise ProtocolError(f"{prefix}.tool_choice 'required' needs at least one tool",
                                param=f"{prefix}.tool_choice")
        return ToolSettings(tools, choice, parallel)

    def to_dict(self) -> dict:
        choice = self.choice if self.choice in CHOICES else {"type": "function", "name": self.choice}
        return {"tools": [{"type": "function", **t.as_function()} for t in self.tools], "tool_choice": choice,
                "parallel_tool_calls": self.parallel}


def tools_prompt_tokens(tools: list[Tool], count_tokens) -> int:
    """About what the tools' descriptions add to a prompt (their JSON plus the dialect's instruction)."""
    return sum(count_tokens(json.dumps(t.as_function())) + 8 for t in tools) + 96


# -- items the client creates --------------------------------------------------------------------------------
def client_tool_item(it: dict, conv: Conversation) -> Item:
    """conversation.item.create of a function_call / function_call_output item -> a validated Item (nothing is
    added here: the caller adds it only when this returns)."""
    item_id = it.get("id") or new_id("item")
    if not isinstance(item_id, str) or len(item_id) > 64:
        raise ProtocolError("item.id must be a string of at most 64 characters", param="item.id")
    call_id = it.get("call_id")
    if not isinstance(call_id, str) or not 1 <= len(call_id) <= 64:
        raise ProtocolError("item.call_id must be a string of 1-64 characters",
                            code="missing_required_parameter" if call_id is None else "invalid_value",
                            param="item.call_id")
    calls = [x for x in conv.items if x.type == "function_call" and x.call_id == call_id]
    if it["type"] == "function_call_output":
        output = it.get("output")
        if not isinstance(output, str):
            raise ProtocolError("item.output must be a string (JSON text is usual)",
                                code="missing_required_parameter" if output is None else "invalid_type",
                                param="item.output")
        if not calls:
            raise ProtocolError(f"no function_call with call_id {call_id!r} in the conversation",
                                code="invalid_value", param="item.call_id")
        if any(x.type == "function_call_output" and x.call_id == call_id for x in conv.items):
            raise ProtocolError(f"call_id {call_id!r} already has an output", code="invalid_value",
                                param="item.call_id")
        return Item(item_id, "tool", output, type="function_call_output", call_id=call_id, name=calls[0].name)
    name, args = it.get("name"), it.get("arguments", "")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProtocolError("item.name must name the function (1-64 letters, digits, '_' or '-')",
                            param="item.name")
    if not isinstance(args, str):
        raise ProtocolError("item.arguments must be a JSON string", code="invalid_type", param="item.arguments")
    try:
        json.loads(args or "{}")
    except json.JSONDecodeError:
        raise ProtocolError("item.arguments is not valid JSON", param="item.arguments") from None
    if calls:
        raise ProtocolError(f"call_id {call_id!r} is already used", code="invalid_value", param="item.call_id")
    return Item(item_id, "assistant", type="function_call", call_id=call_id, name=name, arguments=args or "{}")


# -- one response's calls ------------------------------------------------------------------------------------
def plain_request_kwargs(messages: list[dict]) -> dict:
    """generate() kwargs of a response that may not call tools: past calls and results still render in the model's
    own syntax (tools=[])."""
    return {"tools": []} if any(m.get("tool_calls") or m.get("role") == "tool" for m in messages) else {}


class ResponseCalls:
    """One response's tool calls: the LLM text goes through the dialect's parser; speech goes back to the response
    (`r._say`), calls become function_call items whose events go out (after response.created) as they parse."""

    def __init__(self, r: Any, settings: ToolSettings, on_call: Callable[[Any, Item, bool], None] | None):
        from llm_engine.tool_parser import ToolCallParser

        self.r, self.settings, self.on_call = r, settings, on_call
        self.dialect = r.stack.engine.tool_dialect
        self.parser = ToolCallParser(self.dialect, settings.tools)
        self.items: list[Item] = []  # function_call items, complete or in progress

    def request_kwargs(self) -> tuple[dict, dict]:
        """(SamplingParams kwargs, generate kwargs): the call's grammar (forced: a short filler may open it; auto:
        lazy, from the call opener on) with its own budget, and tools= to render them in the model's syntax."""
        s = self.settings
        g = self.dialect.grammar(s.tools, choice=s.choice, parallel=s.parallel,
                                 max_tokens=self.r.p.tool_call_max_tokens, fillers=FILLERS if s.forced else ())
        return {"grammar": g}, {"tools": s.tools}

    def push(self, text: str) -> None:
        for ev in self.parser.push(text):
            self._on(ev)

    def finish(self) -> None:
        for ev in self.parser.finish():
            self._on(ev)

    def _on(self, ev: tuple) -> None:
        r, kind = self.r, ev[0]
        if kind == "text":
            if r.msg_begun or ev[1].strip():  # whitespace around calls is not speech
                r._say(ev[1] if r.msg_begun else ev[1].lstrip())
        elif kind == "call_start":
            item = new_call_item(ev[2])
            self.items.append(item)
            r.outputs.append(item)
            r._when_started(lambda: self._added(item))
        elif kind == "call_args":
            item = self.items[ev[1]]
            item.arguments += ev[2]
            r._when_started(lambda: self._send(call_events("delta", r.id, r.outputs.index(item), item, ev[2])))
        elif kind == "call_end":
            item = self.items[ev[1]]
            item.arguments, item.status = ev[3], "completed"
            r._when_started(lambda: self._done(item))

    def _send(self, events: list[dict]) -> None:
        for e in events:
            self.r._emit(e)

    def _added(self, item: Item) -> None:
        self._send(call_events("added", self.r.id, self.r.outputs.index(item), item))
        if self.on_call is not None:
            self.on_call(self.r, item, True)  # the session adds it to the conversation

    def _done(self, item: Item) -> None:
        self._send(call_events("done", self.r.id, self.r.outputs.index(item), item))
        self.r._emit({"type": "conversation.item.done", "item": item.to_dict()})

    def drop_unfinished(self) -> None:
        """A call cut off before its arguments were complete never stays half made: its item is done
        `incomplete`, deleted from the conversation, and left out of response.done."""
        for item in [c for c in self.items if c.status != "completed"]:
            item.status = "incomplete"
            self.items.remove(item)
            self.r._emit({"type": "response.output_item.done", "response_id": self.r.id,
                          "output_index": self.r.outputs.index(item), "item": item.to_dict()})
            if self.on_call is not None:
                self.on_call(self.r, item, False)  # the session deletes it from the conversation


def call_events(kind: str, response_id: str, index: int, item: Item, delta: str = "") -> list[dict]:
    """Wire events of a function_call output item: 'added' | 'delta' | 'done' (arguments.done + item done)."""
    if kind == "added":
        return [{"type": "response.output_item.added", "response_id": response_id, "output_index": index,
                 "item": item.to_dict()}]
    ids = {"response_id": response_id, "item_id": item.id, "output_index": index, "call_id": item.call_id}
    if kind == "delta":
        return [{"type": "response.function_call_arguments.delta", **ids, "delta": delta}]
    return [{"type": "response.function_call_arguments.done", **ids, "name": item.name,
             "arguments": item.arguments},
            {"type": "response.output_item.done", "response_id": response_id, "output_index": index,
             "item": item.to_dict()}]


def new_call_item(name: str) -> Item:
    return Item(new_id("item"), "assistant", type="function_call", call_id=new_id("call"), name=name,
                status="in_progress")
