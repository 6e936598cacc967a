"""The completion parsers: the official whole-text parser, and StreamParser in strict and tolerant mode.

Expected results of the strict cases follow the official parser's reading, step by step
(docs/dsv4-reference.md §5.3), including its leniencies at the end of the text.
"""
from __future__ import annotations

import pytest

from encoding import (
    ContentDelta,
    DSMLParseError,
    End,
    ReasoningDelta,
    StreamParser,
    ToolCallComplete,
    ToolCallParameter,
    ToolCallStarted,
    parse_message_from_completion_text,
)

EOS = "<｜end▁of▁sentence｜>"
TC = "\n\n<｜DSML｜tool_calls>\n"
END_TC = "</｜DSML｜tool_calls>"


def invoke(name, *params):
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


def p(name, value, string=True):
    return f'<｜DSML｜parameter name="{name}" string="{"true" if string else "false"}">{value}</｜DSML｜parameter>'


def stream(text, mode="thinking", strict=False, chunk=1, tool_names=None):
    parser = StreamParser(mode, strict=strict, tool_names=tool_names)
    events = []
    for i in range(0, len(text), chunk):
        events += parser.feed(text[i:i + chunk])
    events += parser.close()
    return events


def strict_results(text, mode):
    """The official parse and the strict stream (chunks of 1 and whole) must agree."""
    results = []
    for run in (lambda: parse_message_from_completion_text(text, mode),
                lambda: stream(text, mode, strict=True, chunk=1)[-1].message,
                lambda: stream(text, mode, strict=True, chunk=len(text) or 1)[-1].message):
        try:
            results.append(run())
        except DSMLParseError:
            results.append("error")
    assert results[0] == results[1] == results[2], results
    return results[0]


def msg(content="", reasoning="", calls=()):
    return {"role": "assistant", "content": content, "reasoning_content": reasoning,
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}


STRICT_CASES = {
    "plain_thinking": ("r</think>c" + EOS, "thinking", msg("c", "r")),
    "plain_chat": ("hello" + EOS, "chat", msg("hello")),
    "call_with_all_value_kinds": (
        "r</think>" + TC + invoke("f", p("s", "a<b\n"), p("n", "3", False), p("l", '[1, {"x": null}]', False)) + "\n" + END_TC + EOS,
        "thinking", msg("", "r", [("f", '{"s": "a<b\\n", "n": 3, "l": [1, {"x": null}]}')])),
    "two_invokes_and_content": (
        "</think>c" + TC + invoke("f", p("a", "1")) + "\n" + invoke("g") + "\n" + END_TC + EOS, "thinking",
        msg("c", "", [("f", '{"a": "1"}'), ("g", "{}")])),
    "tool_block_without_eos_is_accepted": ("</think>" + TC + invoke("f") + "\n" + END_TC, "thinking", msg("", "", [("f", "{}")])),
    "block_cut_right_after_its_start": ("r</think>c\n\n<｜DSML｜tool_calls", "thinking", msg("c", "r")),
    "block_cut_after_invoke_header": ("</think>" + TC + '<｜DSML｜invoke name="f">\n', "thinking", msg("", "", [("f", "{}")])),
    "block_cut_after_a_parameter": ("</think>" + TC + '<｜DSML｜invoke name="f">\n' + p("a", "1") + "\n", "thinking",
                                    msg("", "", [("f", '{"a": "1"}')])),
    "block_cut_right_after_invoke_close_marker": ("</think>" + TC + invoke("f")[:-1], "thinking", msg("", "", [("f", "{}")])),
    "block_cut_after_invoke_close_tag": ("</think>" + TC + invoke("f") + "\n", "thinking", "error"),
    "invalid_json_value_is_kept_verbatim": ("</think>" + TC + invoke("f", p("n", "{bad", False)) + "\n" + END_TC + EOS,
                                            "thinking", msg("", "", [("f", '{"n": {bad}')])),
    "missing_eos": ("r</think>c", "thinking", "error"),
    "missing_think_end": ("reasoning only" + EOS, "thinking", "error"),
    "tool_block_inside_reasoning": ("r" + TC + invoke("f") + "\n" + END_TC + EOS, "thinking", "error"),
    "text_after_eos": ("c" + EOS + "more", "chat", "error"),
    "think_token_in_content": ("a<think>b" + EOS, "chat", "error"),
    "dsml_token_in_content": ("a｜DSML｜b" + EOS, "chat", "error"),
    "bos_in_reasoning": ("a<｜begin▁of▁sentence｜></think>b" + EOS, "thinking", "error"),
    "eos_in_reasoning": ("a" + EOS + "</think>b" + EOS, "thinking", "error"),
    "second_think_end_in_content": ("a</think>b</think>" + EOS, "thinking", "error"),
    "duplicate_parameter": ("</think>" + TC + invoke("f", p("a", "1"), p("a", "2")) + "\n" + END_TC + EOS, "thinking", "error"),
    "bad_separator": ("</think>\n\n<｜DSML｜tool_calls> \n" + invoke("f") + "\n" + END_TC + EOS, "thinking", "error"),
    "bad_invoke_header": ("</think>" + TC + '<｜DSML｜invoke name=f>\n</｜DSML｜invoke>\n' + END_TC + EOS, "thinking", "error"),
    "bad_parameter_flag": ("</think>" + TC + invoke("f", p("a", "1").replace('"true"', '"yes"')) + "\n" + END_TC + EOS,
                           "thinking", "error"),
    "text_after_block": ("</think>" + TC + invoke("f") + "\n" + END_TC + "x" + EOS, "thinking", "error"),
    "cut_inside_parameter": ("</think>" + TC + '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">va',
                             "thinking", "error"),
    "cut_after_parameter_close_tag_name": ("</think>" + TC + '<｜DSML｜invoke name="f">\n' + p("a", "1"), "thinking", "error"),
    "cut_inside_block_separator": ("</think>" + TC + invoke("f") + "\n<", "thinking", "error"),
}


@pytest.mark.parametrize("name", sorted(STRICT_CASES))
def test_strict_parsers_agree_with_upstream(name):
    text, mode, expected = STRICT_CASES[name]
    assert strict_results(text, mode) == expected


def test_parse_rejects_unknown_mode():
    with pytest.raises(ValueError):
        parse_message_from_completion_text("x" + EOS, "fast")
    with pytest.raises(ValueError):
        StreamParser("fast")


def test_streaming_events_in_order():
    text = "why</think>ok" + TC + invoke("f", p("a", "x"), p("b", "2", False)) + "\n" + END_TC + EOS
    events = stream(text, chunk=3, tool_names={"f"})
    kinds = [type(e).__name__ for e in events]
    assert kinds[-5:] == ["ToolCallStarted", "ToolCallParameter", "ToolCallParameter", "ToolCallComplete", "End"]
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "why"
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "ok"
    assert events[-5] == ToolCallStarted(0, "f")
    assert events[-4] == ToolCallParameter(0, "a", "x", True)
    assert events[-2] == ToolCallComplete(0, "f", '{"a": "x", "b": 2}', None)
    assert events[-1].reason == "eos" and events[-1].incomplete_call is None and events[-1].warnings == ()


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_markup_split_across_chunks_never_leaks(chunk):
    text = "think more</think>Answer with < and ｜ and \n\nline" + TC + invoke("f") + "\n" + END_TC + EOS
    for strict in (True, False):
        events = stream(text, chunk=chunk, strict=strict)
        deltas = [e.text for e in events if isinstance(e, (ContentDelta, ReasoningDelta))]
        assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Answer with < and ｜ and \n\nline"
        for delta in deltas:
            assert "DSML" not in delta and "think>" not in delta and "end▁of" not in delta


def test_tolerant_tool_call_inside_reasoning_without_think_end():
    text = "I will call f." + TC + invoke("f", p("a", "1")) + "\n" + END_TC + EOS
    end = stream(text)[-1]
    assert end.reason == "eos"
    assert end.message == msg("", "I will call f.", [("f", '{"a": "1"}')])
    assert any("</think>" in w for w in end.warnings)


def test_tolerant_truncated_mid_call_is_reported_and_never_completed():
    text = "r</think>" + TC + invoke("f", p("a", "1")) + "\n" + '<｜DSML｜invoke name="rm">\n<｜DSML｜parameter name="path" string="true">/ho'
    events = stream(text, tool_names={"f", "rm"})
    completes = [e for e in events if isinstance(e, ToolCallComplete)]
    assert [c.name for c in completes] == ["f"]
    end = events[-1]
    assert end.reason == "truncated" and end.incomplete_call == "rm"
    assert [c["function"]["name"] for c in end.message["tool_calls"]] == ["f"]


@pytest.mark.parametrize("cut", ['<｜DSML｜invoke name="rm">\n', '<｜DSML｜invoke name="rm">\n' + p("a", "1") + "\n", '<｜DSML｜invoke na'])
def test_tolerant_never_completes_a_call_cut_at_a_marker(cut):
    end = stream("</think>" + TC + cut)[-1]
    assert end.reason == "truncated" and end.message["tool_calls"] == []
    assert end.incomplete_call is not None


def test_tolerant_missing_eos():
    end = stream("r</think>the answer")[-1]
    assert end.reason == "no_eos" and end.message == msg("the answer", "r")
    end = stream("</think>" + TC + invoke("f") + "\n" + END_TC)[-1]
    assert end.reason == "no_eos" and len(end.message["tool_calls"]) == 1
    end = stream("still thinking")[-1]
    assert end.reason == "truncated" and end.message["reasoning_content"] == "still thinking"


def test_tolerant_unknown_tool_is_an_error_naming_it():
    text = "</think>" + TC + invoke("nope", p("a", "1")) + "\n" + END_TC + EOS
    (complete,) = [e for e in stream(text, tool_names={"bash"}) if isinstance(e, ToolCallComplete)]
    assert "unknown tool 'nope'" in complete.error and "bash" in complete.error
    position = int(complete.error.split("at character ")[1].split(";")[0])
    assert text[position:].startswith(' name="nope"')


def test_invalid_json_parameter_is_an_error_naming_tool_parameter_and_position():
    text = "</think>" + TC + invoke("bash", p("cmd", "ls"), p("timeout", "12s", False)) + "\n" + END_TC + EOS
    for strict in (False, True):
        (complete,) = [e for e in stream(text, strict=strict, tool_names={"bash"}) if isinstance(e, ToolCallComplete)]
        assert "'bash'" in complete.error and "'timeout'" in complete.error
        position = int(complete.error.rsplit("at character ", 1)[1].split(")")[0])
        assert text[position:].startswith("s</")  # JSON fails at the "s" of "12s"


def test_tolerant_block_without_blank_line_and_stray_markup():
    end = stream("r</think>ans<think>wer" + "<｜DSML｜tool_calls>\n" + invoke("f") + "\n" + END_TC + EOS)[-1]
    assert end.message == msg("answer", "r", [("f", "{}")])
    assert len(end.warnings) == 2


def test_tolerant_unclosed_invoke_and_junk_are_errors_not_calls_lost():
    text = "</think>" + TC + '<｜DSML｜invoke name="f">\n' + p("a", "1") + "\njunk" + '\n<｜DSML｜invoke name="g">\n</｜DSML｜invoke>\n' + END_TC + EOS
    events = stream(text)
    completes = [e for e in events if isinstance(e, ToolCallComplete)]
    assert [(c.name, c.error is None) for c in completes] == [("f", False), ("g", True)]
    assert "not closed" in completes[0].error
    assert events[-1].reason == "eos"


def test_tolerant_ignores_text_after_eos():
    end = stream("a" + EOS + "garbage" + EOS, mode="chat")[-1]
    assert end.message == msg("a") and end.reason == "eos" and end.warnings


def test_tolerant_eos_inside_reasoning():
    end = stream("thinking" + EOS)[-1]
    assert end.reason == "eos" and end.message == msg("", "thinking")


def test_feed_after_close_is_a_usage_error():
    parser = StreamParser("chat")
    parser.feed("a" + EOS)
    assert isinstance(parser.close()[-1], End)
    with pytest.raises(RuntimeError):
        parser.feed("x")


@pytest.mark.parametrize("strict", [True, False])
def test_long_parameter_fed_token_by_token(strict):
    value = "x<y\n" * 50_000
    text = "</think>" + TC + invoke("write", p("data", value), p("n", "[" + "1," * 5000 + "}", False)) + "\n" + END_TC + EOS
    events = stream(text, strict=strict, chunk=4)
    assert events[-1].message == parse_message_from_completion_text(text, "thinking")
    params = [e for e in events if isinstance(e, ToolCallParameter)]
    assert params[0] == ToolCallParameter(0, "data", value, True)
    (complete,) = [e for e in events if isinstance(e, ToolCallComplete)]
    position = int(complete.error.rsplit("at character ", 1)[1].split(")")[0])
    assert text[position] == "}" and text[position - 1] == ","


def test_tolerant_eos_inside_an_invoke_is_an_incomplete_call():
    end = stream("</think>" + TC + '<｜DSML｜invoke name="rm">\n' + p("path", "/") + EOS, tool_names={"rm"})[-1]
    assert end.reason == "eos" and end.incomplete_call == "rm" and end.message["tool_calls"] == []


def test_empty_completion():
    assert stream("", mode="chat")[-1].reason == "no_eos"
    assert stream("")[-1].reason == "truncated"
    for mode in ("chat", "thinking"):
        with pytest.raises(DSMLParseError):
            stream("", mode=mode, strict=True)


def test_no_declared_tools_means_every_call_is_unknown():
    events = stream("</think>" + TC + invoke("f") + "\n" + END_TC + EOS, tool_names=[])
    assert "unknown tool 'f'" in next(e for e in events if isinstance(e, ToolCallComplete)).error


def test_absurdly_nested_json_value_is_a_call_error_not_a_crash():
    text = "</think>" + TC + invoke("f", p("v", "[" * 100_000, False)) + "\n" + END_TC + EOS
    for strict in (True, False):
        (complete,) = [e for e in stream(text, strict=strict, chunk=4096) if isinstance(e, ToolCallComplete)]
        assert "'v'" in complete.error


def test_tolerant_invoke_without_block_and_second_block():
    text = "r</think>ok\n" + invoke("f", p("a", "1")) + "\n" + EOS
    end = stream(text, chunk=3)[-1]
    assert end.message == msg("ok\n", "r", [("f", '{"a": "1"}')]) and end.reason == "eos"
    text = "</think>" + TC + invoke("f") + "\n" + END_TC + TC + invoke("g") + "\n" + END_TC + EOS
    end = stream(text, chunk=2)[-1]
    assert [c["function"]["name"] for c in end.message["tool_calls"]] == ["f", "g"]
    assert any("second tool block" in w for w in end.warnings)
    with pytest.raises(DSMLParseError):
        stream(text, strict=True)
