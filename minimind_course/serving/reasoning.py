"""Split a reasoning model's output into ``reasoning_content`` and ``content`` at ``<think>…</think>``.

MiniMind-3 (and DeepSeek-R1/Qwen3-style models) write ``<think>\\n…\\n</think>\\n\\n`` before the answer.
The parser works on streamed pieces: a tag split across pieces ("</thi" + "nk>") is held back until it
is complete, so streaming and non-streaming give exactly the same two strings.
"""

from __future__ import annotations

from minimind_course.engine.stop_strings import held_suffix_len

THINK_START = "<think>"
THINK_END = "</think>"


class ThinkParser:
    """Feed text pieces with ``push``; each call returns (reasoning_delta, content_delta)."""

    def __init__(self, starts_in_reasoning: bool = False):
        # starts_in_reasoning: the prompt already ends with an open <think> (pre-filled by the template)
        self.state = "reasoning" if starts_in_reasoning else "start"
        self.buffer = ""
        self.strip_leading = True  # drop whitespace right after <think> and right after </think>
        self.thought = starts_in_reasoning  # whether a reasoning part exists at all

    def push(self, piece: str) -> tuple[str, str]:
        self.buffer += piece
        reasoning, content = "", ""
        while self.buffer:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(THINK_START):
                    self.buffer = head[len(THINK_START) :]
                    self.state, self.strip_leading, self.thought = "reasoning", True, True
                elif THINK_START.startswith(head):  # empty or a partial "<thi": wait for more
                    break
                else:
                    self.state = "content"
                    self.strip_leading = False
            elif self.state == "reasoning":
                if self.strip_leading:
                    self.buffer = self.buffer.lstrip()
                    if not self.buffer:
                        break
                    self.strip_leading = False
                end = self.buffer.find(THINK_END)
                if end >= 0:
                    reasoning += self.buffer[:end]
                    self.buffer = self.buffer[end + len(THINK_END) :]
                    self.state, self.strip_leading = "content", True
                    continue
                keep = held_suffix_len(self.buffer, (THINK_END,))
                reasoning += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            else:  # content
                if self.strip_leading:
                    self.buffer = self.buffer.lstrip()
                    if not self.buffer:
                        break
                    self.strip_leading = False
                content += self.buffer
                self.buffer = ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """At the end: held-back text goes where it was heading (a cut-off "</thi" stays reasoning)."""
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            return rest, ""
        self.state = "content"
        return "", rest


def split_reasoning(text: str, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
    """Non-streaming split: (reasoning or None when the model did not think, content)."""
    parser = ThinkParser(starts_in_reasoning)
    r1, c1 = parser.push(text)
    r2, c2 = parser.flush()
    return (r1 + r2 if parser.thought else None), c1 + c2
