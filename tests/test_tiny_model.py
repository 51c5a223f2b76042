"""The bundled MiniMind-Tiny: folder format, tokenizer and template, greedy behaviour, memory demo, corpus."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from minimind_course.training.corpus import CorpusBuilder, build_corpus, load_json
from minimind_course.training.evaluate import NAME_SETS, GreedyChat, eval_memory
from minimind_course.model.loading import BUNDLED_MODEL_DIR, load_model
from minimind_course.model import MiniMindForCausalLM
from minimind_course.training.train import encode_dialogue, name_pieces, render_with_spans

HELDOUT = load_json("heldout_names.json")
MIN_PIECE_COUNT = 20  # times each byte-level piece of a held-out "zh_common" name occurs in 20,000 training names


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-1 decoding of a 4M-parameter model is fastest on one thread (and kinder to a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)


@pytest.fixture(scope="module")
def chat(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    return GreedyChat(model, tokenizer)


def test_loads_with_auto_classes_and_ties_lm_head(chat):
    model = chat.model
    assert isinstance(model, MiniMindForCausalLM)
    assert model.config.model_type == "minimind" and model.config.architectures == ["MiniMindForCausalLM"]
    assert model.config.head_dim == 64 and not model.config.qk_norm
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_load_model_gives_the_bundled_model(tokenizer):
    model, tok = load_model(device="cpu")
    assert isinstance(model, MiniMindForCausalLM)
    assert model.config.vocab_size == len(tok) == len(tokenizer)


def test_folder_is_small_float16_and_stores_tied_weights_once():
    size = sum(f.stat().st_size for f in BUNDLED_MODEL_DIR.iterdir() if f.is_file())
    assert size <= 10 * 1024 * 1024
    with safe_open(BUNDLED_MODEL_DIR / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert "lm_head.weight" not in keys
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    record = json.loads((BUNDLED_MODEL_DIR / "training.json").read_text(encoding="utf-8"))
    assert len(record["corpus_sha256"]) == 64 and record["train_seconds"] > 0


def test_special_tokens_match_upstream(tokenizer):
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.is_fast
    assert tokenizer.encode("hello")[0] != tokenizer.bos_token_id  # add_bos_token is false
    config = json.loads((BUNDLED_MODEL_DIR / "generation_config.json").read_text(encoding="utf-8"))
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 0)


def test_chat_template_is_chatml_without_default_system(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "我叫李华。"},
        {"role": "assistant", "content": "你好，李华！"},
        {"role": "user", "content": "What is SSE?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n我叫李华。<|im_end|>\n"
        "<|im_start|>assistant\n你好，李华！<|im_end|>\n"
        "<|im_start|>user\nWhat is SSE?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_system = tokenizer.apply_chat_template(messages[1:2], tokenize=False, open_thinking=True)
    assert no_system == "<|im_start|>user\n我叫李华。<|im_end|>\n"
    parts = [{"role": "user", "content": [{"type": "text", "text": "我叫李华。"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == no_system


def test_tokenized_template_matches_training_encoding(tokenizer):
    messages = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Nice to meet you, Ada!"}]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True)  # transformers 5: a BatchEncoding
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    train_ids, labels = encode_dialogue(tokenizer, messages)
    assert list(ids) == train_ids
    assert render_with_spans(messages)[0] == tokenizer.apply_chat_template(messages, tokenize=False)
    trained = tokenizer.decode([t for t, lab in zip(train_ids, labels) if lab != -100])
    assert trained == "Nice to meet you, Ada!<|im_end|>"


def test_cjk_is_one_token_per_character_and_text_round_trips(tokenizer):
    for name in HELDOUT["zh"][:20]:
        assert len(tokenizer.encode(name)) == len(name)
    text = "流式输出 SSE，emoji 😀👍🏽，ünïcode，罕见字龘。"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_greedy_decoding_is_deterministic(chat):
    messages = [{"role": "user", "content": "Tell me a story."}]
    assert chat(messages, 40) == chat(messages, 40)


@pytest.mark.parametrize("question, terms", [
    ("What is vLLM?", ["vLLM"]),
    ("What is the KV cache?", ["KV cache"]),
    ("什么是流式输出？", ["流式", "SSE"]),
    ("什么是 PagedAttention？", ["PagedAttention"]),
])
def test_course_questions_mention_their_term(chat, question, terms):
    answer = chat([{"role": "user", "content": question}], 64)
    assert any(t in answer for t in terms), answer


MEMORY = {
    "en": ("My name is {}.", "What is my name?", "don't know"),
    "zh": ("我叫{}。", "我叫什么名字？", "不知道"),
}


# Floors at or below the measured rates (docs/bundled-model.md, "Measured results", over all held-out names), so a
# retrained model that copies names less well turns this red. "zh_common": Chinese names of common characters that
# are not single tokens (2-3 byte-level pieces each).
RECALL_FLOOR = {"en": 80.0, "zh": 90.0, "zh_common": 75.0}


@pytest.mark.parametrize("names", ["en", "zh", "zh_common"])
def test_memory_demo_copies_unseen_names(chat, names):
    result = eval_memory(chat, NAME_SETS[names], HELDOUT[names][:20])
    assert result["pct"]["recall"] >= RECALL_FLOOR[names], result["failures"]
    assert result["pct"]["recall_after_qa"] >= RECALL_FLOOR[names], result["failures"]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_memory_demo_says_it_does_not_know_without_history(chat, lang):
    _, ask, dont_know = MEMORY[lang]
    assert dont_know in chat([{"role": "user", "content": ask}], 32)
    unrelated = [{"role": "user", "content": "What is SSE?" if lang == "en" else "什么是 SSE？"}]
    unrelated += [{"role": "assistant", "content": chat(unrelated, 64)}, {"role": "user", "content": ask}]
    assert dont_know in chat(unrelated, 32)


def test_corpus_generator_is_seeded_and_keeps_heldout_names_out():
    first, again, other = build_corpus(7, 300), build_corpus(7, 300), build_corpus(8, 300)
    assert first == again and first != other
    text = json.dumps(first, ensure_ascii=False)
    assert not [n for n in sum(HELDOUT.values(), []) if n in text]


def test_training_names_practise_the_pieces_of_unseen_english_names(tokenizer):
    """A name is copied only if each of its tokens was copied often in training (docs/bundled-model.md).

    Name-only BPE pieces ("ĠBeat" on the way to "ĠBeatriz") made 34 of the 60 held-out names hold a piece that
    20,000 training names contained fewer than 30 times; the bundled tokenizer and generator leave 8.
    """
    names = CorpusBuilder(0, name_pieces(tokenizer)).names
    seen = Counter(token for _ in range(20_000) for token in tokenizer.tokenize(" " + names.english()))
    rare = [n for n in HELDOUT["en"] if min(seen[t] for t in tokenizer.tokenize(" " + n)) < 30]
    assert len(rare) <= 12, rare


def test_training_names_practise_the_byte_pieces_of_common_characters(tokenizer):
    """A common character outside the vocabulary is 2-3 byte-level tokens; the model copies it only if training
    names made it copy those tokens often (before, names of such characters were recalled 7.5 % of the time)."""
    names = CorpusBuilder(0, name_pieces(tokenizer)).names
    seen = Counter(token for _ in range(20_000) for token in tokenizer.tokenize(names.chinese()))
    pieces = {t for name in HELDOUT["zh_common"] for t in tokenizer.tokenize(name)}
    assert all(len(tokenizer.encode(name)) > len(name) for name in HELDOUT["zh_common"][::2])  # not single tokens
    rare = sorted(t for t in pieces if seen[t] < MIN_PIECE_COUNT)
    assert not rare, rare
