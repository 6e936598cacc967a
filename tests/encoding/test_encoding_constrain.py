"""DSMLConstraint on the real DSV4 tokenizer: the allowed sets at choice points are exactly the tokens
a brute-force scan of the vocabulary finds; valid calls pass token by token; invented names,
duplicate parameters, wrong string flags, early EOS and markup in the reasoning do not."""

from __future__ import annotations

import os
import random
import string

import pytest

from encoding import DSMLConstraint, Tokenizer, encode_messages, tools_from_prompt
from encoding.dsml import render_tool_calls

TOK = Tokenizer.default()
DSML_ID, EOS_ID, THINK_END_ID = TOK.dsml_id, TOK.eos_id, TOK.think_end_id
SEED = int.from_bytes(os.urandom(4), "little")  # fresh data each run; printed on failure


@pytest.fixture(scope="module")
def token_texts() -> list[str]:
    return [TOK.decode([i]) for i in range(TOK.vocab_size)]


def word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def random_tools(rng: random.Random) -> list[dict]:
    """Tool names where one is a prefix of another and one is long (many tokens); typed parameters."""
    base = word(rng, 4)
    names = [base, f"{base}_{word(rng, 5)}", word(rng, 18)]
    tools = []
    for name in names:
        props = {
            "text": {"type": "string"},
            f"{word(rng, 3)}_count": {"type": "integer"},
            "flag": {"type": "boolean"},
            "mode": {"enum": ["fast", "slow", "fastest"]},
        }
        tools.append({"type": "function", "function": {"name": name, "description": "d", "parameters": {
            "type": "object", "properties": props, "required": ["text"]}}})
    tools.append({"type": "function", "function": {"name": f"{base}x", "parameters": {"type": "object", "properties": {}}}})
    return tools


def brute_force(texts: list[str], written: str, ends: list[str], spill_ends: list[str] = ()) -> set[int]:
    """Every token whose text continues `written` towards one of `ends` (or runs past one of
    `spill_ends`, which are followed by free text)."""
    out = set()
    for i, text in enumerate(texts):
        if not text:
            continue
        w = written + text
        if any(e.startswith(w) for e in ends) or any(w.startswith(e) and len(w) > len(e) for e in spill_ends):
            out.add(i)
    return out


def constraint_after(tools: list[dict], text: str, thinking: bool = False) -> DSMLConstraint:
    c = DSMLConstraint(TOK, tools)
    c.reset(thinking=thinking)
    for token in TOK.encode(text):
        assert c.allowed() is None or token in c.allowed(), (SEED, text, TOK.decode([token]))
        c.feed(token)
    assert not c.released
    return c


OPEN = "ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜"


def test_allowed_sets_equal_a_brute_force_scan(token_texts):
    rng = random.Random(SEED)
    tools = random_tools(rng)
    fns = [t["function"] for t in tools]
    names = [f["name"] for f in fns]
    header_ends = [f'invoke name="{n}">\n<' for n in names[:3]] + [f'invoke name="{names[3]}">\n\n</']
    # the invoke name, then partway through a name that prefixes another, and through the long one
    for partial in ("", names[0][:2], names[0], names[2][:7]):
        written = 'invoke name="' + partial
        c = constraint_after(tools, OPEN + written)
        assert set(c.allowed()) == brute_force(token_texts, written, header_ends), (SEED, partial)
    # parameter names: not yet given, each with the flag its type allows; string values are free
    fn = fns[1]
    props = fn["parameters"]["properties"]
    count = next(k for k in props if k.endswith("_count"))
    given = f'invoke name="{fn["name"]}">\n<｜DSML｜parameter name="text" string="true">hi</｜DSML｜parameter>\n<｜DSML｜'
    c = constraint_after(tools, OPEN + given + 'parameter name="')
    flags = {count: ["false"], "flag": ["false"], "mode": ["true"]}
    ends = [f'parameter name="{k}" string="{f}">' for k in flags for f in flags[k]]
    spill = [f'parameter name="{count}" string="false">']  # integer: free JSON text follows
    assert set(c.allowed()) == brute_force(token_texts, 'parameter name="', ends, spill), SEED
    c = constraint_after(tools, OPEN + given + f'parameter name="{count}" string="')
    written = f'parameter name="{count}" string="'
    assert set(c.allowed()) == brute_force(token_texts, written, [written + 'false">'], [written + 'false">']), SEED
    # after a value: another parameter or, the required one given, the invoke end
    c = constraint_after(tools, OPEN + given[: given.rindex("parameter>")])
    assert set(c.allowed()) == brute_force(token_texts, "", ["parameter>\n<", "parameter>\n</"]), SEED
    # enum values are a choice
    c = constraint_after(tools, OPEN + given + 'parameter name="mode" string="true">')
    assert set(c.allowed()) == brute_force(token_texts, "", ["fast</", "slow</", "fastest</"]), SEED


def test_valid_calls_pass_token_by_token():
    rng = random.Random(SEED)
    tools = random_tools(rng) + [{"name": "città", "parameters": {"properties": {"più": {"type": "array"}}}}]
    for _ in range(5):
        calls = []
        for fn in rng.sample([t.get("function", t) for t in tools], 3):
            props = list(fn["parameters"]["properties"])
            args = {}
            for key in rng.sample(props, len(props)):  # any order
                kind = fn["parameters"]["properties"][key]
                args[key] = {"string": word(rng, rng.randint(0, 30)) + " </x> é", "integer": rng.randint(-99, 10**6),
                             "boolean": rng.random() < 0.5, "array": [word(rng, 3), 1]}.get(kind.get("type"), "fastest")
            calls.append((fn["name"], args))
        text = "why" + "</think>" + "answer" + render_tool_calls(calls) + "<｜end▁of▁sentence｜>"
        c = constraint_after(tools, text, thinking=True)
        assert c.phase == "done", SEED


def test_invented_names_duplicates_wrong_flags_and_early_ends_are_not_allowed():
    rng = random.Random(SEED)
    tools = random_tools(rng)
    fn = tools[1]["function"]
    head = OPEN + f'invoke name="{fn["name"]}">\n<｜DSML｜'
    # an invented tool name: no token spells it
    c = constraint_after(tools, OPEN + 'invoke name="')
    assert not any(TOK.decode([t]).startswith("zz") for t in c.allowed())
    # a required parameter is missing: the invoke cannot close yet, and EOS never comes inside a call
    c = constraint_after(tools, head + 'parameter name="flag" string="false">true</｜DSML｜')
    assert not any(TOK.decode([t]).startswith("parameter>\n</") for t in c.allowed())
    assert EOS_ID not in c.allowed()
    # a duplicate parameter and a wrong flag are not spelled by any allowed token
    c = constraint_after(tools, head + 'parameter name="flag" string="false">true</｜DSML｜parameter>\n<｜DSML｜parameter name="')
    assert not any(TOK.decode([t]).startswith("fl") for t in c.allowed())
    c = constraint_after(tools, head + 'parameter name="text" string="')
    assert {TOK.decode([t])[:1] for t in c.allowed()} == {"t"}
    # inside a free value: EOS banned, the DSML token only right after "</"
    c = constraint_after(tools, head + 'parameter name="text" string="true">a b')
    assert c.allowed() is None and {EOS_ID, DSML_ID} <= set(c.free_rule().banned)
    c = constraint_after(tools, head + 'parameter name="text" string="true">a </')
    assert DSML_ID not in c.free_rule().banned and EOS_ID in c.free_rule().banned
    # after the block only EOS
    end = 'parameter name="text" string="true">x</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    c = constraint_after(tools, head + end)
    assert c.allowed() == (EOS_ID,)


def test_markup_in_reasoning_moves_to_think_end_and_content_markup_needs_the_block():
    tools = random_tools(random.Random(SEED))
    c = constraint_after(tools, "let me call a tool\n\n<", thinking=True)
    rule = c.free_rule()
    assert c.allowed() is None and rule.redirect_to == THINK_END_ID and set(rule.redirect) == {DSML_ID, EOS_ID}
    c = constraint_after(tools, "x</think>use <", thinking=True)
    assert DSML_ID in c.free_rule().banned and THINK_END_ID in c.free_rule().banned
    c = constraint_after(tools, "x</think>use\n\n<", thinking=True)
    assert DSML_ID not in c.free_rule().banned
    # a token the grammar does not allow (forced by someone else) releases the constraint
    c = constraint_after(tools, OPEN + 'invoke name="')
    c.feed(TOK.encode("zzz")[0])
    assert c.released and c.allowed() is None and c.free_rule() is None


def test_tools_are_read_back_from_the_rendered_prompt():
    tools = random_tools(random.Random(SEED))
    prompt = encode_messages([{"role": "system", "content": "sys", "tools": tools},
                              {"role": "user", "content": "hi"}], thinking_mode="thinking")
    assert tools_from_prompt(prompt) == [t["function"] for t in tools]
    assert tools_from_prompt("no tools here") is None


def test_bad_tool_schemas_are_refused_with_the_name():
    with pytest.raises(ValueError, match="at least one tool"):
        DSMLConstraint(TOK, [])
    with pytest.raises(ValueError, match='a"b'):
        DSMLConstraint(TOK, [{"name": 'a"b'}])


def sample_turn(constraint: DSMLConstraint, rng: random.Random, thinking: bool, steps: int = 400) -> str:
    """A random walk through the grammar: a uniform draw from the allowed ids at choice points, in
    free text a draw that favours the ids the rule lets through and "</think>" / EOS now and then."""
    constraint.reset(thinking=thinking)
    filler = TOK.encode(" a b\n\nc")
    ids = []
    for _ in range(steps):
        allowed = constraint.allowed()
        if allowed is not None:
            token = rng.choice(allowed)
        else:
            rule = constraint.free_rule()
            if rule is None:
                break
            banned = set(rule.banned) | set(rule.redirect)
            token = rng.choice([t for t in (*filler, THINK_END_ID, EOS_ID, DSML_ID) if t not in banned])
        ids.append(token)
        constraint.feed(token)
        assert not constraint.released, (SEED, TOK.decode(ids))
    return TOK.decode(ids)


def test_tool_choice_none_required_named_and_one_call():
    from encoding import StreamParser, ToolCallComplete

    rng = random.Random(SEED)
    tools = random_tools(rng)
    names = [t["function"]["name"] for t in tools]
    # none: the content can never open a block, even right after "\n\n<"
    c = DSMLConstraint(TOK, tools, calls="none")
    c.reset(thinking=True)
    for token in TOK.encode("x</think>use\n\n<"):
        c.feed(token)
    assert DSML_ID in c.free_rule().banned
    # required: right after </think> (or at the start in chat mode) only the block's opening is allowed
    required = DSMLConstraint(TOK, tools, calls="required")
    required.reset(thinking=False)
    assert {TOK.decode([t]) for t in required.allowed()} <= {"\n", "\n\n", "\n\n<"}
    for thinking in (True, False):
        for _ in range(4):
            text = sample_turn(required, rng, thinking)
            if thinking and "</think>" not in text:
                continue  # the walk stayed in the reasoning
            answer = text.partition("</think>")[2] if thinking else text
            assert answer.startswith("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="), (SEED, text)
            parser = StreamParser("thinking" if thinking else "chat", strict=False, tool_names=set(names))
            calls = [e for e in parser.feed(text) + parser.close() if isinstance(e, ToolCallComplete)]
            if required.phase == "done":  # the walk may run out of steps inside a long free value
                assert calls and all(call.error is None for call in calls), (SEED, text)
    # named, one call: only that tool, and the block closes after one invoke
    named = DSMLConstraint(TOK, tools, calls="required", allowed=[names[1]], parallel=False)
    for _ in range(4):
        text = sample_turn(named, rng, thinking=False)
        others = [n for n in names if n != names[1]]
        assert text.count("invoke name=") <= 1 and all(f'"{n}"' not in text for n in others), (SEED, text)
    c = DSMLConstraint(TOK, tools, calls="required", allowed=[names[1]], parallel=False)
    c.reset(thinking=False)
    for token in TOK.encode(f'\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="{names[1]}">\n'
                            '<｜DSML｜parameter name="text" string="true">x</｜DSML｜parameter>\n</｜DSML｜'):
        c.feed(token)
    assert c.allowed() and all("invoke>\n</".startswith(TOK.decode([t])) for t in c.allowed())  # the block ends
    with pytest.raises(ValueError, match="not declared"):
        DSMLConstraint(TOK, tools, allowed=["nope"])
