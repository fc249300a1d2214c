"""Reads tool calls out of a streamed reply as it arrives (pure Python): text before a call is speech; a call is
announced as soon as its name is known and its arguments stream out as they are decoded.

push(delta) -> events; finish() -> the rest. Events: ("text", str) | ("call_start", index, name) |
("call_args", index, str) | ("call_end", index, name, arguments). A tail that could be the start of a call opener
is held back until it is decided. Calls decoded under the dialect's grammar always parse; if a reply was not
constrained and breaks the syntax, the broken part is given back as text and no call is announced for it."""

from __future__ import annotations

import json

from llm_engine.tool_format import Glm4Dialect, Tool, ToolDialect


class ToolCallParser:
    def __init__(self, dialect: ToolDialect, tools: list[Tool]):
        self.d = dialect
        self.glm = isinstance(dialect, Glm4Dialect)
        names = [t.name for t in tools]
        # opener -> tool name (None: the name is read from the header that follows)
        self.openers = {f"{n}\n": n for n in names} if self.glm else {dialect.open_tag: None}
        self.names = set(names)
        self.buf = ""
        self.state = "text"  # text | header | args | tail
        self.calls: list[tuple[str, str]] = []  # finished (name, arguments)
        self._name = ""
        self._args = ""
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._raw = ""  # the call text so far (given back as text if it turns out broken)
        self.saw_text = False

    @property
    def in_call(self) -> bool:
        return self.state != "text"

    def push(self, delta: str) -> list[tuple]:
        self.buf += delta
        out: list[tuple] = []
        while self.buf:
            n = len(self.buf)
            getattr(self, "_in_" + self.state)(out)
            if len(self.buf) == n and self.state in ("text", "header", "tail"):
                break  # waiting for more text
        return out

    def finish(self) -> list[tuple]:
        out: list[tuple] = []
        if self.state == "tail" and not self.d.call_suffix():  # GLM-4: a call ends with the reply
            self._in_tail(out)
        if self.state == "text" and self.buf:
            self._say(out, self.buf)
        elif self.state != "text":  # the reply ended inside a call: not a call
            self._say(out, self._raw + self.buf)
            if self.state in ("args", "tail"):
                out.append(("call_abandoned", len(self.calls)))
        self.buf, self.state = "", "text"
        return out

    # ---- states --------------------------------------------------------------------------------------
    def _say(self, out: list, text: str) -> None:
        if text:
            self.saw_text = self.saw_text or bool(text.strip())
            out.append(("text", text))

    def _in_text(self, out: list) -> None:
        best, opener = -1, ""
        for o in self.openers:
            i = self.buf.find(o)
            if i != -1 and (best == -1 or i < best):
                best, opener = i, o
        if best == -1:  # hold back the longest tail that could still become an opener
            keep = 0
            for o in self.openers:
                for k in range(min(len(o) - 1, len(self.buf)), 0, -1):
                    if o.startswith(self.buf[-k:]):
                        keep = max(keep, k)
                        break
            self._say(out, self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return
        self._say(out, self.buf[:best])
        self._raw = opener
        self.buf = self.buf[best + len(opener):]
        name = self.openers[opener]
        if name is None:
            self.state = "header"
        else:
            self._begin(out, name)

    def _in_header(self, out: list) -> None:
        """`{"name": "NAME", "arguments": ` after the opener (whitespace allowed around)."""
        s = self.buf.lstrip()
        if not s:
            return
        prefix = '{"name": "'
        if not (s.startswith(prefix) or prefix.startswith(s)):
            return self._broken(out)
        end = s.find('"', len(prefix))
        if end == -1:
            return
        try:
            name = json.loads(s[len(prefix) - 1:end + 1])
        except json.JSONDecodeError:
            return self._broken(out)
        rest = s[end + 1:]
        sep = ', "arguments": '
        if len(rest) < len(sep):
            if not sep.startswith(rest):
                return self._broken(out)
            return
        if not rest.startswith(sep) or name not in self.names:
            return self._broken(out)
        self._raw += s[:end + 1 + len(sep)]
        self.buf = rest[len(sep):]
        self._begin(out, name)

    def _begin(self, out: list, name: str) -> None:
        self._name, self._args = name, ""
        self._depth, self._in_str, self._esc = 0, False, False
        self.state = "args"
        out.append(("call_start", len(self.calls), name))

    def _in_args(self, out: list) -> None:
        s = self.buf.lstrip() if not self._args else self.buf
        end = len(s)  # how much of s belongs to the arguments
        for i, c in enumerate(s):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
            elif c == '"':
                self._in_str = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        done = end < len(s) or (self._depth == 0 and end > 0 and not self._in_str)
        piece = s[:end]
        self._args += piece
        self._raw += piece
        self.buf = s[len(piece):]
        if piece:
            out.append(("call_args", len(self.calls), piece))
        if done:
            self.state = "tail"

    def _in_tail(self, out: list) -> None:
        """The dialect's closing text after the arguments (`}</tool_call>`, or nothing for GLM-4); newlines and
        spaces around its parts are skipped."""
        want = self.d.call_suffix().replace("\n", "")
        k = 0
        if want:
            got = "".join(c for c in self.buf if c not in "\n ")
            if not (got.startswith(want) or want.startswith(got)):
                return self._broken(out)
            if len(got) < len(want):
                return
            matched = 0
            while matched < len(want):
                matched += self.buf[k] not in "\n "
                k += 1
        self.calls.append((self._name, self._args))
        out.append(("call_end", len(self.calls) - 1, self._name, self._args))
        self.buf, self.state, self._raw = self.buf[k:].lstrip("\n"), "text", ""

    def _broken(self, out: list) -> None:
        """Not a well-formed call: what was taken for one is text after all."""
        if self.state in ("args", "tail"):
            out.append(("call_abandoned", len(self.calls)))
        text = self._raw + self.buf
        self._raw, self.buf, self.state = "", "", "text"
        self._say(out, text)
