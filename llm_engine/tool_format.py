"""Tool calls in the model's own syntax: how tools and past calls are rendered into the prompt (through the
checkpoint's chat template where it knows tools), which grammar constrains a call, and which parser reads calls
back out of the streamed text (llm_engine.tool_parser).

Dialects, picked from the chat template's source:
- "hermes" (Qwen2.5/Qwen3, Hermes; the template mentions `<tool_call>`): the template renders `tools`, assistant
  `tool_calls` and `tool` messages; a call is `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>`.
- "glm4" (GLM-4 chat; the template uses `<|observation|>`): tools go to the template as `tools` (and on the first
  message, as the older template reads them); a call is `NAME\\n{...}` at the start of an assistant turn; results
  come back as `observation` messages.
- "generic" (any other template, e.g. the embedded SmolLM2's, which has no tool syntax): the tools and the
  instruction below are appended to the system prompt; a call is `<tool_call>{"name": N, "arguments": {...}}
  </tool_call>`; past calls are assistant text and results are user messages `The NAME tool says: OUTPUT. Now
  answer my question in one sentence.` (a flat JSON object output is read out as "key is value, ...").

Neutral messages (what callers pass): {"role": "system"|"user"|"assistant", "content": str}, an assistant message
with "tool_calls": [{"id", "name", "arguments" (JSON text)}], and {"role": "tool", "tool_call_id", "name",
"content"} for a result. Arguments are decoded under the tool's schema with `additionalProperties` false where the
schema leaves it open (every such instance also validates against the schema as given) and no free whitespace."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from llm_engine.grammar import Grammar

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_JSON_OPTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GENERIC_INSTRUCTION = (
    "You can call these tools. Each is given as JSON with its name, description and parameters (a JSON Schema):\n"
    "{tools}\n"
    "To call a tool, reply with exactly <tool_call>{{\"name\": \"TOOL_NAME\", \"arguments\": {{...}}}}</tool_call> "
    "and nothing after it. When no tool is needed, answer normally.")


# Measured on SmolLM2-135M: with this wording it answered from the result ("The check_order_status tool says:
# status is shipped, arrives is Friday."); a bare "Tool result (NAME): {json}" made it repeat its tool call.
GENERIC_FOLLOW_UP = "Now answer my question in one sentence."


def result_prose(output: str) -> str:
    """A tool's output as plain words for the generic dialect: a flat JSON object becomes "key is value, ..."."""
    try:
        obj = json.loads(output)
    except (json.JSONDecodeError, TypeError):
        return output.strip().rstrip(".")
    if isinstance(obj, dict) and obj and all(not isinstance(v, (dict, list)) for v in obj.values()):
        return ", ".join(f"{str(k).replace('_', ' ')} is {v}" for k, v in obj.items())
    return output.strip()


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: str  # JSON Schema, as canonical JSON text (hashable)

    @staticmethod
    def make(name: str, description: str = "", parameters: dict | None = None) -> Tool:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"tool name must match {NAME_RE.pattern}, got {name!r}")
        params = parameters if parameters is not None else {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ValueError(f"tool {name!r}: parameters must be a JSON Schema object")
        return Tool(name, description or "", json.dumps(params, sort_keys=True))

    @property
    def schema(self) -> dict:
        return json.loads(self.parameters)

    def as_function(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.schema}


def decoding_schema(schema: dict) -> dict:
    """The schema the arguments are decoded under: objects with properties and no additionalProperties get
    additionalProperties false (a subset of the schema's instances), plus compact-JSON options."""
    def close(s: Any) -> Any:
        if isinstance(s, dict):
            s = {k: close(v) for k, v in s.items()}
            if "properties" in s and "additionalProperties" not in s and "patternProperties" not in s:
                s["additionalProperties"] = False
        elif isinstance(s, list):
            s = [close(v) for v in s]
        return s

    out = close(copy.deepcopy(schema))
    out["x-guidance"] = dict(_JSON_OPTS)
    return out


def _lark_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lark string literal


class ToolDialect:
    name = "generic"
    open_tag, close_tag, sep = "<tool_call>", "</tool_call>", ""
    parallel_ok = True
    fillers_ok = True  # a call may follow spoken words in the same reply

    def triggers(self, tools: list[Tool]) -> tuple[str, ...]:
        return (self.open_tag,)

    def call_prefix(self, tool: Tool) -> str:
        return f'{self.open_tag}{self.sep}{{"name": {json.dumps(tool.name)}, "arguments": '

    def call_suffix(self) -> str:
        return f"}}{self.sep}{self.close_tag}"

    def grammar(self, tools: list[Tool], *, choice: str = "auto", parallel: bool = True,
                max_tokens: int | None = None, fillers: tuple[str, ...] = ()) -> Grammar:
        """choice: "auto" (lazy: free text until the call opener) | "required" (a call from the first token) |
        a tool name (exactly one call of it, from the first token). parallel: more than one call may follow.
        fillers (forced only, dialects whose calls may follow text): the reply may open with one of these phrases
        and a space."""
        if choice not in ("auto", "required"):  # a named tool: exactly one call of it
            tools, parallel = [t for t in tools if t.name == choice], False
            if not tools:
                raise ValueError(f"tool_choice names an unknown tool {choice!r}")
        if not tools:
            raise ValueError("a tool grammar needs at least one tool")
        suffix = f" {_lark_str(self.call_suffix())}" if self.call_suffix() else ""
        lines = [f"call_{i}: {_lark_str(self.call_prefix(t))} args_{i}{suffix}" for i, t in enumerate(tools)]
        lines += [f"args_{i}: %json {json.dumps(decoding_schema(t.schema))}" for i, t in enumerate(tools)]
        calls = " | ".join(f"call_{i}" for i in range(len(tools)))
        many = parallel and self.parallel_ok
        body = f"call ({_lark_str(chr(10))} call)*" if many else "call"
        fill = [f for f in fillers if f] if choice != "auto" and self.fillers_ok else []
        if fill:
            lines.append("filler: " + " | ".join(_lark_str(f + " ") for f in fill))
            body = f"filler? {body}"
        lark = "\n".join([f"start: {body}", f"call: {calls}", *lines])
        return Grammar(lark=lark, triggers=self.triggers(tools) if choice == "auto" else (), max_tokens=max_tokens)

    # ---- prompt -------------------------------------------------------------------------------------------
    def render(self, tokenizer: Any, messages: list[dict], tools: list[Tool]) -> list[int]:
        return tokenizer.apply_chat_template(self.template_messages(messages, tools), add_generation_prompt=True)

    def template_messages(self, messages: list[dict], tools: list[Tool]) -> list[dict]:
        """Generic: tools described in the system prompt; calls as assistant text; results as user messages."""
        out: list[dict] = []
        for m in messages:
            if m.get("tool_calls"):
                text = "\n".join(f"{self.open_tag}{{\"name\": {json.dumps(c['name'])}, \"arguments\": "
                                 f"{c['arguments']}}}{self.close_tag}" for c in m["tool_calls"])
                out.append({"role": "assistant", "content": (m.get("content") or "") + text})
            elif m["role"] == "tool":
                out.append({"role": "user", "content": f"The {m.get('name') or 'tool'} tool says: "
                                                       f"{result_prose(m['content'])}. {GENERIC_FOLLOW_UP}"})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        if tools:
            desc = GENERIC_INSTRUCTION.format(tools="\n".join(json.dumps(t.as_function()) for t in tools))
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"].rstrip() + "\n\n" + desc}
            else:
                out.insert(0, {"role": "system", "content": desc})
        return out


class HermesDialect(ToolDialect):
    name = "hermes"
    sep = "\n"

    def render(self, tokenizer: Any, messages: list[dict], tools: list[Tool]) -> list[int]:
        fns = [{"type": "function", "function": t.as_function()} for t in tools]
        return tokenizer.apply_chat_template(self.template_messages(messages, tools), add_generation_prompt=True,
                                             tools=fns or None)

    def template_messages(self, messages: list[dict], tools: list[Tool]) -> list[dict]:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [{"type": "function", "id": c.get("id"),
                          "function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
                         for c in m["tool_calls"]]
                out.append({"role": "assistant", "content": m.get("content") or "", "tool_calls": calls})
            elif m["role"] == "tool":
                out.append({"role": "tool", "content": m["content"], "tool_call_id": m.get("tool_call_id"),
                            "name": m.get("name")})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        return out


class Glm4Dialect(ToolDialect):
    name = "glm4"
    parallel_ok = False  # one call per assistant turn
    fillers_ok = False  # a call opens its assistant turn

    def triggers(self, tools: list[Tool]) -> tuple[str, ...]:
        return tuple(f"{t.name}\n" for t in tools)

    def call_prefix(self, tool: Tool) -> str:
        return f"{tool.name}\n"

    def call_suffix(self) -> str:
        return ""

    def render(self, tokenizer: Any, messages: list[dict], tools: list[Tool]) -> list[int]:
        fns = [{"type": "function", "function": t.as_function()} for t in tools]
        msgs = self.template_messages(messages, tools)
        if fns:
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "tools": fns}
            else:
                msgs.insert(0, {"role": "system", "content": "", "tools": fns})
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tools=fns or None)

    def template_messages(self, messages: list[dict], tools: list[Tool]) -> list[dict]:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                if m.get("content"):
                    out.append({"role": "assistant", "content": m["content"]})
                out += [{"role": "assistant", "metadata": c["name"], "content": c["arguments"]}
                        for c in m["tool_calls"]]
            elif m["role"] == "tool":
                out.append({"role": "observation", "content": m["content"]})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        return out


def dialect_for(chat_template_source: str | None) -> ToolDialect:
    """The tool dialect a chat template speaks (generic when it has no tool syntax)."""
    src = chat_template_source or ""
    if "<tool_call>" in src and "tools" in src:
        return HermesDialect()
    if "<|observation|>" in src:
        return Glm4Dialect()
    return ToolDialect()
