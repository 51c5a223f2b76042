"""The MiniMind implementation: both generations, KV cache, padding, HF integration."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minimind_course.model.minimind import (
    MiniMindConfig,
    MiniMindForCausalLM,
    minimind2_intermediate_size,
    minimind3_intermediate_size,
)


def tiny(qk_norm: bool, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    cfg = MiniMindConfig(vocab_size=97, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, qk_norm=qk_norm, **kw)
    return MiniMindForCausalLM(cfg).eval()


def test_upstream_intermediate_sizes():
    assert minimind2_intermediate_size(512) == 1408
    assert minimind2_intermediate_size(768) == 2048
    assert minimind3_intermediate_size(768) == 2432


@pytest.mark.parametrize("qk_norm", [False, True])
def test_parameter_names_match_upstream(qk_norm):
    keys = set(tiny(qk_norm).state_dict())
    layer = {k.removeprefix("model.layers.0.") for k in keys if k.startswith("model.layers.0.")}
    expected = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    if qk_norm:
        expected |= {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
    assert layer == expected
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys


def test_config_defaults_follow_the_generation():
    v2 = MiniMindConfig()
    assert (v2.qk_norm, v2.head_dim, v2.intermediate_size, v2.rms_norm_eps) == (False, 64, 1408, 1e-5)
    v3 = MiniMindConfig(hidden_size=768, num_key_value_heads=4, head_dim=96)  # MiniMind-3 configs carry head_dim
    assert (v3.qk_norm, v3.intermediate_size, v3.rms_norm_eps) == (True, 2432, 1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_lm_head_is_tied(qk_norm):
    model = tiny(qk_norm)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_generation_equals_full_recompute(qk_norm):
    model = tiny(qk_norm)
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        seq = ids
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_left_padding_gives_the_same_logits():
    model = tiny(False)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(ids).logits
        batched = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_loss_ignores_masked_labels():
    model = tiny(False)
    ids = torch.randint(3, 97, (2, 8))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, 3:-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 4:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_registered_with_auto_classes(tmp_path):
    model = tiny(True)
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "MiniMindConfig"
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_moe_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="Mixture-of-experts"):
        MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1, use_moe=True))
