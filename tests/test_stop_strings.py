"""Stop strings: output is cut at the first match and no prefix of a stop string is streamed early."""

from hypothesis import given
from hypothesis import strategies as st

from minimind_course.engine.stop_strings import StopStringMatcher, held_suffix_len


def run(pieces, stop):
    matcher, out = StopStringMatcher(stop), []
    for piece in pieces:
        out.append(matcher.push(piece))
    out.append(matcher.flush())
    return out, matcher.stopped


def test_cut_at_first_match_across_pieces():
    out, stopped = run(["Hello\nUs", "er: hi", " more"], ["\nUser:"])
    assert "".join(out) == "Hello" and stopped
    assert out[0] == "Hello"  # "\nUs" was held back: it could still become "\nUser:"


def test_held_tail_is_released_when_it_cannot_match():
    out, stopped = run(["ab\nU", "nicorn"], ["\nUser:"])
    assert out == ["ab", "\nUnicorn", ""] and not stopped


def test_the_stop_string_completed_first_wins_whatever_the_pieces():
    for pieces in (["一二三四五"], list("一二三四五")):
        assert "".join(run(pieces, ["二三四", "三"])[0]) == "一二"


def test_held_suffix_len():
    assert held_suffix_len("abc\nUs", ["\nUser:"]) == 3
    assert held_suffix_len("abc", ["zzz"]) == 0
    assert held_suffix_len("abc", []) == 0


@given(st.text(alphabet="ab\n你", max_size=25), st.lists(st.text(alphabet="ab\n你", min_size=1, max_size=3),
                                                         max_size=3), st.data())
def test_streaming_equals_cutting_the_whole_text(text, stop, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=5)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    hits = [(i + len(s), i) for s in stop if (i := text.find(s)) >= 0]  # the first to be complete wins
    expected = text[: min(hits)[1]] if hits else text
    out, stopped = run(pieces, stop)
    assert "".join(out) == expected and stopped == bool(hits)
