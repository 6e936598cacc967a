"""AppendOnlyEncoder on the real DSV4 tokenizer: over many generated agent sessions, every
`append` returns exactly the tail of a full re-encode of the whole conversation, token for token.
"""
from __future__ import annotations

import json
import random

import pytest

from encoding import AppendOnlyEncoder, MessageError, Tokenizer, ToolMessage, UserMessage, encode_messages

EOS = "<｜end▁of▁sentence｜>"
WORDS = ["ls", "-la", "中文", "naïve", " ", "\n", "\n\n", "<", ">", "{", "}", '"', "x=1", "😀", "\t", "end", "The", "file"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def words(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(0, n)))


def make_tools(rng):
    names = rng.sample(["bash", "read_file", "write_file", "search", "python"], rng.randint(1, 3))
    return [{"type": "function", "function": {"name": n, "description": words(rng, 5), "parameters": {
        "type": "object", "properties": {"arg": {"type": "string"}}}}} for n in names]


def make_assistant(rng, tools, mode):
    message = {"role": "assistant", "content": words(rng, 6)}
    if mode == "thinking":
        message["reasoning_content"] = words(rng, 10)
    if tools and rng.random() < 0.6:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": rng.choice(tools)["function"]["name"], "arguments": json.dumps(
                {"cmd": words(rng, 4), "n": rng.randint(-5, 500), "flags": [rng.random() < 0.5], "opt": {"k": words(rng, 2)}},
                ensure_ascii=rng.random() < 0.5)}}
            for _ in range(rng.randint(1, 3))]
    return message


def generated_ids(tok, rng, text, canonical):
    """Ids the model might have produced for `text`: canonical, or split at random points
    (the EOS the model ends with is always its special id)."""
    if canonical:
        return tok.encode(text)
    assert text.endswith(EOS)
    text = text[: -len(EOS)]
    cuts = sorted(rng.sample(range(1, len(text)), min(4, len(text) - 1))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    ids = [i for piece in pieces for i in tok.encode(piece)]
    assert tok.decode(ids) == text
    return ids + [tok.eos_id]


def run_session(tok, seed, mode="thinking", effort="max", with_tools=True):
    rng = random.Random(seed)
    tools = make_tools(rng) if with_tools else []
    system = {"role": "system", "content": "You are an agent. " + words(rng, 4)}
    if tools:
        system["tools"] = tools
    prompt = [system] + ([{"role": "latest_reminder", "content": "2026-12-01"}] if rng.random() < 0.3 else []) \
        + [{"role": "user", "content": "task: " + words(rng, 6)}]
    enc = AppendOnlyEncoder(tok, thinking_mode=mode, reasoning_effort=effort)
    stream = enc.prompt(prompt)
    all_canonical = True
    for turn in range(rng.randint(1, 5)):
        # The model's turn: rendered from a message so that re-rendering reproduces it exactly.
        planned = make_assistant(rng, tools, mode)
        text = encode_messages([planned], mode, context=enc.messages, drop_thinking=False)
        canonical = rng.random() < 0.5
        all_canonical &= canonical
        ids = generated_ids(tok, rng, text, canonical)
        if rng.random() < 0.15:  # cut at max tokens before EOS
            ids = ids[:-1]
        message = enc.record_completion(ids)
        stream += ids
        calls = message["tool_calls"]
        assert [c["id"] for c in calls] == [f"call_{turn}_{i}" for i in range(len(calls))]
        assert message["content"] == planned["content"]
        # The next turn: tool results (any order), sometimes a user note too, or a user message.
        new = [{"role": "tool", "tool_call_id": c["id"], "content": words(rng, 8)} for c in calls]
        rng.shuffle(new)
        if not new or rng.random() < 0.3:
            if rng.random() < 0.3:
                new.append({"role": "latest_reminder", "content": "now: " + words(rng, 2)})
            new.append({"role": "user", "content": words(rng, 6)})
        appended = enc.append(new)
        stream += appended
        full_text = encode_messages(enc.messages, mode, reasoning_effort=effort,
                                    drop_thinking=True if with_tools else False)
        full = tok.encode(full_text)
        assert full[-len(appended):] == appended, f"seed {seed} turn {turn}"
        assert tok.decode(stream) == full_text
        if all_canonical:  # nothing but canonical pieces: the whole stream is the full re-encode
            assert stream == full
        assert enc.num_tokens == len(stream)
    return enc


@pytest.mark.parametrize("seed", range(40))
def test_append_equals_tail_of_full_reencode_thinking_with_tools(tok, seed):
    run_session(tok, seed)


@pytest.mark.parametrize("seed", range(10))
def test_append_equals_tail_chat_mode(tok, seed):
    run_session(tok, 1000 + seed, mode="chat", effort=None)


@pytest.mark.parametrize("seed", range(10))
def test_append_without_tools_keeps_reasoning(tok, seed):
    """No tools: the official default would drop old reasoning (rewriting history), so the
    append-only encoding is the full re-encode with drop_thinking=False."""
    enc = run_session(tok, 2000 + seed, with_tools=False)
    history = enc.messages
    if any(m.get("reasoning_content") for m in history[:-1] if m["role"] == "assistant"):
        dropped = encode_messages(history, "thinking", reasoning_effort="max")
        kept = encode_messages(history, "thinking", reasoning_effort="max", drop_thinking=False)
        assert dropped != kept


def test_prompt_is_the_full_encoding_with_think_max(tok):
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {}}}]
    messages = [{"role": "system", "content": "S", "tools": tools}, {"role": "user", "content": "go"}]
    ids = AppendOnlyEncoder(tok).prompt(messages)
    text = tok.decode(ids)
    assert text == encode_messages(messages, "thinking", reasoning_effort="max")
    assert text.startswith("<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum") and text.endswith("<｜Assistant｜><think>")
    assert ids[0] == tok.bos_id and ids[-1] == tok.think_start_id


def test_completion_without_eos_gets_it_before_the_next_turn(tok):
    enc = AppendOnlyEncoder(tok)
    enc.prompt([{"role": "user", "content": "hi"}])
    enc.record_completion(tok.encode("r</think>partial answer"))
    assert enc.last_end.reason == "no_eos"
    appended = enc.append([{"role": "user", "content": "go on"}])
    assert appended[0] == tok.eos_id
    assert tok.decode(appended) == EOS + "<｜User｜>go on<｜Assistant｜><think>"


def test_truncated_call_is_not_recorded(tok):
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {}}}]
    enc = AppendOnlyEncoder(tok)
    enc.prompt([{"role": "system", "content": "S", "tools": tools}, {"role": "user", "content": "hi"}])
    message = enc.record_completion(tok.encode(
        'r</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="bash">\n<｜DSML｜parameter name="cmd" string="true">rm -'))
    assert message["tool_calls"] == [] and enc.last_end.incomplete_call == "bash"
    with pytest.raises(MessageError, match="tool result without a preceding assistant tool call"):
        enc.append([{"role": "tool", "tool_call_id": "call_0_0", "content": "x"}])


def test_invalid_json_call_stays_in_history_and_gets_its_result(tok):
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {}}}]
    enc = AppendOnlyEncoder(tok)
    enc.prompt([{"role": "system", "content": "S", "tools": tools}, {"role": "user", "content": "hi"}])
    message = enc.record_completion(tok.encode(
        '</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="bash">\n<｜DSML｜parameter name="n" string="false">{x'
        '</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS))
    assert message["tool_calls"][0]["function"]["arguments"] == '{"n": {x}'
    assert enc.messages[-1]["tool_calls"][0]["function"]["arguments"] == '{"n": {x}'  # kept raw: renders as upstream does
    assert "'n'" in enc.last_call_errors["call_0_0"] and "not valid JSON" in enc.last_call_errors["call_0_0"]
    appended = enc.append([ToolMessage(tool_call_id="call_0_0", content="error: invalid JSON")])
    assert tok.decode(appended) == "<｜User｜><tool_result>error: invalid JSON</tool_result><｜Assistant｜><think>"


def test_call_with_a_garbled_name_gets_its_result(tok):
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {}}}]
    enc = AppendOnlyEncoder(tok)
    enc.prompt([{"role": "system", "content": "S", "tools": tools}, {"role": "user", "content": "hi"}])
    message = enc.record_completion(tok.encode(
        '</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke</｜DSML｜tool_calls> name="bash">\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS))
    assert [c["function"]["name"] for c in message["tool_calls"]] == [""]
    appended = enc.append([ToolMessage(tool_call_id="call_0_0", content="error: unreadable tool name")])
    assert tok.decode(appended) == "<｜User｜><tool_result>error: unreadable tool name</tool_result><｜Assistant｜><think>"


def test_calls_of_undeclared_tools_are_flagged(tok):
    enc = AppendOnlyEncoder(tok)
    enc.prompt([{"role": "user", "content": "hi"}])  # no tools at all
    message = enc.record_completion(tok.encode(
        '</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="bash">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS))
    assert [c["id"] for c in message["tool_calls"]] == ["call_0_0"]
    assert "unknown tool 'bash'" in enc.last_call_errors["call_0_0"]


def test_call_order_and_bad_appends_are_rejected(tok):
    enc = AppendOnlyEncoder(tok)
    with pytest.raises(RuntimeError):
        enc.append([{"role": "user", "content": "x"}])
    enc.prompt([UserMessage(content="hi")])
    with pytest.raises(RuntimeError):
        enc.prompt([{"role": "user", "content": "again"}])
    enc.record_completion(tok.encode("</think>hello" + EOS))
    with pytest.raises(MessageError, match=r"new_messages\[0\]"):
        enc.append([{"role": "tool", "tool_call_id": "call_9_9", "content": "x"}])
    with pytest.raises(MessageError, match=r"new_messages\[0\].role"):
        enc.append([{"role": "assistant", "content": "I answer myself"}])
    with pytest.raises(MessageError, match="new_messages"):
        enc.append([])
    assert enc.append([{"role": "user", "content": "ok"}])  # still usable after rejected input
