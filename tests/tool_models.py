"""A random-weight checkpoint in upstream MiniMind-3's layout for tool tests: q/k-norm MiniMind weights, the bundled
vocabulary plus upstream's tool and think tokens as single added tokens (``special: false``), and a chat template
that renders tools, calls, results and think blocks as MiniMind-3 does."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer

from minimind_course.model.loading import BUNDLED_MODEL_DIR
from minimind_course.model.minimind import MiniMindConfig, MiniMindForCausalLM
from minimind_course.training.tokenizer import CHAT_TEMPLATE

UPSTREAM_TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# The bundled template with MiniMind-3's think blocks: every assistant turn starts with <think>...</think>, the
# generation prompt pre-fills an empty one unless open_thinking is on (then it leaves "<think>\n" open).
_ASSISTANT_OPEN = "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) -}}"
_ASSISTANT_THINK = (
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<think>\\n' + (message['reasoning_content'] or '') + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- text(message['content']) -}}"
)
_PROMPT_OPEN = "{{- '<|im_start|>assistant\\n' -}}"
_PROMPT_THINK = ("{{- '<|im_start|>assistant\\n' -}}{%- if open_thinking is defined and open_thinking -%}"
                 "{{- '<think>\\n' -}}{%- else -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}")
MINIMIND3_TEMPLATE = CHAT_TEMPLATE.replace(_ASSISTANT_OPEN, _ASSISTANT_THINK).replace(_PROMPT_OPEN, _PROMPT_THINK)
assert MINIMIND3_TEMPLATE.count("<think>") == 3


def minimind3_tokenizer():
    """The bundled tokenizer plus the upstream tool/think tokens (not special: decoding keeps them)."""
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in UPSTREAM_TOOL_TOKENS])
    tokenizer.chat_template = MINIMIND3_TEMPLATE
    return tokenizer


def build_minimind3_folder(out: Path, seed: int = 0) -> Path:
    """Save a tiny random MiniMind-3 (q/k norm, head_dim in the config) with that tokenizer as a transformers folder."""
    tokenizer = minimind3_tokenizer()
    torch.manual_seed(seed)
    config = MiniMindConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, qk_norm=True, max_position_embeddings=2048)
    MiniMindForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
