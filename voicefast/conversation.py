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
    show_transcript: bool = True  # False: user audio whose transcription the session turned off (LLM still hears it)

    @property
    def text_bytes(self) -> int:
        return len(self.text.encode("utf-8", "surrogatepass"))

    def content(self) -> list[dict]:
        if self.role == "assistant":
            if self.kind == "audio":
                return [{"type": "output_audio", "transcript": self.text}]
            return [{"type": "output_text", "text": self.text}]
        if self.kind == "audio":
            return [{"type": "input_audio", "transcript": (self.text or None) if self.show_transcript else None}]
        return [{"type": "input_text", "text": self.text}]

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "realtime.item", "type": "message", "role": self.role,
                "status": self.status, "content": self.content()}


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
        """Chat messages for the next response: system prompt + the newest turns that fit the budget."""
        # An extra item stands in for a conversation item of the same id (a speculative turn whose item was added
        # meanwhile), else it follows the conversation.
        by_id = {it.id: it for it in extra}
        turns = [it for it in [*(by_id.pop(c.id, c) for c in self.items), *by_id.values()] if it.text.strip()]
        system = [{"role": "system", "content": instructions}] if instructions else []
        budget = max_prompt_tokens - sum(count_tokens(m["content"]) + PER_MESSAGE_OVERHEAD_TOKENS for m in system)
        kept: list[dict] = []
        for it in reversed(turns):
            cost = count_tokens(it.text) + PER_MESSAGE_OVERHEAD_TOKENS
            if cost > budget and kept:
                break
            budget -= cost
            kept.append({"role": "system" if it.role == "system" else it.role, "content": it.text})
        kept.reverse()
        # Drop a leading assistant message: a turn starts with the user.
        while len(kept) > 1 and kept[0]["role"] == "assistant":
            kept.pop(0)
        return system + kept
