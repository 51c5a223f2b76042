"""The <think> parser: streaming gives exactly the non-streaming split, however the text is cut."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimind_course.serving.reasoning import ThinkParser, split_reasoning

CASES = [
    ("<think>\n想一想：1+1=2\n</think>\n\n答案是 2。", False, ("想一想：1+1=2\n", "答案是 2。")),
    ("答案是 2。", False, (None, "答案是 2。")),
    ("  <think>x</think>y", False, ("x", "y")),
    ("plan\n</think>\n\nanswer", True, ("plan\n", "answer")),  # the template pre-filled "<think>"
    ("<think>\nstill thinking when max_tokens hit </thi", False, ("still thinking when max_tokens hit </thi", "")),
    ("<thinking is not a tag", False, (None, "<thinking is not a tag")),
    ("a </think> in an answer stays", False, (None, "a </think> in an answer stays")),
    ("", False, (None, "")),
]


@pytest.mark.parametrize("text,prefilled,expected", CASES)
def test_split(text, prefilled, expected):
    assert split_reasoning(text, prefilled) == expected


def stream(pieces, prefilled=False):
    parser, reasoning, content = ThinkParser(prefilled), "", ""
    for piece in pieces:
        r, c = parser.push(piece)
        reasoning, content = reasoning + r, content + c
    r, c = parser.flush()
    return reasoning + r, content + c


@pytest.mark.parametrize("text,prefilled,expected", CASES)
def test_every_two_way_cut_streams_the_same(text, prefilled, expected):
    for cut in range(len(text) + 1):
        reasoning, content = stream([text[:cut], text[cut:]], prefilled)
        assert (reasoning, content) == (expected[0] or "", expected[1])


@given(st.lists(st.sampled_from(["<", "think", ">", "</", "思考", "\n", "答", "😀", " "]), max_size=30), st.data())
def test_random_pieces_match_non_streaming(tokens, data):
    text = "".join(tokens)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    reasoning, content = split_reasoning(text)
    assert stream(pieces) == (reasoning or "", content)
