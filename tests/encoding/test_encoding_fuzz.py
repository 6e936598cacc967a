"""Property tests: encode -> parse -> encode round trips, and a fuzz of generated and mutated
completions (10,000+) through the whole-text parser and StreamParser in random chunk sizes.

Properties:
  * parsing raises nothing but DSMLParseError;
  * strict streaming (any chunking) fails exactly when the official parser does, else agrees;
  * tolerant streaming never raises, and any chunking gives the same events as one feed;
  * no delta ever contains a special token;
  * on well-formed completions tolerant == strict, and re-encoding reproduces the text.
"""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoding import (
    ContentDelta,
    DSMLParseError,
    End,
    ReasoningDelta,
    StreamParser,
    encode_messages,
    parse_message_from_completion_text,
)
from encoding import stream as stream_module
from encoding.tokens import FORBIDDEN_IN_TEXT

EOS = "<｜end▁of▁sentence｜>"
# Free text may hold markup-like characters but cannot spell a special token (no letters of them).
TEXT = st.text(alphabet=st.sampled_from(list("ab <>/\n\"=｜{}[]:,0123 é中\t")), max_size=24)
NAME = st.text(alphabet=st.sampled_from(list("abcxyz_")), min_size=1, max_size=6)
VALUE = st.one_of(
    TEXT, st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans(),
    st.none(), st.lists(st.integers(0, 9), max_size=3), st.dictionaries(NAME, TEXT, max_size=2),
)
CALL = st.tuples(NAME, st.dictionaries(NAME, VALUE, max_size=4))
ASSISTANT = st.fixed_dictionaries({
    "reasoning_content": TEXT, "content": TEXT, "tool_calls": st.lists(CALL, max_size=3),
})

# Pieces a broken model (or a chunk boundary) might put anywhere.
MARKUP = [EOS, "</think>", "<think>", "<｜DSML｜", "｜DSML｜", "\n\n<｜DSML｜tool_calls>\n", "<｜DSML｜tool_calls>",
          '<｜DSML｜invoke name="f">\n', '<｜DSML｜parameter name="k" string="false">', '<｜DSML｜parameter name="k" string="true">',
          "</｜DSML｜parameter>\n", "</｜DSML｜parameter", "</｜DSML｜invoke>\n", "</｜DSML｜tool_calls>", ">\n", "\n", "<",
          "<｜begin▁of▁sentence｜>", "{bad", '"', ">"]


def assistant_message(drawn: dict) -> dict:
    calls = [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a in drawn["tool_calls"]]
    return {"role": "assistant", "reasoning_content": drawn["reasoning_content"], "content": drawn["content"],
            "tool_calls": calls}


def completion_text(message: dict, mode: str) -> str:
    """What the model writes for `message`: its rendering after the user turn's transition."""
    return encode_messages([message], mode, context=[{"role": "user", "content": "q"}], drop_thinking=False)


def mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 3)):
        op, at = rng.randrange(5), rng.randint(0, len(text))
        if op == 0:
            text = text[:at]
        elif op == 1:
            text = text[:at] + text[at + rng.randint(1, 12):]
        elif op == 2:
            text = text[:at] + rng.choice(MARKUP) + text[at:]
        elif op == 3:
            start = rng.randint(0, len(text))
            text = text[:at] + text[start:start + rng.randint(1, 30)] + text[at:]
        else:
            text = text[:at] + rng.choice("<>\n\"x｜") + text[at + 1:]
    return text


def chunks(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.choice((1, 1, 2, 3, 5, 8, 13, 64))
        out.append(text[i:i + n])
        i += n
    return out


def run_stream(parts: list[str], mode: str, strict: bool) -> list:
    parser = StreamParser(mode, strict=strict, tool_names={"f", "a", "b", "x"})
    events = []
    for part in parts:
        events += parser.feed(part)
    return events + parser.close()


def normalized(events: list) -> list:
    """Events with adjacent deltas of one kind merged and End reduced to what chunking must not change."""
    out = []
    for e in events:
        if isinstance(e, (ReasoningDelta, ContentDelta)) and out and type(out[-1]) is type(e):
            out[-1] = type(e)(out[-1].text + e.text)
        elif isinstance(e, End):
            out.append((e.reason, e.message, e.incomplete_call))
        else:
            out.append(e)
    return out


def check_no_markup_in_deltas(events: list) -> None:
    for e in events:
        if isinstance(e, (ReasoningDelta, ContentDelta)):
            assert not any(tok in e.text for tok in FORBIDDEN_IN_TEXT), e


def check_completion(text: str, mode: str, rng: random.Random) -> None:
    try:
        official = parse_message_from_completion_text(text, mode)
    except DSMLParseError:
        official = None
    try:
        strict_end = run_stream(chunks(text, rng), mode, strict=True)[-1]
        assert official is not None, f"strict stream accepted what the parser rejects: {text!r}"
        assert strict_end.message == official
    except DSMLParseError:
        assert official is None, f"strict stream rejected what the parser accepts: {text!r}"
    whole = run_stream([text], mode, strict=False)
    chunked = run_stream(chunks(text, rng), mode, strict=False)
    check_no_markup_in_deltas(chunked)
    assert normalized(chunked) == normalized(whole), text


@settings(max_examples=1500, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=ASSISTANT, mode=st.sampled_from(["thinking", "chat"]), seed=st.integers(0, 2**32))
def test_round_trip_encode_parse_encode(drawn, mode, seed):
    message = assistant_message(drawn)
    text = completion_text(message, mode)
    parsed = parse_message_from_completion_text(text, mode)
    assert parsed["content"] == message["content"]
    assert parsed["reasoning_content"] == (message["reasoning_content"] if mode == "thinking" else "")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed["tool_calls"]] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]
    assert completion_text(parsed, mode) == text
    # Streaming in any chunking, strict or tolerant, gives the same message on well-formed text.
    rng = random.Random(seed)
    for strict in (True, False):
        end = run_stream(chunks(text, rng), mode, strict)[-1]
        assert end.message == parsed and end.reason == "eos" and end.warnings == ()


@settings(max_examples=10_000, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=ASSISTANT, mode=st.sampled_from(["thinking", "chat"]), seed=st.integers(0, 2**32))
def test_fuzz_mutated_completions(drawn, mode, seed):
    rng = random.Random(seed)
    text = completion_text(assistant_message(drawn), mode)
    check_completion(mutate(text, rng), mode, rng)


@pytest.mark.parametrize("spill_chars", [4096, 1])
def test_fuzz_random_markup_soup(spill_chars, monkeypatch):
    """Texts made only of markup pieces and junk: the hardest inputs for the state machine
    (also with long-body spilling forced on at every chunk)."""
    monkeypatch.setattr(stream_module, "_SPILL_CHARS", spill_chars)
    rng = random.Random(1234 + spill_chars)
    pieces = MARKUP + ["a", " ", "name=", '"f"', 'string="true"', "</think>x", "\n\n"]
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        check_completion(text, rng.choice(["thinking", "chat"]), rng)
