"""The logits pipeline: each knob changes the distribution the way OpenAI/vLLM define it."""

import torch

from minimind_course.engine.sampling import (
    PresenceFrequencyPenalty,
    SamplingParams,
    build_logits_pipeline,
    make_generator,
    next_tokens,
)

PROMPT = torch.tensor([[7, 7, 1]])  # token 7 twice in the prompt


def sequence(*generated):
    return torch.cat([PROMPT, torch.tensor([list(generated)], dtype=torch.long)], dim=1)


def test_presence_and_frequency_count_generated_tokens_only():
    scores = torch.zeros(1, 10)
    out = PresenceFrequencyPenalty(presence=0.5, frequency=0.25, prompt_len=3)(sequence(4, 4, 4, 5), scores)
    assert out[0, 4].item() == -0.5 - 3 * 0.25
    assert out[0, 5].item() == -0.5 - 0.25
    assert out[0, 7].item() == 0.0  # only in the prompt: untouched (OpenAI semantics)


def test_repetition_penalty_covers_prompt_tokens_like_vllm():
    pipeline = build_logits_pipeline(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_len=3)
    scores = torch.tensor([[0.0] * 7 + [4.0, 0.0, 3.0]])
    out = pipeline(sequence(), scores.clone())
    assert out[0, 7].item() == 2.0 and out[0, 9].item() == 3.0


def test_greedy_ignores_the_warpers_but_not_the_penalties():
    params = SamplingParams(temperature=0, top_k=1, top_p=0.1, frequency_penalty=2.0)
    scores = torch.tensor([[0.0, 3.0, 2.5]])
    pick = next_tokens(params, build_logits_pipeline(params, 3), sequence(1), scores, make_generator(0, "cpu"))
    assert pick.tolist() == [2]  # token 1 was generated once: 3.0 - 2.0 < 2.5


def test_top_k_and_top_p_restrict_the_candidates():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for params, allowed in ((SamplingParams(top_k=2), {0, 1}), (SamplingParams(top_p=0.7), {0, 1})):
        pipeline = build_logits_pipeline(params, 3)
        draws = {next_tokens(params, pipeline, sequence(), scores, make_generator(seed, "cpu")).item()
                 for seed in range(200)}
        assert draws == allowed


def test_temperature_sharpens_and_flattens():
    scores = torch.log(torch.tensor([[0.6, 0.4]]))
    cold = build_logits_pipeline(SamplingParams(temperature=0.1), 3)(sequence(), scores.clone()).softmax(-1)
    hot = build_logits_pipeline(SamplingParams(temperature=2.0), 3)(sequence(), scores.clone()).softmax(-1)
    assert cold[0, 0] > 0.95 and 0.5 < hot[0, 0] < 0.6


def test_seeded_generators_repeat_and_unseeded_ones_differ():
    scores = torch.zeros(1, 1000)
    params = SamplingParams()

    def draw(generator):
        return [next_tokens(params, build_logits_pipeline(params, 3), sequence(), scores, generator).item()
                for _ in range(5)]

    seeded = make_generator(42, "cpu")
    assert draw(seeded) == draw(make_generator(42, "cpu")) != draw(make_generator(None, "cpu"))


def test_logit_bias_is_added_before_the_penalties_and_bans_or_forces_a_token():
    scores = torch.tensor([[0.0, 3.0, 2.5, 1.0]])
    for bias, expected in (({1: -100.0}, 2), ({3: 100.0}, 3), ({}, 1)):
        params = SamplingParams(temperature=0, logit_bias=bias)
        pick = next_tokens(params, build_logits_pipeline(params, 3), sequence(), scores, make_generator(0, "cpu"))
        assert pick.tolist() == [expected]
    params = SamplingParams(temperature=0, logit_bias={2: 0.25})
    out = build_logits_pipeline(params, 3)(sequence(), scores.clone())
    assert out.tolist() == [[0.0, 3.0, 2.75, 1.0]]  # added, as OpenAI defines it, not multiplied


def test_min_p_drops_tokens_below_a_fraction_of_the_best_after_temperature():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(min_p=0.25)  # keeps p >= 0.125: tokens 0, 1, 2
    pipeline = build_logits_pipeline(params, 3)
    draws = {next_tokens(params, pipeline, sequence(), scores, make_generator(seed, "cpu")).item()
             for seed in range(300)}
    assert draws == {0, 1, 2}
    # vLLM's order: temperature first. logits [0, -1] at temperature 0.5 -> ratio e^-2 = 0.14 < 0.3: token 1 goes
    two = torch.tensor([[0.0, -1.0]])
    sharp = build_logits_pipeline(SamplingParams(temperature=0.5, min_p=0.3), 3)(sequence(), two.clone())
    flat = build_logits_pipeline(SamplingParams(min_p=0.3), 3)(sequence(), two.clone())
    assert sharp[0, 1].item() == float("-inf") and flat[0, 1].item() == -1.0


def test_bad_min_p_and_logit_bias_keys_are_refused():
    import pytest

    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 5.0})
