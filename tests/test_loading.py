"""load_model(): every checkpoint format, strict keys, shapes inferred, clear errors."""

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from safetensors.torch import save_file

from minimind_course.model.loading import ModelLoadError, infer_config, load_model, pick_device, pick_dtype
from minimind_course.model import MiniMindConfig, MiniMindForCausalLM

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE with upstream's special tokens, so these tests need no bundled model."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, 你好世界", "the model answers questions"] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    assert len(fast) <= VOCAB
    return folder


def build(qk_norm: bool, hidden=128, heads=2, kv_heads=1, head_dim=64, layers=2, vocab=VOCAB):
    torch.manual_seed(0)
    cfg = MiniMindConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim, qk_norm=qk_norm)
    model = MiniMindForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm loaded into the wrong place shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


IDS = torch.tensor([[1, 17, 42, 99, 7, 250]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_same(a, b):
    torch.testing.assert_close(logits(a), logits(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["minimind2", "minimind3"])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_pth_round_trip(tmp_path, tokenizer_dir, qk_norm, half):
    model = build(qk_norm)
    if half:  # upstream ships fp16 .pth files; compare against the fp16-rounded weights (not the RoPE buffer)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    state = {k: (v.half() if half else v) for k, v in model.state_dict().items()}
    shutil.copytree(tokenizer_dir, tmp_path / "model")  # upstream layout: model/ next to out/
    (tmp_path / "out").mkdir()
    torch.save(state, tmp_path / "out" / "full_sft_128.pth")
    loaded, tokenizer = load_model(tmp_path / "out" / "full_sft_128.pth", num_attention_heads=2, device="cpu")
    assert next(loaded.parameters()).dtype == torch.float32  # fp32 on CPU, even from an fp16 file
    assert loaded.config.qk_norm is qk_norm
    assert len(tokenizer) == len(PreTrainedTokenizerFast.from_pretrained(tokenizer_dir))
    assert_same(loaded, model)


def test_pth_without_lm_head_uses_the_tied_embedding(tmp_path, tokenizer_dir):
    model = build(False)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "w.pth")
    loaded, _ = load_model(tmp_path / "w.pth", num_attention_heads=2, tokenizer_path=tokenizer_dir)
    assert_same(loaded, model)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["minimind2", "minimind3"])
def test_transformers_folder_round_trip(tmp_path, tokenizer_dir, qk_norm):
    model = build(qk_norm)
    model.save_pretrained(tmp_path)
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    loaded, _ = load_model(tmp_path)
    assert_same(loaded, model)


def upstream_config(model: MiniMindForCausalLM, with_head_dim: bool) -> dict:
    """config.json as upstream writes it: custom auto_map, extra fields, no q/k-norm flag."""
    c = model.config
    cfg = {"architectures": ["MiniMindForCausalLM"], "model_type": "minimind",
           "auto_map": {"AutoConfig": "model_minimind.MiniMindConfig",
                        "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"},
           "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
           "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
           "intermediate_size": c.intermediate_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": 1e6,
           "max_position_embeddings": 32768, "flash_attn": True, "dropout": 0.0, "use_moe": False,
           "inference_rope_scaling": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    if with_head_dim:
        cfg["head_dim"] = c.head_dim
    return cfg


def test_upstream_minimind2_folder_with_bin_and_both_tied_keys(tmp_path, tokenizer_dir):
    model = build(False, hidden=128, heads=2)
    (tmp_path / "config.json").write_text(json.dumps(upstream_config(model, False)), encoding="utf-8")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "pytorch_model.bin")
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    loaded, _ = load_model(tmp_path)
    assert loaded.config.qk_norm is False
    assert_same(loaded, model)
    assert_same(AutoModelForCausalLM.from_pretrained(tmp_path), model)  # auto_map ignored: no remote code


def test_upstream_minimind3_folder_safetensors_without_lm_head(tmp_path, tokenizer_dir):
    model = build(True, hidden=192, heads=2, kv_heads=1, head_dim=96)
    (tmp_path / "config.json").write_text(json.dumps(upstream_config(model, True)), encoding="utf-8")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    loaded, _ = load_model(tmp_path)
    assert loaded.config.qk_norm is True
    assert_same(loaded, model)


def test_llama_folder_loads_through_transformers(tmp_path, tokenizer_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    loaded, _ = load_model(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("hidden,heads,kv_heads,qk_norm,head_dim", [
    (512, 8, 2, False, 64),   # MiniMind2-small
    (768, 8, 2, False, 96),   # MiniMind2 base
    (768, 8, 4, True, 96),    # MiniMind-3
    (512, 8, 4, True, 64),
])
def test_shapes_are_inferred(hidden, heads, kv_heads, qk_norm, head_dim):
    cfg = MiniMindConfig(hidden_size=hidden, num_hidden_layers=3, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim, qk_norm=qk_norm)
    with torch.device("meta"):
        state = MiniMindForCausalLM(cfg).state_dict()
    got = infer_config(state)
    assert (got.hidden_size, got.num_hidden_layers, got.num_attention_heads) == (hidden, 3, heads)
    assert (got.num_key_value_heads, got.head_dim, got.qk_norm) == (kv_heads, head_dim, qk_norm)
    assert (got.vocab_size, got.intermediate_size, got.rms_norm_eps) == (6400, cfg.intermediate_size, cfg.rms_norm_eps)


def test_bad_path_names_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.pth: no such file"):
        load_model(tmp_path / "nope.pth")


def test_corrupt_pth_is_one_clear_error(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="broken.pth: not a readable PyTorch state dict"):
        load_model(tmp_path / "broken.pth")


def test_wrong_shapes_name_the_file(tmp_path, tokenizer_dir):
    state = build(False).state_dict()
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ModelLoadError, match=r"bad.pth: weights do not fit.*up_proj"):
        load_model(tmp_path / "bad.pth", num_attention_heads=2, tokenizer_path=tokenizer_dir)


def test_missing_tokenizer_is_explained(tmp_path):
    torch.save(build(False, vocab=6400).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ModelLoadError, match="no tokenizer next to the checkpoint"):
        load_model(tmp_path / "w.pth", num_attention_heads=2)


def test_folder_without_tokenizer_is_explained(tmp_path):
    build(False).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(tmp_path)


def test_moe_checkpoint_is_refused(tmp_path, tokenizer_dir):
    state = build(False).state_dict()
    state["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(4, 4)
    torch.save(state, tmp_path / "moe.pth")
    with pytest.raises(ModelLoadError, match="mixture-of-experts"):
        load_model(tmp_path / "moe.pth", tokenizer_path=tokenizer_dir)


def test_device_and_dtype_choice():
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    assert pick_device("cpu").type == "cpu"
