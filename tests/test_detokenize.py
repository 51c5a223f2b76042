"""IncrementalDetokenizer never emits half a UTF-8 character, whatever the token boundaries."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from minimind_course.engine.detokenize import IncrementalDetokenizer

TEXTS = ["你好，世界！", "MiniMind 🤖 streams 流式输出 ✅", "café naïve — 😀😃"]


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Pure byte-level tokenizer: every byte is its own token, the worst case for split characters."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_complete_and_reassemble(byte_tokenizer, text):
    ids = byte_tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    detok = IncrementalDetokenizer(byte_tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_naive_per_token_decoding_would_garble(byte_tokenizer):
    ids = byte_tokenizer.encode("你")
    assert "\ufffd" in "".join(byte_tokenizer.decode([i]) for i in ids)


def test_special_tokens_are_skipped(byte_tokenizer):
    detok = IncrementalDetokenizer(byte_tokenizer)
    assert detok.push(2) == ""
    assert "".join(detok.push(i) for i in byte_tokenizer.encode("ok")) == "ok"


def test_flush_returns_a_truly_broken_tail(byte_tokenizer):
    detok = IncrementalDetokenizer(byte_tokenizer)
    first_byte_of_ni = byte_tokenizer.encode("你")[0]
    assert detok.push(first_byte_of_ni) == ""
    assert detok.flush() == "\ufffd"
