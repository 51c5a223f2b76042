"""MiniMind's tool-call text format (``tool_format``) and the grammars built on it: the chat template, the parser, the
client's history and the lazy tool grammar agree byte for byte; the grammar accepts exactly the valid calls of the
offered functions, lets text be free before a call, and honours ``parallel_tool_calls``; on both tokenizers."""

import json

import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from minimind_course.client.history import message_text
from minimind_course.model.loading import BUNDLED_MODEL_DIR
from minimind_course.serving.endpoints.chat_completions import to_internal
from minimind_course.serving.internal import InternalRequest
from minimind_course.serving.protocol import ChatCompletionRequest
from minimind_course.serving.structured_output import (
    GrammarError,
    StructuredOutput,
    lazy_tool_grammar,
    needs_grammar,
    request_grammar,
    tool_call_grammar,
)
from minimind_course.serving.tool_parser import extract_tool_calls
from minimind_course.tool_format import (
    CALL_START,
    canonical_arguments,
    parse_call,
    render_assistant,
    render_call,
    render_tool_response,
)
from tool_models import minimind3_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "当前天气", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "现在几点"}}  # no parameters
TOOLS = [WEATHER, TIME]
TOKYO = {"city": "东京", "unit": "celsius"}
CALL_TOKYO = render_call("get_weather", TOKYO)
CALL_TIME = render_call("get_time", {})


@pytest.fixture(scope="module", params=["bundled", "minimind3"])
def tokenizer(request):
    """The bundled tokenizer (tags are several tokens) and upstream MiniMind-3's (tags are single tokens)."""
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR) if request.param == "bundled" else minimind3_tokenizer()


@pytest.fixture(scope="module")
def structured(tokenizer) -> StructuredOutput:
    return StructuredOutput(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


@pytest.fixture(scope="module")
def accepts(tokenizer, structured):
    """``accepts(grammar, text)``: whether ``text`` is a whole answer of the grammar (every character allowed, then
    the end-of-answer token)."""

    def check(grammar: xgr.Grammar, text: str) -> bool:
        matcher = xgr.GrammarMatcher(structured.compiler.compile_grammar(grammar))
        return matcher.accept_string(text) and matcher.accept_token(tokenizer.eos_token_id)

    return check


# ---- the text format -----------------------------------------------------------------------------------------
def test_a_call_is_one_line_of_json_between_the_tags():
    assert CALL_TOKYO == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "东京", "unit": "celsius"}}\n'
                          '</tool_call>')
    assert render_call("get_time", "{}") == CALL_TIME
    assert CALL_TIME == '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert render_tool_response('{"t": "12°C"}') == '\n<tool_response>\n{"t": "12°C"}\n</tool_response>'


@pytest.mark.parametrize("arguments", [TOKYO, {"城市": "北京", "日期": "2026-12-02", "n": 3, "x": 1.5, "ok": True,
                                           "tags": ["a", "乙"], "nested": {"q": None}}, {}])
def test_render_and_parse_round_trip(arguments):
    text = render_assistant("我查一下。", [("get_weather", arguments), ("get_time", json.dumps(arguments))])
    content, calls = extract_tool_calls(text)
    assert content == "我查一下。"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", arguments), ("get_time", arguments)]
    assert [c.arguments for c in calls] == [canonical_arguments(arguments)] * 2
    assert "\\u" not in text  # Chinese is written as itself, not as escapes
    assert parse_call(CALL_TOKYO.removeprefix("<tool_call>").removesuffix("</tool_call>").strip()) == (
        "get_weather", '{"city": "东京", "unit": "celsius"}')


def test_client_restyled_arguments_become_the_canonical_text():
    """A client that re-serializes arguments (ASCII escapes, no spaces) still shows the model its own format."""
    restyled = json.dumps(TOKYO, separators=(",", ":"))  # ensure_ascii: "\u4e1c\u4eac"
    assert canonical_arguments(restyled) == '{"city": "东京", "unit": "celsius"}'
    assert canonical_arguments("not json") == "not json"  # kept as sent: the model sees what the client sent
    request = ChatCompletionRequest(messages=[
        {"role": "user", "content": "东京？"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": restyled}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12°C"}], tools=TOOLS)
    assert request.template_messages()[1]["tool_calls"][0]["function"]["arguments"] == canonical_arguments(TOKYO)


def test_chat_template_and_client_history_write_the_format(tokenizer):
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(
        TOKYO, ensure_ascii=False)}}, {"id": "c2", "type": "function", "function": {"name": "get_time",
                                                                                    "arguments": "{}"}}]
    assistant = {"role": "assistant", "content": "我查一下。", "tool_calls": calls}
    messages = [{"role": "user", "content": "东京？"}, assistant,
                {"role": "tool", "tool_call_id": "c1", "content": "12°C"},
                {"role": "tool", "tool_call_id": "c2", "content": "9:00"}]
    prompt = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    turn = render_assistant("我查一下。", [("get_weather", TOKYO), ("get_time", {})])
    assert turn + "<|im_end|>\n" in prompt
    assert ("<|im_start|>user" + render_tool_response("12°C") + render_tool_response("9:00") + "<|im_end|>\n"
            in prompt)
    assert message_text(assistant) == turn  # what the client counts tokens on
    bundled_file = (BUNDLED_MODEL_DIR / "chat_template.jinja").read_text(encoding="utf-8")
    assert AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR).chat_template == bundled_file


# ---- the grammars --------------------------------------------------------------------------------------------
def test_lazy_grammar_accepts_free_text_and_exactly_valid_calls(accepts):
    lazy = lazy_tool_grammar(TOOLS, parallel=True)
    good = ["", "Just text, with < and </ and <tool and 东京 <b>bold</b>.", CALL_TOKYO,
            "我查一下。\n" + CALL_TOKYO, "先查天气。\n" + CALL_TOKYO + "\n再查时间。\n" + CALL_TIME,
            CALL_TOKYO + "\n" + CALL_TIME + "\n好的。"]
    for text in good:
        assert accepts(lazy, text), text
    bad = [CALL_TOKYO.replace("get_weather", "get_wether"),  # not an offered function
           render_call("get_weather", {"city": "东京", "unit": "kelvin"}),  # not in the enum
           render_call("get_weather", {"city": "东京"}),  # a required argument missing
           render_call("get_weather", {"city": 12, "unit": "celsius"}),  # wrong type
           render_call("get_weather", {"city": "东京东京东京东京东", "unit": "celsius"}),  # longer than maxLength
           render_call("get_weather", {**TOKYO, "extra": 1}),  # not in the schema
           render_call("get_time", {"city": "东京"}),  # a parameterless function takes {}
           CALL_TOKYO.replace(', "unit": ', ',"unit":'),  # the JSON is written compactly, one style only
           CALL_TOKYO.replace("\n</tool_call>", "</tool_call>"),
           '<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>',  # keys in the format's order
           "text " + CALL_TOKYO[:-3]]  # the call is cut off: the answer cannot end inside it
    for text in bad:
        assert not accepts(lazy, text), text


def test_without_parallel_calls_the_answer_ends_after_its_one_call(accepts):
    single = lazy_tool_grammar(TOOLS, parallel=False)
    assert accepts(single, "我查一下。\n" + CALL_TOKYO) and accepts(single, "no call")
    assert not accepts(single, CALL_TOKYO + "\n" + CALL_TIME)
    assert not accepts(single, CALL_TOKYO + " and text")


def test_forced_grammar_is_calls_only(accepts):
    forced = tool_call_grammar(TOOLS, parallel=True)
    assert accepts(forced, CALL_TOKYO) and accepts(forced, CALL_TOKYO + "\n" + CALL_TIME)
    assert not accepts(forced, "")  # at least one call
    assert not accepts(forced, "text\n" + CALL_TOKYO)
    one = tool_call_grammar(TOOLS, parallel=False)
    assert accepts(one, CALL_TIME) and not accepts(one, CALL_TOKYO + "\n" + CALL_TIME)


def test_after_the_trigger_only_the_offered_names_are_allowed(tokenizer, structured):
    """Token by token, as the engine decodes: the model's own tokens pass until it writes the trigger; then the mask
    spells the head, and only the offered names' first characters are left."""
    constraint = structured.factory(lazy_tool_grammar(TOOLS, parallel=True))()
    vocab = len(tokenizer)
    for token in tokenizer.encode('好的 <b>x</b> ' + CALL_START + '\n{"name": "get_', add_special_tokens=False):
        row = torch.zeros(vocab)
        constraint.apply(row)
        assert row[token] == 0, tokenizer.decode([token])
        constraint.accept(token)
    row = torch.zeros(vocab)
    constraint.apply(row)
    allowed = {tokenizer.decode([i]) for i in torch.isfinite(row).nonzero().flatten().tolist()}
    assert allowed and all("weather".startswith(t) or "time".startswith(t) for t in allowed), allowed
    assert {t[:1] for t in allowed} == {"w", "t"}


def test_trigger_as_one_upstream_token(structured, tokenizer):
    """On MiniMind-3's tokenizer ``<tool_call>`` is a single token: it triggers the grammar as well."""
    ids = tokenizer.encode(CALL_TIME, add_special_tokens=False)
    single = tokenizer.convert_tokens_to_ids(CALL_START)
    if single == tokenizer.unk_token_id or single is None or ids[0] != single:
        pytest.skip("this tokenizer spells <tool_call> in several tokens")
    constraint = structured.factory(lazy_tool_grammar(TOOLS, parallel=False))()
    constraint.accept(single)
    row = torch.zeros(len(tokenizer))
    constraint.apply(row)
    allowed = [tokenizer.decode([i]) for i in torch.isfinite(row).nonzero().flatten().tolist()]
    assert allowed and all(text.startswith("\n") or "\n".startswith(text) for text in allowed)


def body(**fields) -> InternalRequest:
    """A chat request as the grammar code sees it: the endpoint's neutral request."""
    return to_internal(ChatCompletionRequest(messages=[{"role": "user", "content": "东京天气？"}], **fields), {})


def test_request_grammar_per_tool_choice(accepts):
    auto = body(tools=TOOLS)
    assert needs_grammar(auto) and not needs_grammar(auto, "off") and request_grammar(auto, False, "off") is None
    assert not needs_grammar(body(tools=TOOLS, tool_choice="none")) and not needs_grammar(body())
    assert accepts(request_grammar(auto, False), "好的。\n" + CALL_TOKYO + "\n" + CALL_TIME)
    one = body(tools=TOOLS, parallel_tool_calls=False)
    assert not accepts(request_grammar(one, False), CALL_TOKYO + "\n" + CALL_TIME)
    named = body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert accepts(request_grammar(named, False, "off"), CALL_TIME)
    assert not accepts(request_grammar(named, False), CALL_TOKYO)
    with_json = body(tools=TOOLS, response_format={"type": "json_object"})  # auto: a call, or the JSON answer
    assert accepts(request_grammar(with_json, False), '{"city": "东京"}')
    assert accepts(request_grammar(with_json, False), CALL_TOKYO)
    assert not accepts(request_grammar(with_json, False), "text")
    assert not accepts(request_grammar(with_json, False, "off"), CALL_TOKYO)  # off: JSON only


def test_reasoning_may_hold_angle_brackets(accepts):
    named = body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    grammar = request_grammar(named, thinking=True)
    assert accepts(grammar, "比较 a < b，<tool_call> 不算。\n</think>\n\n" + CALL_TOKYO)
    assert not accepts(grammar, "想一想。\n</think>\n\n" + CALL_TIME)
    lazy = request_grammar(body(tools=TOOLS), thinking=True)
    assert accepts(lazy, "x<y\n</think>\n\n答案。")


def test_a_schema_the_grammar_cannot_hold_is_the_users_error_in_auto_too():
    """With the lazy grammar a tool's parameters are compiled in ``auto`` as well: one xgrammar cannot compile is
    a 400 naming that tool's parameters (``GrammarError.param``), not a call that could never be made."""
    broken = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}
    with pytest.raises(GrammarError) as err:
        request_grammar(body(tools=[WEATHER, broken]), False)
    assert err.value.param == "tools.1.function.parameters"
    assert request_grammar(body(tools=[WEATHER, broken]), False, "off") is None  # off: auto is not compiled
