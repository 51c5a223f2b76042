"""The decode-bound helpers of notebook 09: bytes counted once per tensor, measurements that run (no thresholds)."""

import torch

from minimind_course.bench.decode_bound import (
    decode_bound,
    distinct_parameters,
    measure_copy_bandwidth,
    measure_decode_tokens_per_s,
    random_minimind2_small,
    weight_bytes,
)


def test_minimind2_small_shape_and_bytes():
    model = random_minimind2_small()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (512, 8, 6400)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    per_layer = 2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 1408 + 2 * 512  # q,o + k,v (2 kv heads) + mlp + norms
    expected = 6400 * 512 + 8 * per_layer + 512
    assert sum(p.numel() for p in distinct_parameters(model)) == expected
    assert weight_bytes(model) == 4 * expected
    assert weight_bytes(random_minimind2_small(torch.bfloat16)) == 2 * expected


def test_measurements_are_positive_and_batched_decode_counts_all_sequences():
    model = random_minimind2_small()
    assert measure_copy_bandwidth(1 << 20, repeats=2) > 0
    assert measure_decode_tokens_per_s(model, new_tokens=2, prompt_tokens=4, repeats=1, batch_size=3) > 0
    result = decode_bound(model, bandwidth=1e9, new_tokens=2)
    assert result.bound_tokens_per_s == 1e9 / weight_bytes(model)
    assert result.fraction_of_bound == result.measured_tokens_per_s / result.bound_tokens_per_s
    assert "tokens/s" in result.report()
