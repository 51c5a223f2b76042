"""Plug and play, proven with the real tools: openai (sync, async, streaming), LangChain, LlamaIndex and curl
hold the same greedy conversations with our server and with real vLLM serving the export.

Per backend, the openai SDK's non-streaming greedy answer is the reference; every other client must get exactly
that text (streaming reassembled chunk by chunk), and the token counts the server reports.
"""

import asyncio
import functools
import operator

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

from minimind_course.client.ecosystem import chatml_prompt, curl_chat

MAX_TOKENS = 32
CONVERSATIONS = {
    "english": [{"role": "user", "content": "What is an OpenAI-compatible API?"}],
    "chinese": [{"role": "user", "content": "请介绍一下你自己。"}],
    "with-system": [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Why does streaming make a chat feel faster?"}],
    "multi-turn": [{"role": "user", "content": "My name is Alice."},
                   {"role": "assistant", "content": "Nice to meet you, Alice!"},
                   {"role": "user", "content": "What is my name?"}],
}
NAMES = list(CONVERSATIONS)


@pytest.fixture(scope="module")
def sdk(backend):
    base_url, _ = backend
    with openai.OpenAI(base_url=base_url, api_key="any-key", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference(backend, sdk):
    """The openai SDK's non-streaming greedy answer to every conversation: {name: ChatCompletion}."""
    _, model = backend
    return {name: sdk.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
            for name, messages in CONVERSATIONS.items()}


def test_openai_sdk_answers_with_text_and_usage(reference):
    for name, response in reference.items():
        choice = response.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content, name
        assert choice.finish_reason in ("stop", "length")
        usage = response.usage
        assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= MAX_TOKENS
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert (choice.finish_reason == "length") == (usage.completion_tokens == MAX_TOKENS)
    # Multi-turn history reaches the model: the prompt is longer than the last question alone.
    assert reference["multi-turn"].usage.prompt_tokens > reference["english"].usage.prompt_tokens


@pytest.mark.parametrize("name", NAMES)
def test_openai_sdk_stream_reassembles_to_the_same_answer(backend, sdk, reference, name):
    _, model = backend
    stream = sdk.chat.completions.create(model=model, messages=CONVERSATIONS[name], temperature=0,
                                         max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    expected = reference[name]
    assert text == expected.choices[0].message.content
    assert finish == [expected.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == expected.usage


@pytest.mark.asyncio(loop_scope="session")
async def test_openai_async_client_concurrent_answers_match(backend, reference):
    base_url, model = backend
    async with openai.AsyncOpenAI(base_url=base_url, api_key="any-key", max_retries=0, timeout=120) as client:
        async def ask(messages):
            response = await client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                            max_tokens=MAX_TOKENS)
            return response.choices[0].message.content

        async def ask_streaming(messages):
            stream = await client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                          max_tokens=MAX_TOKENS, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        answers = await asyncio.gather(*(ask(m) for m in CONVERSATIONS.values()),
                                       *(ask_streaming(m) for m in CONVERSATIONS.values()))
    expected = [r.choices[0].message.content for r in reference.values()]
    assert answers == expected + expected


def _langchain_messages(messages):
    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    # Text parts, as LangChain itself sends multimodal-style content: the server must join them.
    return [kinds[m["role"]](content=[{"type": "text", "text": m["content"]}]) for m in messages]


@pytest.fixture(scope="module")
def langchain_llm(backend):
    base_url, model = backend
    # max_completion_tokens is what langchain-openai sends (not max_tokens): the server must honour it.
    return ChatOpenAI(base_url=base_url, api_key="any-key", model=model, temperature=0,
                      max_completion_tokens=MAX_TOKENS, max_retries=0, stream_usage=True)


@pytest.mark.parametrize("name", NAMES)
def test_langchain_invoke(langchain_llm, reference, name):
    message = langchain_llm.invoke(_langchain_messages(CONVERSATIONS[name]))
    expected = reference[name]
    assert message.content == expected.choices[0].message.content
    assert message.response_metadata["finish_reason"] == expected.choices[0].finish_reason
    assert message.usage_metadata["input_tokens"] == expected.usage.prompt_tokens
    assert message.usage_metadata["output_tokens"] == expected.usage.completion_tokens


def test_langchain_stream(langchain_llm, reference):
    chunks = list(langchain_llm.stream(_langchain_messages(CONVERSATIONS["chinese"])))
    assert len(chunks) > 2  # really streamed, not one block
    whole = functools.reduce(operator.add, chunks)
    expected = reference["chinese"]
    assert whole.content == expected.choices[0].message.content
    assert whole.usage_metadata["output_tokens"] == expected.usage.completion_tokens


def _llama_index(backend, is_chat_model, **kwargs):
    base_url, model = backend
    # max_tokens set: otherwise LlamaIndex sizes the answer with tiktoken, which downloads its tables.
    return OpenAILike(model=model, api_base=base_url, api_key="any-key", is_chat_model=is_chat_model,
                      temperature=0, max_tokens=MAX_TOKENS, max_retries=0, context_window=1024, **kwargs)


def _llama_messages(messages):
    return [ChatMessage(role=m["role"], content=m["content"]) for m in messages]


@pytest.mark.parametrize("name", NAMES)
def test_llama_index_chat_model(backend, reference, name):
    llm = _llama_index(backend, is_chat_model=True)
    answer = llm.chat(_llama_messages(CONVERSATIONS[name]))
    assert answer.message.content == reference[name].choices[0].message.content
    streamed = "".join(part.delta or "" for part in llm.stream_chat(_llama_messages(CONVERSATIONS[name])))
    assert streamed == answer.message.content


def test_llama_index_completion_model_uses_the_template_it_is_given(backend, sdk, reference, engine):
    """is_chat_model=False calls /v1/completions; with the model's ChatML template the answer equals chat's."""
    _, model = backend
    question = CONVERSATIONS["chinese"][0]["content"]
    llm = _llama_index(backend, is_chat_model=False,
                       completion_to_prompt=lambda q: chatml_prompt([{"role": "user", "content": q}], engine.tokenizer))
    answer = llm.complete(question)
    assert answer.raw.object == "text_completion"  # it really went through /v1/completions
    assert answer.text == reference["chinese"].choices[0].message.content
    assert "".join(part.delta or "" for part in llm.stream_complete(question)) == answer.text
    prompt = chatml_prompt(CONVERSATIONS["chinese"], engine.tokenizer)
    raw = sdk.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    assert raw.choices[0].text == answer.text


@pytest.mark.parametrize("name", ["english", "chinese"])
def test_curl(backend, reference, name):
    base_url, model = backend
    expected = reference[name]
    plain = curl_chat(base_url, model, CONVERSATIONS[name], max_tokens=MAX_TOKENS)
    assert plain.text == expected.choices[0].message.content
    assert plain.usage["completion_tokens"] == expected.usage.completion_tokens
    streamed = curl_chat(base_url, model, CONVERSATIONS[name], max_tokens=MAX_TOKENS, stream=True)
    assert streamed.raw.endswith("data: [DONE]\n\n")
    assert streamed.text == plain.text and streamed.finish_reason == plain.finish_reason
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # vLLM adds null *_details fields
    assert [streamed.usage[k] for k in counts] == [plain.usage[k] for k in counts]
