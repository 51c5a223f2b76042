"""The engine on its own: UTF-8-safe deltas, stop strings, limits, cancellation, the bounded queue, seeds."""

import asyncio
import time

import pytest

from minimind_course.engine.engine import ChoiceDelta, ContextLengthError, Engine, EngineBusyError, StepOutput, merge_steps
from minimind_course.engine.sampling import SamplingParams
from scripted_model import ScriptedLM, byte_tokens

TEXT = "你好，世界！😀 MiniMind 🚀"


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.tokenizer


def scripted_engine(tokenizer, script, **kwargs):
    model = ScriptedLM(script, len(tokenizer), step_delay=kwargs.pop("step_delay", 0.0))
    return Engine(model, tokenizer, **kwargs)


async def collect(engine, params, prompt=(1, 2, 4)):
    deltas = []
    async for step in engine.submit(list(prompt), params):
        deltas.extend(step.choices)
    return deltas, step


def test_split_characters_are_never_streamed_half_done(tokenizer):
    script = byte_tokens(tokenizer, TEXT) + [tokenizer.eos_token_id]
    engine = scripted_engine(tokenizer, script)
    deltas, last = asyncio.run(collect(engine, SamplingParams(temperature=0, max_tokens=100)))
    engine.close()
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == TEXT
    assert deltas[-1].finish_reason == "stop"
    assert last.completion_tokens == len(script)  # the end-of-sequence token counts, as in OpenAI's usage
    assert len(deltas) < len(script)  # bytes of one character travel together


def test_stop_string_cuts_and_length_limit_says_length(tokenizer):
    engine = scripted_engine(tokenizer, byte_tokens(tokenizer, "第一行\n第二行\n第三行"))
    deltas, _ = asyncio.run(collect(engine, SamplingParams(temperature=0, max_tokens=100, stop=("\n第二",))))
    assert "".join(d.text for d in deltas) == "第一行" and deltas[-1].finish_reason == "stop"
    deltas, last = asyncio.run(collect(engine, SamplingParams(temperature=0, max_tokens=4)))
    engine.close()
    assert deltas[-1].finish_reason == "length" and last.completion_tokens == 4
    assert "".join(d.text for d in deltas) == "第一"[:1] + "\ufffd"  # 4 bytes: one character and a broken one


def test_ignore_eos_generates_exactly_max_tokens(tokenizer):
    engine = scripted_engine(tokenizer, [tokenizer.eos_token_id])
    _, last = asyncio.run(collect(engine, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)))
    engine.close()
    assert last.completion_tokens == 7


def test_n_choices_finish_independently(tokenizer):
    engine = scripted_engine(tokenizer, byte_tokens(tokenizer, "ab") + [tokenizer.eos_token_id])
    deltas, last = asyncio.run(collect(engine, SamplingParams(n=3, temperature=0, max_tokens=10)))
    engine.close()
    assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1, 2]
    assert last.completion_tokens == 3 * 3


def test_context_length_error_uses_the_standard_wording(tokenizer):
    engine = scripted_engine(tokenizer, [5])
    with pytest.raises(ContextLengthError) as err:
        engine.completion_budget(4000, 200)
    assert str(err.value) == (
        "This model's maximum context length is 4096 tokens. However, you requested 4200 tokens (4000 in the "
        "messages, 200 in the completion). Please reduce the length of the messages or completion.")
    assert engine.completion_budget(4000, None) == 96  # no max_tokens: whatever the context has left
    with pytest.raises(ContextLengthError):
        engine.completion_budget(4096, None)
    engine.close()


def test_cancel_frees_the_worker_at_once(tokenizer):
    engine = scripted_engine(tokenizer, [5], step_delay=0.01)

    async def abandon():
        handle = engine.submit([1, 2], SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True))
        async for step in handle:
            if step.completion_tokens >= 3:
                break  # leaving the loop cancels the request

    asyncio.run(abandon())
    deadline = time.monotonic() + 2
    while engine.active is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active is None
    engine.close()


def test_full_queue_is_refused_not_grown(tokenizer):
    """Requests beyond the running seats (one here) wait in the bounded queue; past its size they are refused."""
    engine = scripted_engine(tokenizer, [5], step_delay=0.01, max_queue=1, max_num_seqs=1)

    async def flood():
        params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
        running = engine.submit([1], params)
        await running.__aiter__().__anext__()  # the worker runs it: the queue is empty, the only seat taken
        waiting = engine.submit([1], params)
        with pytest.raises(EngineBusyError):
            engine.submit([1], params)
        running.cancel()
        waiting.cancel()

    asyncio.run(flood())
    engine.close()


def test_worker_errors_reach_the_caller_and_the_worker_survives(tokenizer):
    engine = scripted_engine(tokenizer, [tokenizer.eos_token_id])
    with pytest.raises(RuntimeError, match="scripted failure"):
        asyncio.run(collect(engine, SamplingParams(temperature=0, max_tokens=5), prompt=[ScriptedLM.FAIL_TOKEN]))
    deltas, _ = asyncio.run(collect(engine, SamplingParams(temperature=0, max_tokens=5)))
    engine.close()
    assert deltas[-1].finish_reason == "stop"


def test_seed_reproduces_sampling_and_choices_differ(engine):
    prompt = engine.encode(engine.chat_prompt([{"role": "user", "content": "讲一个故事"}]))
    params = SamplingParams(n=4, temperature=2.0, max_tokens=24, seed=1234, ignore_eos=True)  # flat: choices differ
    first, _ = asyncio.run(collect(engine, params, prompt))
    second, _ = asyncio.run(collect(engine, params, prompt))
    # Compare text per choice: the chunking may differ (steps pile up and merge when the reader lags).
    texts = ["".join(d.text for d in first if d.index == i) for i in range(4)]
    assert texts == ["".join(d.text for d in second if d.index == i) for i in range(4)]
    assert len(set(texts)) > 1  # each choice is its own sample


def test_logit_bias_steers_greedy_rows_batched_with_plain_greedy_ones(engine):
    """The greedy fast path (one argmax for plain rows) must not skip a row's bias; in one batch."""
    prompt = engine.encode(engine.chat_prompt([{"role": "user", "content": "你好，请介绍一下你自己"}]))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def run():
        plain = await engine.submit(prompt, greedy).result()
        first = engine.encode(plain.texts[0])[0]
        forced = engine.encode("Z")[0]  # one ASCII letter, one token, whatever the tokenizer
        banned, steered, again = await asyncio.gather(
            engine.submit(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                 logit_bias={first: -100.0})).result(),
            engine.submit(prompt, SamplingParams(temperature=0, max_tokens=1, logit_bias={forced: 100.0})).result(),
            engine.submit(prompt, greedy).result())
        return plain, first, forced, banned, steered, again

    plain, first, forced, banned, steered, again = asyncio.run(run())
    assert again.texts == plain.texts  # the plain row beside them is untouched
    assert engine.encode(banned.texts[0])[0] != first and first not in engine.encode(banned.texts[0])
    assert engine.encode(steered.texts[0]) == [forced]
    with pytest.raises(ValueError, match="logit_bias"):
        asyncio.run(collect(engine, SamplingParams(logit_bias={10**9: 1.0})))


def test_generation_config_supplies_sampling_defaults(tokenizer):
    from transformers import GenerationConfig

    model = ScriptedLM([5], len(tokenizer))
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=5, top_k=7, eos_token_id=2)
    engine = Engine(model, tokenizer)
    assert engine.sampling_defaults == {"top_k": 7, "temperature": 0.0}  # do_sample false: greedy by default
    assert engine.completion_budget(10, None) == 4096 - 10  # max_new_tokens is no server-wide cap
    assert engine.completion_budget(10, 50) == 50
    assert 2 in engine.eos_token_ids
    engine.close()


def test_steps_that_piled_up_are_merged_per_choice():
    steps = [StepOutput([ChoiceDelta(0, "你"), ChoiceDelta(1, "a")], 5, 2, False),
             StepOutput([ChoiceDelta(1, "b", "length")], 5, 3, False),
             StepOutput([ChoiceDelta(0, "好", "stop")], 5, 4, True)]
    merged = merge_steps(steps)
    assert merged.choices == [ChoiceDelta(0, "你好", "stop"), ChoiceDelta(1, "ab", "length")]
    assert (merged.prompt_tokens, merged.completion_tokens, merged.finished) == (5, 4, True)
    assert merge_steps(steps[:1]) is steps[0]


def test_a_slow_reader_gets_merged_chunks_with_the_same_text(tokenizer):
    script = byte_tokens(tokenizer, TEXT) + [tokenizer.eos_token_id]
    engine = scripted_engine(tokenizer, script)

    async def slow_reader():
        handle = engine.submit([1, 2, 4], SamplingParams(temperature=0, max_tokens=100))
        await asyncio.sleep(0.3)  # the whole answer is generated meanwhile
        return [step async for step in handle]

    steps = asyncio.run(slow_reader())
    engine.close()
    assert len(steps) == 1 and steps[0].finished
    assert steps[0].choices == [ChoiceDelta(0, TEXT, "stop")]
