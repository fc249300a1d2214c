"""Conversation state of one session: ordered message items and the chat messages the LLM sees.
Pure bookkeeping (no I/O). The context policy drops the oldest turns (never the system prompt) so that
prompt + max_output_tokens fits max_model_len, counting with the engine tokenizer.

Bounded: at most `max_items` items and `max_bytes` of item text (UTF-8). A client's item that does not fit is
refused (check_room raises `conversation_limit_reached`); the server's own items (turns, responses) make room
by evicting the oldest items (make_room returns them, for `conversation.item.deleted`)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from voicefast.errors import ProtocolError

PER_MESSAGE_OVERHEAD_TOKENS = 6  # chat-template role markers per message (approximate, conservative)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass(slots=True)
class Item:
    id: str
    role: str  # "user" | "assistant" | "system"
    text: str = ""  # what the LLM sees: the transcript (user audio) or text; for assistant audio, what was heard
    kind: str = "text"  # "text" | "audio": the content part type
    status: str = "completed"  # "in_progress" | "completed" | "incomplete"
    audio_ms: int = 0  # assistant audio duration sent so far (for truncate bounds)
    type: str = "message"  # "message" | "function_call" | "function_call_output" (text = the output)
    call_id: str = ""  # function_call / function_call_output
    name: str = ""  # function_call: the tool
    arguments: str = ""  # function_call: JSON text
    show_transcript: bool = True  # False: user audio whose transcription the session turned off (LLM still hears it)

    @property
    def text_bytes(self) -> int:
        """The text it holds (UTF-8), what the conversation caps count: the text or output, a call's arguments."""
        return len(self.text.encode("utf-8", "surrogatepass")) + len(self.arguments.encode("utf-8", "surrogatepass"))

    def content(self) -> list[dict]:
        if self.role == "assistant":
            if self.kind == "audio":
                return [{"type": "output_audio", "transcript": self.text}]
            return [{"type": "output_text", "text": self.text}]
        if self.kind == "audio":
            return [{"type": "input_audio", "transcript": (self.text or None) if self.show_transcript else None}]
        return [{"type": "input_text", "text": self.text}]

    def to_dict(self) -> dict:
        base = {"id": self.id, "object": "realtime.item", "type": self.type}
        if self.type == "function_call":
            return {**base, "status": self.status, "name": self.name, "call_id": self.call_id,
                    "arguments": self.arguments}
        if self.type == "function_call_output":
            return {**base, "call_id": self.call_id, "output": self.text}
        return {**base, "role": self.role, "status": self.status, "content": self.content()}

    def llm_text(self) -> str:
        """What this item costs in the prompt (function calls: the name and the arguments)."""
        return f"{self.name} {self.arguments}" if self.type == "function_call" else self.text


@dataclass
class Conversation:
    items: list[Item] = field(default_factory=list)
    max_items: int = 1 << 30
    max_bytes: int = 1 << 62
    _counter: itertools.count = field(default_factory=lambda: itertools.count())

    @property
    def text_bytes(self) -> int:
        return sum(it.text_bytes for it in self.items)

    def check_add(self, item: Item, previous_item_id: str | None = None) -> None:
        """Raise the ProtocolError add() would raise (duplicate id, unknown previous item), changing nothing."""
        if self.find(item.id) is not None:
            raise ProtocolError(f"item id {item.id!r} already exists", code="duplicate_item_id", param="item.id")
        if previous_item_id not in (None, "root") and self.find(previous_item_id) is None:
            raise ProtocolError(f"previous_item_id {previous_item_id!r} not found", code="item_not_found",
                                param="previous_item_id")

    def check_room(self, item: Item) -> None:
        """A client's item must fit the caps as they stand (the client may delete items to make room)."""
        if len(self.items) + 1 > self.max_items:
            raise ProtocolError(f"the conversation holds its maximum of {self.max_items} items; delete some first",
                                code="conversation_limit_reached", param="item")
        if self.text_bytes + item.text_bytes > self.max_bytes:
            raise ProtocolError(f"the conversation's text would exceed its maximum of {self.max_bytes} bytes; "
                                f"delete some items first", code="conversation_limit_reached", param="item")

    def make_room(self, reserve_bytes: int = 0) -> list[Item]:
        """Evict the oldest items until one more item and `reserve_bytes` of text fit; returns the evicted."""
        evicted: list[Item] = []
        used = self.text_bytes
        while self.items and (len(self.items) + 1 > self.max_items or used + reserve_bytes > self.max_bytes):
            it = self.items.pop(0)
            used -= it.text_bytes
            evicted.append(it)
        return evicted

    def find(self, item_id: str) -> Item | None:
        return next((it for it in self.items if it.id == item_id), None)

    def previous_id(self, item: Item | None = None) -> str | None:
        """Id of the item before `item` (or of the last item when `item` is None)."""
        if item is None:
            return self.items[-1].id if self.items else None
        i = self.items.index(item)
        return self.items[i - 1].id if i > 0 else None

    def add(self, item: Item, previous_item_id: str | None = None) -> None:
        self.check_add(item, previous_item_id)
        if previous_item_id is None:
            self.items.append(item)
        elif previous_item_id == "root":
            self.items.insert(0, item)
        else:
            self.items.insert(self.items.index(self.find(previous_item_id)) + 1, item)

    def delete(self, item_id: str) -> None:
        it = self.find(item_id)
        if it is None:
            raise ProtocolError(f"item {item_id!r} not found", code="item_not_found", param="item_id")
        self.items.remove(it)

    def messages(self, instructions: str, *, count_tokens: Callable[[str], int], max_prompt_tokens: int,
                 extra: list[Item] = ()) -> list[dict]:
        """Chat messages for the next response: system prompt + the newest turns that fit the budget. A function
        call and its output are one unit (kept or dropped together); calls still waiting for their output and
        outputs whose call is gone are left out. Tool messages use llm_engine.tool_format's neutral shape. An
        extra item stands in for a conversation item of the same id (a speculative turn whose item was added
        meanwhile), else it follows the conversation."""
        system = [{"role": "system", "content": instructions}] if instructions else []
        budget = max_prompt_tokens - sum(count_tokens(m["content"]) + PER_MESSAGE_OVERHEAD_TOKENS for m in system)
        kept: list[list[Item]] = []
        by_id = {it.id: it for it in extra}
        for unit in reversed(_units([*(by_id.pop(c.id, c) for c in self.items), *by_id.values()])):
            cost = sum(count_tokens(it.llm_text()) + PER_MESSAGE_OVERHEAD_TOKENS for it in unit)
            if cost > budget and kept:
                break
            budget -= cost
            kept.append(unit)
        kept.reverse()
        # Drop a leading assistant turn (or call): a turn starts with the user.
        while len(kept) > 1 and kept[0][0].role == "assistant":
            kept.pop(0)
        return system + _to_messages([it for unit in kept for it in unit])


def _units(items: list[Item]) -> list[list[Item]]:
    """Items in prompt order, grouped: a function_call with its output (the output moves next to its call); calls
    without an output and orphan outputs are dropped; empty messages are skipped."""
    outputs = {it.call_id: it for it in items if it.type == "function_call_output"}
    units: list[list[Item]] = []
    for it in items:
        if it.type == "function_call":
            if it.call_id in outputs and it.status == "completed":
                units.append([it, outputs[it.call_id]])
        elif it.type == "function_call_output":
            continue  # placed with its call (or dropped with it)
        elif it.text.strip():
            units.append([it])
    return units


def _to_messages(items: list[Item]) -> list[dict]:
    """Neutral chat messages: consecutive calls (and the assistant words just before them) share one assistant
    message with `tool_calls`, each followed by its result as a `tool` message."""
    out: list[dict] = []
    results: list[dict] = []
    for it in items:
        if it.type == "function_call":
            call = {"id": it.call_id, "name": it.name, "arguments": it.arguments}
            if out and out[-1]["role"] == "assistant":  # results wait in `results`: out[-1] is this turn's
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif it.type == "function_call_output":
            results.append({"role": "tool", "tool_call_id": it.call_id, "name": it.name, "content": it.text})
        else:
            out += results
            results = []
            out.append({"role": it.role, "content": it.text})
    return out + results
