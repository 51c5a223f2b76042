"""Backend-agnostic OpenAI wire-format checks, driven with the official openai SDK (sync and async) and raw HTTP.

Every check uses only the ``endpoint`` fixture (base_url ending in /v1, model name, api key), so the same checks run
against our server (tests/test_conformance.py) and against real vLLM: write a module that does
``from openai_conformance import *`` and defines an ``endpoint`` fixture for the vLLM server.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

CHINESE = [{"role": "user", "content": "请介绍一下你自己。"}]
ENGLISH = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}
FIXED_LENGTH = {"ignore_eos": True}  # vLLM extra: makes output length independent of what the model learned


def sdk(endpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0, timeout=120)


def http(endpoint) -> httpx.Client:
    return httpx.Client(base_url=endpoint.base_url, headers={"Authorization": f"Bearer {endpoint.api_key}"},
                        timeout=120)


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, checking that nothing else is on the wire."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: "):])
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def chat(endpoint, messages, **kwargs) -> ChatCompletion:
    with sdk(endpoint) as client:
        return client.chat.completions.create(model=endpoint.model, messages=messages, **kwargs)


def streamed_text(endpoint, messages, **kwargs) -> tuple[str, list[ChatCompletionChunk]]:
    with sdk(endpoint) as client:
        chunks = list(client.chat.completions.create(model=endpoint.model, messages=messages, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    return error


# ---- endpoints ----------------------------------------------------------------------------------------
def test_models_list_the_served_model_with_its_context_length(endpoint):
    with sdk(endpoint) as client:
        models = client.models.list().data
    served = {m.id: m for m in models}
    assert endpoint.model in served
    assert served[endpoint.model].object == "model"
    assert served[endpoint.model].max_model_len > 0  # LlamaIndex and chat UIs read the context size here


def test_health_answers_200(endpoint):
    root = endpoint.base_url.removesuffix("/v1")
    assert httpx.get(root + "/health", timeout=30).status_code == 200


# ---- non-streaming ------------------------------------------------------------------------------------
def test_chat_completion_has_the_openai_shape(endpoint):
    answer = chat(endpoint, CHINESE, max_tokens=24, **GREEDY)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.model == endpoint.model and answer.created > 1_600_000_000
    choice = answer.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_ids_are_unique_per_request(endpoint):
    ids = {chat(endpoint, ENGLISH, max_tokens=1).id for _ in range(5)}
    assert len(ids) == 5


def test_greedy_decoding_is_deterministic(endpoint):
    first = chat(endpoint, CHINESE, max_tokens=32, **GREEDY).choices[0].message.content
    assert chat(endpoint, CHINESE, max_tokens=32, **GREEDY).choices[0].message.content == first


def test_max_completion_tokens_wins_over_max_tokens(endpoint):
    answer = chat(endpoint, CHINESE, max_tokens=40, max_completion_tokens=3, extra_body=FIXED_LENGTH, **GREEDY)
    assert answer.usage.completion_tokens == 3
    assert answer.choices[0].finish_reason == "length"


def test_stop_strings_cut_the_output(endpoint):
    full = chat(endpoint, CHINESE, max_tokens=30, extra_body=FIXED_LENGTH, **GREEDY).choices[0].message.content
    assert len(full) >= 6, f"the model's answer is too short to pick a stop string from: {full!r}"
    stop = full[len(full) // 2: len(full) // 2 + 2]
    for stop_field in (stop, [stop, "never-appears-xyz"]):
        cut = chat(endpoint, CHINESE, max_tokens=30, stop=stop_field, extra_body=FIXED_LENGTH, **GREEDY)
        assert cut.choices[0].message.content == full[: full.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_seed_reproduces_sampled_text(endpoint):
    def sample(seed):
        return chat(endpoint, CHINESE, max_tokens=20, temperature=2.0, seed=seed,  # flat enough to differ
                    extra_body=FIXED_LENGTH).choices[0].message.content

    assert sample(42) == sample(42)
    assert len({sample(seed) for seed in (1, 2, 3, 4)}) > 1


def test_n_returns_n_indexed_choices(endpoint):
    answer = chat(endpoint, ENGLISH, max_tokens=8, n=3, temperature=1.0, seed=7)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.message.content is not None for c in answer.choices)


def test_text_content_parts_equal_string_content(endpoint):
    parts = [{"role": "user", "content": [{"type": "text", "text": CHINESE[0]["content"]}]}]
    as_parts = chat(endpoint, parts, max_tokens=24, **GREEDY).choices[0].message.content
    assert as_parts == chat(endpoint, CHINESE, max_tokens=24, **GREEDY).choices[0].message.content


def test_unknown_and_client_specific_fields_are_accepted(endpoint):
    answer = chat(endpoint, ENGLISH, max_tokens=4, user="student-7", presence_penalty=0.5, frequency_penalty=0.5,
                  extra_body={"some_future_field": {"x": 1}, "top_k": 20, "repetition_penalty": 1.1})
    assert answer.choices[0].message.role == "assistant"


def test_logprobs_with_top_alternatives(endpoint):
    answer = chat(endpoint, CHINESE, max_tokens=5, logprobs=True, top_logprobs=3, extra_body=FIXED_LENGTH, **GREEDY)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens == 5
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and entry.bytes
        ranked = [alt.logprob for alt in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
    assert chat(endpoint, CHINESE, max_tokens=2).choices[0].logprobs is None  # only when asked


def test_streamed_logprobs_cover_every_token(endpoint):
    _, chunks = streamed_text(endpoint, ENGLISH, max_tokens=6, logprobs=True, extra_body=FIXED_LENGTH,
                              stream_options={"include_usage": True}, **GREEDY)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens == 6


def test_top_logprobs_without_logprobs_is_400(endpoint):
    with http(endpoint) as client:
        assert_error(client.post("/chat/completions", json={"model": endpoint.model, "messages": ENGLISH,
                                                            "top_logprobs": 2}), 400)


# ---- streaming ----------------------------------------------------------------------------------------
def test_stream_chunk_sequence_on_the_wire(endpoint):
    body = {"model": endpoint.model, "messages": CHINESE, "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}
    with http(endpoint) as client, client.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"  # strict clients need the role first
    assert {(c.id, c.created, c.model, c.object) for c in chunks} == {
        (chunks[0].id, chunks[0].created, endpoint.model, "chat.completion.chunk")}
    assert chunks[0].id.startswith("chatcmpl-")
    *content, finish, usage = chunks
    assert finish.choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in content)
    assert usage.choices == [] and usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens
    assert usage.usage.completion_tokens <= 16


@pytest.mark.parametrize("messages", [CHINESE, ENGLISH], ids=["chinese", "english"])
def test_stream_reassembles_byte_exact_to_the_non_streaming_answer(endpoint, messages):
    whole = chat(endpoint, messages, max_tokens=48, **GREEDY)
    text, chunks = streamed_text(endpoint, messages, max_tokens=48, **GREEDY)
    assert text.encode("utf-8") == whole.choices[0].message.content.encode("utf-8")
    assert not any("\ufffd" in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]


def test_usage_chunk_only_when_asked(endpoint):
    _, plain = streamed_text(endpoint, ENGLISH, max_tokens=4)
    assert all(c.usage is None and c.choices for c in plain)
    _, with_usage = streamed_text(endpoint, ENGLISH, max_tokens=4, stream_options={"include_usage": True})
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens <= 4


def test_streamed_n_choices_each_finish(endpoint):
    _, chunks = streamed_text(endpoint, ENGLISH, max_tokens=6, n=2, temperature=1.0, seed=3)
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


# ---- legacy completions -------------------------------------------------------------------------------
def test_completions_stream_and_non_stream_agree(endpoint):
    with sdk(endpoint) as client:
        whole = client.completions.create(model=endpoint.model, prompt="从前有座山，", max_tokens=24, **GREEDY)
        chunks = list(client.completions.create(model=endpoint.model, prompt="从前有座山，", max_tokens=24, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
    assert isinstance(whole, Completion) and whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.usage.completion_tokens <= 24
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_default_to_16_tokens(endpoint):
    with sdk(endpoint) as client:
        answer = client.completions.create(model=endpoint.model, prompt="从前有座山，", extra_body=FIXED_LENGTH)
    assert answer.usage.completion_tokens == 16 and answer.choices[0].finish_reason == "length"


# ---- async client -------------------------------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="session")
async def test_async_client_streams_and_runs_concurrently(endpoint):
    async with openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0) as client:
        stream = await client.chat.completions.create(model=endpoint.model, messages=CHINESE, max_tokens=24,
                                                      stream=True, **GREEDY)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        answers = await asyncio.gather(*[
            client.chat.completions.create(model=endpoint.model, messages=CHINESE, max_tokens=24, **GREEDY)
            for _ in range(4)])
    assert {a.choices[0].message.content for a in answers} == {streamed}


# ---- errors -------------------------------------------------------------------------------------------
def test_unknown_model_is_404_in_the_envelope(endpoint):
    with http(endpoint) as client:
        error = assert_error(client.post("/chat/completions", json={"model": "gpt-4-does-not-exist",
                                                                    "messages": ENGLISH}), 404)
    assert "gpt-4-does-not-exist" in error["message"]
    with sdk(endpoint) as client, pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4-does-not-exist", messages=ENGLISH)


@pytest.mark.parametrize("bad", [
    {"temperature": 5}, {"top_p": 1.5}, {"n": 0}, {"max_tokens": -1}, {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": "hi"}, {"stop": 42},
])
def test_invalid_parameters_are_400_in_the_envelope(endpoint, bad):
    body = {"model": endpoint.model, "messages": ENGLISH, **bad}
    with http(endpoint) as client:
        assert_error(client.post("/chat/completions", json=body), 400)


def test_invalid_json_is_400(endpoint):
    with http(endpoint) as client:
        response = client.post("/chat/completions", content=b'{"messages": [', headers={"Content-Type":
                                                                                        "application/json"})
    assert_error(response, 400)


def test_context_overflow_is_400_with_the_standard_wording(endpoint):
    with sdk(endpoint) as client:
        context = {m.id: m for m in client.models.list().data}[endpoint.model].max_model_len
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=endpoint.model, max_tokens=4,
                                           messages=[{"role": "user", "content": "你好 " * context}])
    message = err.value.body["message"] if isinstance(err.value.body, dict) else str(err.value)
    assert f"maximum context length is {context} tokens" in message
    assert "Please reduce the length of the messages or completion" in message


def test_cors_preflight_with_authorization_passes(endpoint):
    headers = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
    response = httpx.options(endpoint.base_url + "/chat/completions", headers=headers, timeout=30)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "http://localhost:3000")
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
