"""Tool-call dialects (llm_engine.tool_format) and the streaming parser (llm_engine.tool_parser): detection from
chat templates, rendering through real Jinja templates of each style, grammars that accept exactly the dialect's
call text, and parsing calls out of text pushed in arbitrary pieces."""

import json
import random

import pytest

from bench.synthetic_tokenizer import build_byte_bpe
from llm_engine.chat_template import ChatTemplate
from llm_engine.grammar import GrammarCompiler
from llm_engine.tokenizer import Tokenizer
from llm_engine.tool_format import Glm4Dialect, HermesDialect, Tool, ToolDialect, decoding_schema, dialect_for
from llm_engine.tool_parser import ToolCallParser

ORDER = Tool.make("check_order_status", "Look up an order", {
    "type": "object", "properties": {"order_number": {"type": "string", "maxLength": 10}},
    "required": ["order_number"]})
BOOK = Tool.make("book_slot", "Book a fitting", {
    "type": "object", "properties": {"day": {"type": "string", "enum": ["mon", "tue"]},
                                     "people": {"type": "integer", "minimum": 1, "maximum": 8}},
    "required": ["day"]})
TOOLS = [ORDER, BOOK]
# Small templates in the style of each family (written for these tests, not copied from a checkpoint).
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{{ messages[0]['content'] if messages[0]['role'] == 'system' else '' }}"
    "\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\nReturn calls in "
    "<tool_call></tool_call> tags.<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' and tools %}{% elif m['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": "
    "{{ c['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GLM_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}{% if m.get('tools') %}<|system|>\n{{ m['content'] }}\n# Tools"
    "{% for t in m['tools'] %}\n\n## {{ t['function']['name'] }}\n\n{{ t['function'] | tojson(indent=4) }}"
    "{% endfor %}{% elif m['role'] == 'assistant' and m.get('metadata') %}<|assistant|>{{ m['metadata'] }}\n"
    "{{ m['content'] }}{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is A1?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "k", "name": "check_order_status",
                                                          "arguments": '{"order_number": "A1"}'}]},
    {"role": "tool", "tool_call_id": "k", "name": "check_order_status", "content": '{"status": "shipped"}'}]


class _Tok:
    """apply_chat_template over a ChatTemplate, returning the text (the dialects only call this)."""

    def __init__(self, source):
        self.t = ChatTemplate(source)

    def apply_chat_template(self, messages, add_generation_prompt=True, **extra):
        return self.t.render(messages, add_generation_prompt=add_generation_prompt, **extra)


def test_dialect_detection():
    assert isinstance(dialect_for(HERMES_TEMPLATE), HermesDialect)
    assert isinstance(dialect_for(GLM_TEMPLATE + "<|observation|>"), Glm4Dialect)
    assert type(dialect_for("{% for m in messages %}{{ m['content'] }}{% endfor %}")) is ToolDialect
    assert type(dialect_for(None)) is ToolDialect


def test_hermes_renders_tools_calls_and_results_through_the_template():
    text = HermesDialect().render(_Tok(HERMES_TEMPLATE), CONVERSATION, TOOLS)
    assert '"name": "check_order_status"' in text and '"name": "book_slot"' in text and "Be brief." in text
    assert '<tool_call>\n{"name": "check_order_status", "arguments": {"order_number": "A1"}}\n</tool_call>' in text
    assert '<tool_response>\n{"status": "shipped"}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_glm4_renders_tools_calls_and_observations_through_the_template():
    text = Glm4Dialect().render(_Tok(GLM_TEMPLATE), CONVERSATION, TOOLS)
    assert "## check_order_status" in text and "## book_slot" in text
    assert '<|assistant|>check_order_status\n{"order_number": "A1"}' in text
    assert '<|observation|>\n{"status": "shipped"}' in text and text.endswith("<|assistant|>")


def test_decoding_schema_closes_open_objects_only():
    s = decoding_schema({"type": "object", "properties": {"a": {"type": "object", "properties": {}},
                                                          "b": {"type": "object", "additionalProperties": True,
                                                                "properties": {"x": {"type": "string"}}}}})
    assert s["additionalProperties"] is False and s["properties"]["a"]["additionalProperties"] is False
    assert s["properties"]["b"]["additionalProperties"] is True
    assert s["x-guidance"]["whitespace_flexible"] is False


@pytest.fixture(scope="module")
def compiler():
    tk = build_byte_bpe(512, specials=("<|eos|>",))
    tok = Tokenizer(tk, eos_token_ids=[tk.token_to_id("<|eos|>")])
    return tok, GrammarCompiler(tok, 512, tok.eos_token_ids)


def _accepts(compiler, grammar, text: str, filler: str = "") -> bool:
    tok, comp = compiler
    st = comp.new_state(grammar)
    ids = tok.encode(text)
    for i, t in enumerate(ids):
        st.accept(t, i + 1)
        if st.error:
            return False
    return st.error is None and st.matcher is not None and st.matcher.is_accepting()


@pytest.mark.parametrize("dialect", [ToolDialect(), HermesDialect(), Glm4Dialect()], ids=lambda d: d.name)
def test_grammars_accept_the_dialects_calls_and_nothing_else(compiler, dialect):
    good = dialect.call_prefix(BOOK) + '{"day": "tue", "people": 2}' + dialect.call_suffix()
    g = dialect.grammar(TOOLS, choice="book_slot", max_tokens=64, fillers=("One moment.",))
    assert g.triggers == () and g.max_tokens == 64
    assert _accepts(compiler, g, good)
    assert not _accepts(compiler, g, good.replace('"tue"', '"wed"'))  # not in the enum
    assert not _accepts(compiler, g, good.replace("2}", "9}"))  # above the maximum
    assert not _accepts(compiler, g, dialect.call_prefix(ORDER) + '{"order_number": "A1"}' + dialect.call_suffix())
    if dialect.fillers_ok:
        assert _accepts(compiler, g, "One moment. " + good)
    lazy = dialect.grammar(TOOLS, choice="auto")
    assert lazy.triggers and all(t in dialect.call_prefix(ORDER) + dialect.call_prefix(BOOK) for t in lazy.triggers)
    tok, comp = compiler
    st = comp.new_state(lazy)
    for i, t in enumerate(tok.encode("Sure. " + good)):
        st.accept(t, i + 1)
    assert st.matcher.is_accepting() and st.error is None and st.activated_at is not None


@pytest.mark.parametrize("dialect", [ToolDialect(), HermesDialect(), Glm4Dialect()], ids=lambda d: d.name)
def test_parser_reads_calls_from_pieces_of_any_size(dialect):
    args = [{"order_number": "A{1}\\"}, {"day": "mon"}]
    text = "Let me check. " + dialect.call_prefix(ORDER) + json.dumps(args[0]) + dialect.call_suffix()
    if dialect.parallel_ok:
        text += "\n" + dialect.call_prefix(BOOK) + json.dumps(args[1]) + dialect.call_suffix()
    rng = random.Random(0)
    for _ in range(30):
        p = ToolCallParser(dialect, TOOLS)
        events, i = [], 0
        while i < len(text):
            k = rng.randint(1, 7)
            events += p.push(text[i:i + k])
            i += k
        events += p.finish()
        said = "".join(e[1] for e in events if e[0] == "text")
        assert said.strip() == "Let me check."
        starts = [e for e in events if e[0] == "call_start"]
        assert starts[0][2] == "check_order_status"
        assert json.loads(p.calls[0][1]) == args[0]
        streamed = "".join(e[2] for e in events if e[0] == "call_args" and e[1] == 0)
        assert streamed == p.calls[0][1]
        if dialect.parallel_ok:
            assert [c[0] for c in p.calls] == ["check_order_status", "book_slot"]
        kinds = [e[0] for e in events]
        assert kinds.index("call_start") < kinds.index("call_args") < kinds.index("call_end")


def test_parser_gives_broken_or_unfinished_calls_back_as_text():
    d = ToolDialect()
    p = ToolCallParser(d, TOOLS)
    ev = p.push('I said <tool_call>{"nome": "x"} oops')
    ev += p.finish()
    assert "".join(e[1] for e in ev if e[0] == "text") == 'I said <tool_call>{"nome": "x"} oops'
    assert not p.calls and not any(e[0] == "call_start" for e in ev)
    p = ToolCallParser(d, TOOLS)
    ev = p.push('<tool_call>{"name": "book_slot", "arguments": {"day": "mo') + p.finish()
    kinds = [e[0] for e in ev]
    assert kinds[0] == "call_start" and "call_abandoned" in kinds and not p.calls
    p = ToolCallParser(d, TOOLS)
    ev = p.push("Opening hours are 9 to 5 <tool") + p.finish()  # a held-back tail comes out at the end
    assert "".join(e[1] for e in ev if e[0] == "text") == "Opening hours are 9 to 5 <tool"
