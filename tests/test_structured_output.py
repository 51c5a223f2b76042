"""Grammar-constrained decoding in our engine (xgrammar): forced tool calls and JSON output always parse and follow
their schema when they finish, on the bundled model (tags are several tokens) and on a random-weight MiniMind-3
checkpoint whose tokenizer has upstream's tool tokens as single tokens."""

import asyncio
import json

import jsonschema
import pytest
import torch

from minimind_course.engine.engine import Engine
from minimind_course.model.loading import load_model
from minimind_course.serving.endpoints.chat_completions import to_internal
from minimind_course.serving.protocol import ChatCompletionRequest
from minimind_course.engine.sampling import SamplingParams
from minimind_course.serving.structured_output import GrammarError, StructuredOutput, request_grammar
from minimind_course.serving.tool_parser import extract_tool_calls
from minimind_course.serving.reasoning import split_reasoning
from tool_models import build_minimind3_folder

USER = [{"role": "user", "content": "查一下东京和北京的天气，按 JSON 回答。"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters at all
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["学生", "老师"]}, "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
CASES = {
    "required": {"tools": [WEATHER, TIME], "tool_choice": "required"},
    "required-one": {"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False},
    "named": {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                                "strict": True}}},
}


@pytest.fixture(scope="module")
def minimind3_engine(tmp_path_factory):
    model, tokenizer = load_model(build_minimind3_folder(tmp_path_factory.mktemp("minimind3")))
    engine = Engine(model, tokenizer)
    yield engine
    engine.close()


def generate(engine: Engine, fields: dict, n: int = 3, max_tokens: int = 160, thinking: bool = False, seed: int = 0,
             **kwargs):
    body = ChatCompletionRequest(messages=USER, **fields)
    template_kwargs = {"open_thinking": True} if thinking else {}
    prompt = engine.tokenizer.apply_chat_template(body.template_messages(), tools=body.active_tools() or None,
                                                  tokenize=False, add_generation_prompt=True, **template_kwargs)
    structured = StructuredOutput(engine.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids)
    factory = structured.factory(request_grammar(to_internal(body, {}), thinking))
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=seed, **kwargs)

    async def run():
        return await engine.submit(engine.encode(prompt), params, constraint=factory).result()

    return body, asyncio.run(run())


def check_finished(body: ChatCompletionRequest, text: str, thinking: bool = False) -> None:
    """A finished answer parses and follows the schema (tools: every call is valid for its function)."""
    reasoning, text = split_reasoning(text, thinking)
    assert (reasoning is not None) == thinking
    if body.forced_tools():
        content, calls = extract_tool_calls(text)
        assert content == "" and calls
        if body.tool_choice != "required" or not body.parallel_tool_calls:
            assert len(calls) == 1
        schemas = {t.function.name: t.function.parameters or {"type": "object"} for t in body.forced_tools()}
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    else:
        jsonschema.validate(json.loads(text), body.json_format())


@pytest.mark.parametrize("case", CASES)
def test_bundled_model_answers_always_follow_the_grammar(engine, case):
    body, result = generate(engine, CASES[case])
    finished = [t for t, r in zip(result.texts, result.finish_reasons) if r == "stop"]
    assert finished, result  # the schemas are bounded, so sampled answers end well within the budget
    for text in finished:
        check_finished(body, text)


@pytest.mark.parametrize("case", CASES)
def test_minimind3_checkpoint_with_single_tool_tokens(minimind3_engine, case):
    body, result = generate(minimind3_engine, CASES[case], seed=1)
    for text, reason in zip(result.texts, result.finish_reasons):
        if reason == "stop":
            check_finished(body, text)
    assert "stop" in result.finish_reasons, result
    if body.forced_tools():  # the tags were drawn as the single upstream tokens, as a MiniMind-3 would write them
        assert result.texts[0].startswith("<tool_call>\n{")


def test_open_thinking_reasons_first_then_follows_the_grammar(minimind3_engine):
    """With an open <think> in the prompt the grammar lets the model reason, then forces the call."""
    engine = minimind3_engine
    body = ChatCompletionRequest(messages=USER, **CASES["named"])
    structured = StructuredOutput(engine.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids)
    constraint = structured.factory(request_grammar(to_internal(body, {}), thinking=True))()
    text = '先想一想：东京。\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "东京", ' \
           '"unit": "celsius"}}\n</tool_call>'
    for token in engine.encode(text) + [engine.tokenizer.eos_token_id]:
        logits = torch.zeros(engine.model.config.vocab_size)
        constraint.apply(logits)
        assert logits[token] == 0, engine.tokenizer.decode([token])  # every token of the valid answer is allowed
        constraint.accept(token)
    assert constraint.done()
    check_finished(body, text, thinking=True)


def test_each_choice_has_its_own_grammar_state_and_logprobs_stay_the_models(engine):
    body, result = generate(engine, CASES["json_schema"], n=4, logprobs=0)
    assert len(set(result.texts)) > 1  # sampled choices differ, yet each one is valid on its own
    for text in result.texts:
        check_finished(body, text)
    assert all(item.logprob <= 0 for choice in result.logprobs for item in choice)


def test_ignore_eos_still_ends_when_the_grammar_is_complete(engine):
    _, result = generate(engine, CASES["named"], n=1, ignore_eos=True)
    assert result.finish_reasons == ["stop"]
    assert result.texts[0].endswith("</tool_call>")


def test_no_free_whitespace_inside_json(engine):
    structured = StructuredOutput(engine.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids)
    body = ChatCompletionRequest(messages=USER, **CASES["json_object"])
    constraint = structured.factory(request_grammar(to_internal(body, {}), False))()
    for token in engine.encode('{"a": 1'):
        constraint.accept(token)
    logits = torch.zeros(engine.model.config.vocab_size)
    constraint.apply(logits)
    allowed = [engine.tokenizer.decode([i]) for i in torch.nonzero(logits > float("-inf")).flatten().tolist()]
    assert allowed and not any(text[:1].isspace() for text in allowed)  # a wandering model cannot pad with spaces
    assert "}" in allowed and "," in allowed


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}], "tool_choice": "required"},
     "tools.0.function.parameters"),
])
def test_a_schema_xgrammar_cannot_compile_is_a_grammar_error(engine, fields, param):
    with pytest.raises(GrammarError) as err:
        request_grammar(to_internal(ChatCompletionRequest(messages=USER, **fields), {}), False)
    assert err.value.param == param
