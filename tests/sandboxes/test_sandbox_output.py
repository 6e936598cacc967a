"""StreamCapture: the sentinel is found however the stream is chunked; head + tail are kept, the middle elided."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxes.output import StreamCapture

TOKEN = b"__dsv4_0123456789abcdef"


def _feed_in_chunks(capture: StreamCapture, data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:]):
        capture.feed(data[a:b])


@settings(max_examples=200, deadline=None)
@given(output=st.binary(max_size=3000), cap=st.integers(2, 1200), cuts=st.lists(st.integers(0, 10**6), max_size=40))
def test_any_chunking_gives_the_same_capture(output, cap, cuts):
    output = output.replace(TOKEN, b"")  # a command cannot guess the random token
    stream = output + TOKEN + b" 3 0\nlate background output"
    capture = StreamCapture(TOKEN, cap)
    _feed_in_chunks(capture, stream, cuts)
    assert capture.done and capture.trailer == b" 3 0"
    assert capture.total == len(output)
    kept = bytes(capture.head) + bytes(capture.tail[-capture.tail_cap:])
    if len(output) <= cap:
        assert not capture.truncated and kept == output
    else:
        assert capture.truncated
        assert bytes(capture.head) == output[: cap // 2]
        assert bytes(capture.tail[-capture.tail_cap:]) == output[-(cap - cap // 2):]


def test_elision_is_stated_with_the_byte_counts():
    rng = random.Random(7)
    lines = [f"line {i} {rng.random()}" for i in range(5000)]
    text = "\n".join(lines).encode()
    capture = StreamCapture(TOKEN, 1000)
    capture.feed(text + b"\n" + TOKEN + b"\n")
    out = capture.text()
    assert out.startswith(lines[0]) and out.rstrip("\n").endswith(lines[-1])
    elided = len(text) + 1 - 1000
    assert f"[... {elided} bytes elided: the output was {len(text) + 1} bytes" in out


def test_sentinel_line_split_before_its_newline_waits_for_the_rest():
    capture = StreamCapture(TOKEN, 100)
    capture.feed(b"abc" + TOKEN + b" 0")
    assert not capture.done
    capture.feed(b" 1\n")
    assert capture.done and capture.trailer == b" 0 1" and capture.text() == "abc"


def test_invalid_utf8_is_replaced_not_raised():
    capture = StreamCapture(TOKEN, 100)
    capture.feed(b"\xff\xfeok" + TOKEN + b"\n")
    assert capture.text() == "\ufffd\ufffdok"
