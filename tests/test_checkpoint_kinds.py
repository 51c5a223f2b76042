"""Every upstream checkpoint kind, loaded from upstream-format random weights and compared with an independent
re-implementation of upstream's maths (tests/upstream_reference.py): MiniMind-3-MoE, MiniMind2-MoE, YaRN rope
scaling, LoRA adapters (per batch row), and the refusals for what is not implemented."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from upstream_reference import random_lora, random_upstream, reference_logits, upstream_config_json

from minimind_course.model.loading import BUNDLED_MODEL_DIR, ModelLoadError, load_model

VOCAB = 2786  # the bundled tokenizer's size, so these models can also be served
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 1999, 3, 64, 128, 5, 2700]])


def assert_upstream(model, sd, c, ids=IDS, lora=None, lora_ids=None):
    with torch.no_grad():
        ours = model(ids, lora_ids=lora_ids).logits
    torch.testing.assert_close(ours, reference_logits(sd, c, ids, lora), atol=2e-4, rtol=2e-4)


def save_pth(tmp_path, sd, name="full_sft.pth", half=False):
    path = tmp_path / name
    torch.save({k: (v.half() if half else v) for k, v in sd.items()}, path)
    return path


def save_folder(tmp_path, sd, c, *, safetensors=True, config_changes=None):
    folder = tmp_path / "model"
    folder.mkdir()
    cfg = upstream_config_json(c) | (config_changes or {})
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    if safetensors:  # MiniMind-3 era: no lm_head (tied)
        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}, folder / "model.safetensors")
    else:  # MiniMind2 era: pytorch_model.bin with both tied keys
        torch.save(sd, folder / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(BUNDLED_MODEL_DIR / name, folder / name)
    return folder


# ---- mixture of experts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("generation", [3, 2], ids=["minimind3-moe", "minimind2-moe"])
def test_moe_pth_equals_upstream(tmp_path, generation):
    sd, c = random_upstream(generation, moe=True, vocab=VOCAB)
    model, _ = load_model(save_pth(tmp_path, sd), num_attention_heads=4, tokenizer_path=BUNDLED_MODEL_DIR)
    cfg = model.config
    assert (cfg.use_moe, cfg.num_experts, cfg.num_experts_per_tok) == (True, 4, 1 if generation == 3 else 2)
    assert cfg.n_shared_experts == (1 if generation == 2 else 0)
    assert_upstream(model, sd, c)


def test_moe_routing_matters():
    """The reference is sensitive to the routing: a different top-k gives different logits."""
    sd, c = random_upstream(3, moe=True, vocab=VOCAB)
    one, two = reference_logits(sd, c, IDS), reference_logits(sd, c | {"top_k": 2}, IDS)
    assert (one - two).abs().max() > 1e-2


@pytest.mark.parametrize(("generation", "top_k", "shared", "safetensors"),
                         [(3, 2, 0, True), (2, 1, 2, False), (2, 2, 1, True)],
                         ids=["minimind3-moe-top2", "minimind2-moe-top1-2shared", "minimind2-moe-top2"])
def test_moe_folder_equals_upstream(tmp_path, generation, top_k, shared, safetensors):
    sd, c = random_upstream(generation, moe=True, vocab=VOCAB, top_k=top_k, shared=shared)
    model, _ = load_model(save_folder(tmp_path, sd, c, safetensors=safetensors))
    assert model.config.num_experts_per_tok == top_k
    assert model.config.n_shared_experts == (shared if generation == 2 else 0)
    assert_upstream(model, sd, c)


def test_moe_fp16_pth_and_cached_decoding(tmp_path):
    sd, c = random_upstream(2, moe=True, vocab=VOCAB)
    sd = {k: v.half().float() for k, v in sd.items()}
    model, _ = load_model(save_pth(tmp_path, sd, half=True), num_attention_heads=4, tokenizer_path=BUNDLED_MODEL_DIR)
    assert_upstream(model, sd, c)
    with torch.no_grad():
        out = model.generate(IDS, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert_upstream(model, sd, c, ids=out)  # the KV-cached decode saw the same model


def test_moe_top_k_for_pth_is_an_argument(tmp_path):
    sd, c = random_upstream(3, moe=True, vocab=VOCAB, top_k=2)
    model, _ = load_model(save_pth(tmp_path, sd), num_experts_per_tok=2, tokenizer_path=BUNDLED_MODEL_DIR)
    assert_upstream(model, sd, c)
    with pytest.raises(ModelLoadError, match="between 1 and the 4 experts"):
        load_model(save_pth(tmp_path, sd, "x.pth"), num_experts_per_tok=5, tokenizer_path=BUNDLED_MODEL_DIR)


# ---- YaRN --------------------------------------------------------------------------------------------------------
def test_yarn_folder_equals_upstream_and_differs_without(tmp_path):
    sd, c = random_upstream(3, moe=False, vocab=VOCAB, hidden=128, heads=2, kv_heads=1, yarn=True)
    model, _ = load_model(save_folder(tmp_path, sd, c))
    assert model.config.yarn["factor"] == 16
    assert_upstream(model, sd, c)
    plain = reference_logits(sd, c | {"yarn": False}, IDS)
    assert (plain - reference_logits(sd, c, IDS)).abs().max() > 1e-3  # YaRN changes short prompts too


@pytest.mark.parametrize("generation", [2, 3])
def test_yarn_pth_through_the_argument(tmp_path, generation):
    sd, c = random_upstream(generation, moe=generation == 2, vocab=VOCAB, hidden=128, heads=2, kv_heads=1, yarn=True)
    path = save_pth(tmp_path, sd)
    model, _ = load_model(path, num_attention_heads=2, rope_scaling="yarn", tokenizer_path=BUNDLED_MODEL_DIR)
    assert_upstream(model, sd, c)
    with pytest.raises(ModelLoadError, match="rope_scaling must be one of yarn"):
        load_model(path, rope_scaling="linear", tokenizer_path=BUNDLED_MODEL_DIR)


def test_yarn_long_prompt_equals_upstream(tmp_path):
    """Beyond upstream's original 2048 positions, where YaRN is meant to help."""
    sd, c = random_upstream(3, moe=False, vocab=VOCAB, layers=1, yarn=True)
    model, _ = load_model(save_folder(tmp_path, sd, c))
    ids = torch.randint(3, VOCAB, (1, 2300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits[:, -8:]
    torch.testing.assert_close(ours, reference_logits(sd, c, ids)[:, -8:], atol=2e-4, rtol=2e-4)


def test_yarn_off_when_the_context_is_not_longer_than_the_original(tmp_path):
    sd, c = random_upstream(3, moe=False, vocab=VOCAB, yarn=True, max_position_embeddings=2048)
    model, _ = load_model(save_folder(tmp_path, sd, c))
    assert_upstream(model, sd, c)
    torch.testing.assert_close(reference_logits(sd, c, IDS), reference_logits(sd, c | {"yarn": False}, IDS))


# ---- LoRA ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def base_and_adapters(tmp_path):
    sd, c = random_upstream(3, moe=False, vocab=VOCAB)
    medical, identity = random_lora(sd, rank=16, seed=1), random_lora(sd, rank=8, seed=2)
    torch.save(medical, tmp_path / "lora_medical_64.pth")
    torch.save(identity, tmp_path / "lora_identity_64.pth")
    return sd, c, {k: v.float() for k, v in medical.items()}, {k: v.float() for k, v in identity.items()}, tmp_path


def test_lora_adapter_targets_the_square_projections(base_and_adapters):
    _, _, medical, _, _ = base_and_adapters
    assert {k.split(".")[-4] for k in medical} == {"q_proj", "o_proj"}


def test_lora_rows_pick_their_adapter(base_and_adapters):
    sd, c, medical, identity, folder = base_and_adapters
    base = save_pth(folder, sd)
    model, _ = load_model(base, tokenizer_path=BUNDLED_MODEL_DIR,
                          lora={"medical": folder / "lora_medical_64.pth", "identity": folder / "lora_identity_64.pth"})
    assert model.lora_names == ["medical", "identity"]
    assert_upstream(model, sd, c, lora=medical, lora_ids=torch.tensor([0]))
    assert_upstream(model, sd, c, lora=identity, lora_ids=torch.tensor([1]))
    assert_upstream(model, sd, c, lora_ids=torch.tensor([-1]))
    assert_upstream(model, sd, c)  # no lora_ids: the base model
    batch = IDS.repeat(3, 1)
    with torch.no_grad():
        mixed = model(batch, lora_ids=torch.tensor([1, -1, 0])).logits
    for row, lora in enumerate([identity, None, medical]):  # one forward pass, three different models
        torch.testing.assert_close(mixed[row:row + 1], reference_logits(sd, c, IDS, lora), atol=2e-4, rtol=2e-4)
    assert (reference_logits(sd, c, IDS, medical) - reference_logits(sd, c, IDS)).abs().max() > 1e-2


def test_lora_single_path_is_named_after_the_file_and_generate_takes_lora_ids(base_and_adapters):
    sd, c, medical, _, folder = base_and_adapters
    model, _ = load_model(save_pth(folder, sd), tokenizer_path=BUNDLED_MODEL_DIR, lora=folder / "lora_medical_64.pth")
    assert model.lora_names == ["lora_medical_64"]
    with torch.no_grad():
        out = model.generate(IDS, max_new_tokens=5, min_new_tokens=5, do_sample=False, lora_ids=torch.tensor([0]))
    expected = IDS
    for _ in range(5):  # greedy decoding with the adapter, recomputed from scratch by the reference
        nxt = reference_logits(sd, c, expected, medical)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(out, expected)


def test_lora_errors_name_the_file(base_and_adapters, tmp_path):
    sd, _, medical, _, folder = base_and_adapters
    base = save_pth(folder, sd)
    with pytest.raises(ModelLoadError, match="a LoRA adapter, not a model"):
        load_model(folder / "lora_medical_64.pth", tokenizer_path=BUNDLED_MODEL_DIR)
    torch.save({"x": torch.zeros(2)}, tmp_path / "not_lora.pth")
    with pytest.raises(ModelLoadError, match="not_lora.pth: not an upstream LoRA adapter"):
        load_model(base, tokenizer_path=BUNDLED_MODEL_DIR, lora=tmp_path / "not_lora.pth")
    bad = dict(medical)
    bad["model.layers.0.mlp.up_proj.lora.A.weight"] = torch.zeros(4, 64)
    torch.save(bad, tmp_path / "mlp_lora.pth")
    with pytest.raises(ModelLoadError, match="mlp_lora.pth: adapter targets 'model.layers.0.mlp.up_proj'"):
        load_model(base, tokenizer_path=BUNDLED_MODEL_DIR, lora=tmp_path / "mlp_lora.pth")
    wide = random_upstream(3, moe=False, vocab=VOCAB, hidden=128, heads=2, kv_heads=1)[0]
    with pytest.raises(ModelLoadError, match="do not fit a 64->64 layer"):
        load_model(base, tokenizer_path=BUNDLED_MODEL_DIR, lora={"x": _saved(tmp_path, random_lora(wide, 4, 0))})


def _saved(tmp_path, tensors):
    path = tmp_path / "adapter.pth"
    torch.save(tensors, path)
    return path


# ---- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("changes", "message"), [
    ({"image_special_token": "@" * 196, "image_ids": [34] * 196}, "unknown fields image_ids, image_special_token"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "inference_rope_scaling is not"),
    ({"inference_rope_scaling": True, "rope_scaling": {"type": "yarn", "factor": 4}}, "differs from the YaRN"),
    ({"model_type": "minimind-v"}, "model_type 'minimind-v' is not supported"),
])
def test_unimplemented_config_fields_are_refused(tmp_path, changes, message):
    sd, c = random_upstream(2, moe=True, vocab=VOCAB)
    folder = save_folder(tmp_path, sd, c, config_changes=changes)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_model(folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_use_moe_without_experts_is_refused(tmp_path):
    sd, c = random_upstream(3, moe=False, vocab=VOCAB)
    with pytest.raises(ModelLoadError, match="use_moe is true but the weights hold no experts"):
        load_model(save_folder(tmp_path, sd, c, config_changes={"use_moe": True}))


# ---- export for vLLM ----------------------------------------------------------------------------------------------
def _exported_logits(folder, ids=IDS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model


@pytest.mark.parametrize(("generation", "moe", "yarn", "architecture"), [
    (3, True, False, "Qwen3MoeForCausalLM"),
    (3, True, True, "Qwen3MoeForCausalLM"),
    (3, False, True, "Qwen3ForCausalLM"),
    (2, False, True, "LlamaForCausalLM"),
], ids=["minimind3-moe", "minimind3-moe-yarn", "minimind3-yarn", "minimind2-yarn"])
def test_export_computes_upstreams_logits_in_transformers(tmp_path, generation, moe, yarn, architecture):
    """The exported folder, run by transformers' own Qwen3-MoE/Qwen3/Llama code, gives upstream's logits."""
    from minimind_course.model.export import export_for_vllm

    sd, c = random_upstream(generation, moe=moe, vocab=VOCAB, yarn=yarn, top_k=2 if moe else None)
    out = export_for_vllm(save_folder(tmp_path, sd, c), tmp_path / "export")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == [architecture]
    assert config["rope_parameters"]["rope_type"] == ("yarn" if yarn else "default")
    logits, native = _exported_logits(out)
    torch.testing.assert_close(logits, reference_logits(sd, c, IDS), atol=2e-4, rtol=2e-4)
    if yarn:  # and on a prompt longer than upstream's original 2048 positions
        ids = torch.randint(3, VOCAB, (1, 2100), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            long = native(ids).logits[:, -4:]
        torch.testing.assert_close(long, reference_logits(sd, c, ids)[:, -4:], atol=3e-4, rtol=3e-4)


def test_minimind2_moe_exports_as_deepseek_moe_v1(tmp_path):
    from safetensors import safe_open

    from minimind_course.model.export import export_for_vllm

    sd, c = random_upstream(2, moe=True, vocab=VOCAB, shared=2)
    out = export_for_vllm(save_pth(tmp_path, sd), tmp_path / "export")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["DeepseekForCausalLM"]
    assert (config["n_routed_experts"], config["n_shared_experts"], config["num_experts_per_tok"]) == (4, 2, 2)
    assert (config["model_type"], config["routed_scaling_factor"], config["first_k_dense_replace"]) == \
        ("deepseek", 1.0, 0)
    assert config["tie_word_embeddings"] is False and (out / "configuration_deepseek.py").is_file()
    with safe_open(out / "model.safetensors", "pt") as f:
        shared_up = f.get_tensor("model.layers.0.mlp.shared_experts.up_proj.weight")
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in f.keys()
    torch.testing.assert_close(shared_up, torch.cat([sd["model.layers.0.mlp.shared_experts.0.up_proj.weight"],
                                                     sd["model.layers.0.mlp.shared_experts.1.up_proj.weight"]]))


def test_lora_exports_as_peft_folders_and_merged(tmp_path, base_and_adapters):
    from safetensors import safe_open

    from minimind_course.model.export import main

    sd, c, medical, _, folder = base_and_adapters
    base = save_pth(folder, sd)
    args = ["--model", str(base), "--out", str(tmp_path / "export")]
    assert main(args + ["--lora", f"medical={folder / 'lora_medical_64.pth'}",
                        "--lora", f"identity={folder / 'lora_identity_64.pth'}"]) == 0
    peft = tmp_path / "export" / "lora" / "medical"
    config = json.loads((peft / "adapter_config.json").read_text(encoding="utf-8"))
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (16, 16, ["o_proj", "q_proj"])
    with safe_open(peft / "adapter_model.safetensors", "pt") as f:
        a = f.get_tensor("base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight")
    torch.testing.assert_close(a, medical["model.layers.1.self_attn.o_proj.lora.A.weight"])
    assert json.loads((tmp_path / "export/lora/identity/adapter_config.json").read_text())["r"] == 8
    assert main(["--model", str(base), "--out", str(tmp_path / "merged"),
                 "--merge-lora", str(folder / "lora_medical_64.pth")]) == 0
    logits, _ = _exported_logits(tmp_path / "merged")
    torch.testing.assert_close(logits, reference_logits(sd, c, IDS, medical), atol=2e-4, rtol=2e-4)


def test_export_refuses_yarn_that_vllm_would_compute_differently(tmp_path, capsys):
    """A small rope_theta moves upstream's ramp end past head_dim/2 - 1, where upstream clamps and vLLM does not."""
    from minimind_course.model.export import main

    sd, c = random_upstream(3, moe=False, vocab=VOCAB, hidden=32, heads=2, kv_heads=1, yarn=True)
    folder = save_folder(tmp_path, sd, c, config_changes={"rope_theta": 50.0})
    assert main(["--model", str(folder), "--out", str(tmp_path / "no")]) == 1
    err = capsys.readouterr().err
    assert "upstream's ramp clamp" in err and err.count("\n") == 1


# ---- served over HTTP ---------------------------------------------------------------------------------------------
PROMPTS = [[1, 17, 42, 99], [1, 250, 1999, 3, 64], [1, 128, 5], [1, 2700, 7, 7, 300, 11]]
NEW_TOKENS = 6


def reference_greedy(sd, c, prompt, lora=None) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(NEW_TOKENS):
        ids = torch.cat([ids, reference_logits(sd, c, ids, lora)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def served(model_path, **engine_kwargs):
    from minimind_course.engine.engine import Engine
    from minimind_course.launch import BackgroundServer
    from minimind_course.serving.app import create_app

    engine = Engine.from_pretrained(model_path, device="cpu", **engine_kwargs)
    return engine, BackgroundServer(create_app(engine, served_model_name="base"))


async def completions(base_url, requests):
    """Send (model, prompt ids) requests all at once; the greedy answer texts, in order."""
    import asyncio

    import httpx

    async with httpx.AsyncClient(base_url=base_url + "/v1", timeout=120) as client:
        async def one(model, prompt):
            response = await client.post("/completions", json={
                "model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True})
            body = response.json()
            assert response.status_code == 200, body
            assert body["model"] == model
            return body["choices"][0]["text"]
        return await asyncio.gather(*(one(model, prompt) for model, prompt in requests))


def text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("generation", [3, 2], ids=["minimind3-moe", "minimind2-moe"])
async def test_moe_served_concurrently_gives_upstreams_greedy_answers(tmp_path, generation):
    sd, c = random_upstream(generation, moe=True, vocab=VOCAB)
    engine, server = served(save_folder(tmp_path, sd, c))
    with server:
        together = await completions(server.base_url, [("base", p) for p in PROMPTS])
        alone = [(await completions(server.base_url, [("base", p)]))[0] for p in PROMPTS]
    engine.close()
    assert together == alone
    for prompt, answer in zip(PROMPTS, together):
        assert answer == text(engine.tokenizer, reference_greedy(sd, c, prompt))


@pytest.mark.asyncio(loop_scope="session")
async def test_two_adapters_and_the_base_served_concurrently(base_and_adapters):
    import httpx

    sd, c, medical, identity, folder = base_and_adapters
    adapters = {"medical": folder / "lora_medical_64.pth", "identity": folder / "lora_identity_64.pth"}
    engine, server = served(save_pth(folder, sd), lora=adapters)
    with server:
        models = httpx.get(server.base_url + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("medical", "base"), ("identity", "base")]
        missing = httpx.post(server.base_url + "/v1/completions", json={"model": "legal", "prompt": "hi"})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
        requests = [(model, prompt) for prompt in PROMPTS[:2] for model in ("medical", "base", "identity")]
        together = await completions(server.base_url, requests)
        alone = [(await completions(server.base_url, [request]))[0] for request in requests]
    engine.close()
    assert together == alone
    loras = {"medical": medical, "base": None, "identity": identity}
    for (model, prompt), answer in zip(requests, together):
        assert answer == text(engine.tokenizer, reference_greedy(sd, c, prompt, loras[model])), model
    assert len(set(together[:3])) > 1  # the adapters really change the answers


def test_the_prefix_cache_keeps_adapters_apart(base_and_adapters):
    """The same prompt under another adapter has other keys/values: no hit; under the same adapter: a hit."""
    import asyncio

    from minimind_course.engine.sampling import SamplingParams

    sd, c, medical, identity, folder = base_and_adapters
    adapters = {"medical": folder / "lora_medical_64.pth", "identity": folder / "lora_identity_64.pth"}
    engine, _ = served(save_pth(folder, sd), lora=adapters)
    seen = []
    engine.stats_listeners.append(lambda stats: seen.append(stats.prefix_cache_hits) if stats.prefix_cache_queries
                                  else None)
    prompt = [1] + [3 + (7 * i) % (VOCAB - 3) for i in range(47)]  # 48 tokens: 2 full blocks before the last
    order = [None, "medical", "identity", "medical", None]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    async def run():
        return [(await engine.submit(prompt, params, lora=lora).result()).texts[0] for lora in order]

    try:
        answers = asyncio.run(run())
    finally:
        engine.close()
    assert seen == [0, 0, 0, 32, 32]
    loras = {"medical": medical, None: None, "identity": identity}
    for lora, answer in zip(order, answers):
        assert answer == text(engine.tokenizer, reference_greedy(sd, c, prompt, loras[lora])), lora


def test_serve_flags_for_adapters_and_yarn(capsys):
    from minimind_course.serve import parse_args

    args = parse_args(["--model", "base.pth", "--lora", "medical=a.pth", "--lora", "identity = b.pth",
                       "--rope-scaling", "yarn"])
    assert args.lora == {"medical": "a.pth", "identity": "b.pth"} and args.rope_scaling == "yarn"
    for bad, message in ((["--lora", "medical"], "NAME=PATH"), (["--lora", "a=x", "--lora", "a=y"], "used twice"),
                         (["--lora", "minimind=x"], "used twice"), (["--rope-scaling", "linear"], "invalid choice")):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert message in capsys.readouterr().err


def test_vllm_backend_exports_adapters_and_passes_them_to_vllm(tmp_path, base_and_adapters):
    """What serve --backend vllm --lora does before vLLM starts: a cached export with PEFT folders, and the flags."""
    from minimind_course.model.export import cached_export
    from minimind_course.serving.vllm_launcher import VLLMServer

    sd, _, _, _, folder = base_and_adapters
    adapters = {"medical": folder / "lora_medical_64.pth", "identity": folder / "lora_identity_64.pth"}
    out = cached_export(save_pth(folder, sd), tmp_path / "cache", lora=adapters)
    assert cached_export(save_pth(folder, sd), tmp_path / "cache", lora=adapters) == out  # reused
    assert cached_export(save_pth(folder, sd), tmp_path / "cache", lora={"medical": adapters["medical"]}) != out
    command = " ".join(VLLMServer(out, port=1234).command)
    assert "--enable-lora --max-loras 2 --max-lora-rank 16 --lora-modules" in command
    assert f"identity={out / 'lora' / 'identity'} medical={out / 'lora' / 'medical'}" in command
    assert "--trust-remote-code" not in command


@pytest.mark.asyncio(loop_scope="session")
async def test_yarn_pth_served_past_the_original_context(tmp_path):
    """--rope-scaling yarn on a .pth: a 2,100-token prompt (beyond upstream's original 2,048, through the engine's
    chunked prefill) is answered as upstream's YaRN maths says."""
    sd, c = random_upstream(3, moe=False, vocab=VOCAB, layers=1, yarn=True)
    engine, server = served(save_pth(tmp_path, sd), rope_scaling="yarn", max_model_len=4096)
    prompt = torch.randint(3, VOCAB, (2100,), generator=torch.Generator().manual_seed(5)).tolist()
    with server:
        (answer,) = await completions(server.base_url, [("base", prompt)])
    engine.close()
    assert answer == text(engine.tokenizer, reference_greedy(sd, c, prompt))


def test_vllm_backend_refuses_lora_on_moe_on_cpu(tmp_path, monkeypatch, capsys):
    """vLLM CPU 0.32 would start and then fail every request (Triton-only LoRA MoE layer): refused before it starts."""
    import argparse

    from minimind_course.serving import vllm_launcher

    sd, _ = random_upstream(3, moe=True, vocab=VOCAB)
    torch.save(random_lora(sd, rank=8, seed=1), tmp_path / "lora.pth")
    monkeypatch.setattr(vllm_launcher, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(model=str(save_pth(tmp_path, sd)), host="127.0.0.1", port=0, served_model_name="base",
                              api_key=None, max_model_len=None, cors_origins=["*"], dtype="float32",
                              export_dir=str(tmp_path / "cache"), lora={"demo": str(tmp_path / "lora.pth")},
                              rope_scaling=None, vllm_args=[])
    assert vllm_launcher.serve_vllm(args) == 1
    err = capsys.readouterr().err
    assert "cannot serve LoRA adapters on a mixture-of-experts model" in err and err.count("\n") == 1
