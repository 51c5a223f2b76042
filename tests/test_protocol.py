"""Request models: what clients send is accepted, mapped to sampling parameters, or refused with a reason."""

import pytest
from pydantic import ValidationError

from minimind_course.serving.protocol import MAX_N, ChatCompletionRequest, CompletionRequest, OpenAIError, error_body

USER = [{"role": "user", "content": "你好"}]


def test_max_completion_tokens_wins_over_max_tokens():
    req = ChatCompletionRequest(messages=USER, max_tokens=50, max_completion_tokens=3)
    assert req.requested_max_tokens() == 3
    assert ChatCompletionRequest(messages=USER, max_tokens=50).requested_max_tokens() == 50
    assert ChatCompletionRequest(messages=USER).requested_max_tokens() is None  # the server fills the context


def test_content_parts_are_joined_like_vllm():
    parts = [{"type": "text", "text": "第一段"}, {"type": "text", "text": "second"}]
    req = ChatCompletionRequest(messages=[{"role": "user", "content": parts}])
    assert req.template_messages() == [{"role": "user", "content": "第一段\nsecond"}]


def test_image_parts_are_refused():
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_developer_role_is_a_system_prompt_and_none_content_is_empty():
    req = ChatCompletionRequest(messages=[{"role": "developer", "content": "be brief"},
                                          {"role": "assistant", "content": None}])
    assert req.template_messages() == [{"role": "system", "content": "be brief"}, {"role": "assistant", "content": ""}]


def test_unknown_fields_are_ignored():
    req = ChatCompletionRequest(messages=USER, store=False, metadata={"k": "v"}, foo={"x": 1})
    assert not hasattr(req, "foo")


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", 2.5), ("top_p", 0.0), ("top_p", 1.5),
                                         ("n", 0), ("n", MAX_N + 1), ("max_tokens", 0), ("max_completion_tokens", 0),
                                         ("presence_penalty", 3), ("frequency_penalty", -3), ("repetition_penalty", 0),
                                         ("top_k", -2), ("top_logprobs", 21)])
def test_out_of_range_values_are_rejected(field, value):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest(messages=USER, **{field: value})
    assert field in str(err.value)


def test_sampling_params_request_then_model_defaults_then_openai_defaults():
    defaults = {"temperature": 0.7, "top_k": 40}
    params = ChatCompletionRequest(messages=USER, temperature=0, stop="\n\n", seed=5, n=2).sampling_params(9, defaults)
    assert (params.temperature, params.top_k, params.top_p, params.stop, params.seed, params.n, params.max_tokens) == (
        0.0, 40, 1.0, ("\n\n",), 5, 2, 9)
    assert params.greedy
    params = ChatCompletionRequest(messages=USER, stop=["a", "", "b"]).sampling_params(4, defaults)
    assert params.temperature == 0.7 and params.stop == ("a", "b")


def test_include_usage_only_when_streaming():
    opts = {"include_usage": True}
    assert ChatCompletionRequest(messages=USER, stream=True, stream_options=opts).include_usage
    assert not ChatCompletionRequest(messages=USER, stream=False, stream_options=opts).include_usage


def test_completion_prompt_forms():
    assert CompletionRequest(prompt="hi").single_prompt() == "hi"
    assert CompletionRequest(prompt=[5, 6]).single_prompt() == [5, 6]
    assert CompletionRequest(prompt=["hi"]).single_prompt() == "hi"
    assert CompletionRequest(prompt=[[5, 6]]).single_prompt() == [5, 6]
    assert CompletionRequest(prompt="hi").max_tokens == 16  # OpenAI's default for the legacy endpoint
    with pytest.raises(ValidationError, match="one prompt per request"):
        CompletionRequest(prompt=["a", "b"])
    with pytest.raises(ValidationError, match="echo"):
        CompletionRequest(prompt="a", echo=True)


def test_error_envelope():
    assert error_body(404, "The model `x` does not exist.", "model") == {
        "error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}}
    assert OpenAIError(429, "busy").body()["error"]["type"] == "RateLimitError"


def test_lone_surrogates_are_refused_before_the_tokenizer_sees_them():
    with pytest.raises(ValidationError, match="surrogate"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "a\ud800b"}])
    with pytest.raises(ValidationError, match="surrogate"):
        CompletionRequest(prompt="\udfff")


def test_logprobs_request_fields():
    assert ChatCompletionRequest(messages=USER).sampling_params(4, {}).logprobs is None
    assert ChatCompletionRequest(messages=USER, logprobs=True).sampling_params(4, {}).logprobs == 0
    assert ChatCompletionRequest(messages=USER, logprobs=True, top_logprobs=5).sampling_params(4, {}).logprobs == 5
    with pytest.raises(ValidationError, match="top_logprobs requires logprobs"):
        ChatCompletionRequest(messages=USER, top_logprobs=2)
