"""Train MiniMind-Tiny's byte-level BPE tokenizer (HF ``tokenizers``) and wrap it as a transformers fast tokenizer.

Special tokens and ids follow upstream MiniMind: 0 ``<|endoftext|>`` (pad), 1 ``<|im_start|>`` (bos), 2 ``<|im_end|>``
(eos). Every CJK character (and CJK punctuation) is split off before BPE, so a Chinese name is a sequence of
one-character tokens that the model can copy; byte-level BPE still encodes any text, emoji included.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minimind_course import tool_format

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# CJK punctuation, CJK ideographs (extension A, unified, compatibility) and full-width forms.
CJK_CHAR_PATTERN = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"

# ChatML, as upstream MiniMind2, but without a default system prompt: the model sees exactly the messages sent.
# Content may be a string or a list of OpenAI-style parts ({"type": "text", "text": ...}). Tools, calls and results
# are written in MiniMind's tool-call format (``minimind_course.tool_format``, upstream MiniMind-3's): a "# Tools"
# block in the system turn, assistant calls as <tool_call> blocks, results as <tool_response> blocks in one user
# turn (consecutive tool messages merged). Unlike MiniMind-3 there are no <think> blocks; other template kwargs
# (enable_thinking, open_thinking, ...) are accepted and ignored.


def _jinja(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set first_is_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if first_is_system -%}{{- text(messages[0]['content']) + '\\n\\n' -}}{%- endif -%}"
    "{{- " + _jinja(tool_format.TOOLS_HEADER) + " -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- " + _jinja(tool_format.TOOLS_FOOTER + "<|im_end|>\n") + " -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- " + _jinja(f"\n{tool_format.RESPONSE_START}\n") + " + text(message['content']) + "
    + _jinja(f"\n{tool_format.RESPONSE_END}") + " -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif not (tools and loop.first and first_is_system) -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) -}}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set call = call['function'] if call['function'] is defined else call -%}"
    "{%- if not loop.first or text(message['content']) -%}{{- " + _jinja(tool_format.CALL_SEPARATOR)
    + " -}}{%- endif -%}"
    "{{- " + _jinja(tool_format.CALL_START + '\n{"name": ') + " + (call['name'] | tojson) + "
    + _jinja(', "arguments": ') + " -}}"
    "{%- if call['arguments'] is string -%}{{- call['arguments'] -}}{%- else -%}{{- call['arguments'] | tojson -}}"
    "{%- endif -%}"
    "{{- " + _jinja(tool_format.CALL_TAIL) + " -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` with CJK characters pre-split into single units."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CJK_CHAR_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == token_id, f"{token} must have id {token_id}"
    return tok


def wrap_fast_tokenizer(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer with ChatML template and upstream's special-token roles."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        add_bos_token=False,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
