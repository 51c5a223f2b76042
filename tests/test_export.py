"""export_for_vllm(): Llama/Qwen3 folders with the same logits as MiniMind, tokenizer and template intact, CLI errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from minimind_course.model.export import cached_export, export_for_vllm, main, source_fingerprint
from minimind_course.model.loading import BUNDLED_MODEL_DIR, load_model
from minimind_course.model import MiniMindConfig, MiniMindForCausalLM
from minimind_course.training.tokenizer import train_bpe, wrap_fast_tokenizer

VOCAB = 320
MESSAGES = [{"role": "system", "content": "你是 MiniMind。"}, {"role": "user", "content": "什么是 vLLM？"}]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["hello world, 你好世界。什么是 vLLM？", "the model answers questions about the KV cache"] * 20
    return wrap_fast_tokenizer(train_bpe(texts, VOCAB), model_max_length=256)


def minimind_folder(path, tokenizer, qk_norm: bool):
    """Save a small random MiniMind (head_dim 64, as vLLM's CPU attention needs) with non-trivial norms."""
    torch.manual_seed(0)
    config = MiniMindConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=64, qk_norm=qk_norm, max_position_embeddings=256)
    model = MiniMindForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True,
                                               temperature=0.7, max_new_tokens=256)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_same_logits(source_dir, export_dir):
    ours, _ = load_model(source_dir, device="cpu", dtype=torch.float32)
    native = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
    return native


@pytest.mark.parametrize(("qk_norm", "architecture"), [(False, "LlamaForCausalLM"), (True, "Qwen3ForCausalLM")],
                         ids=["minimind2-llama", "minimind3-qwen3"])
def test_export_has_the_same_logits(tmp_path, tokenizer, qk_norm, architecture):
    source = minimind_folder(tmp_path / "src", tokenizer, qk_norm)
    out = export_for_vllm(source, tmp_path / "out")
    native = assert_same_logits(source, out)
    assert type(native).__name__ == architecture
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == [architecture]
    assert "auto_map" not in config  # nothing for --trust-remote-code to run
    assert config["head_dim"] == 64 and config["num_key_value_heads"] == 1
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e6
    assert config["rms_norm_eps"] == (1e-6 if qk_norm else 1e-5)
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 256
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)


def test_bundled_model_exports_with_the_same_logits(tmp_path):
    out = export_for_vllm(None, tmp_path / "out")
    assert_same_logits(BUNDLED_MODEL_DIR, out)


def test_tokenizer_chat_template_and_generation_config_travel(tmp_path, tokenizer):
    out = export_for_vllm(minimind_folder(tmp_path / "src", tokenizer, False), tmp_path / "out")
    exported = AutoTokenizer.from_pretrained(out)
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert exported.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    assert exported("你好世界")["input_ids"] == tokenizer("你好世界")["input_ids"]
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    assert generation.temperature == 0.7  # a sampling default both servers apply
    assert "max_new_tokens" not in generation.to_diff_dict()  # vLLM would make it a server-wide cap


def test_half_precision_export(tmp_path, tokenizer):
    out = export_for_vllm(minimind_folder(tmp_path / "src", tokenizer, True), tmp_path / "out", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["dtype"] == "bfloat16"
    native = AutoModelForCausalLM.from_pretrained(out)
    assert native.model.embed_tokens.weight.dtype == torch.bfloat16


def test_cached_export_reuses_and_rebuilds_when_the_source_changes(tmp_path, tokenizer):
    source = minimind_folder(tmp_path / "src", tokenizer, False)
    first = cached_export(source, tmp_path / "cache")
    before = first.joinpath("model.safetensors").stat().st_mtime_ns
    assert cached_export(source, tmp_path / "cache") == first
    assert first.joinpath("model.safetensors").stat().st_mtime_ns == before  # reused, not rewritten
    minimind_folder(source, tokenizer, True)  # same path, other weights
    second = cached_export(source, tmp_path / "cache")
    assert second != first and second.name == source_fingerprint(source)
    assert json.loads((second / "config.json").read_text(encoding="utf-8"))["architectures"] == ["Qwen3ForCausalLM"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, second.name])


def test_cli_exports_and_says_how_to_serve(tmp_path, tokenizer, capsys):
    source = minimind_folder(tmp_path / "src", tokenizer, False)
    assert main(["--model", str(source), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "--served-model-name minimind" in out


@pytest.mark.parametrize("bad", ["missing-folder", "not-a-model.txt", "empty-folder"])
def test_cli_bad_model_is_one_line_and_exit_1(tmp_path, capsys, bad):
    (tmp_path / "not-a-model.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "empty-folder").mkdir()
    assert main(["--model", str(tmp_path / bad), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("export failed: ") and bad in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
