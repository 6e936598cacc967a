"""JSONConstraint on the real DSV4 tokenizer, without torch: valid documents (random ones from random
schemas, compact or with one space after separators) pass token by token and leave only EOS; random
walks through the allowed sets, nudged to finish, give text that `json.loads` reads and `jsonschema`
validates; the trie walk equals stepping the parser over every token of the vocabulary; malformed
continuations are not allowed; schemas outside the subset are refused with the keyword and its path."""

from __future__ import annotations

import json
import os
import random
import string

import jsonschema
import pytest

from encoding import JSONConstraint, Tokenizer, UnsupportedSchema, compile_schema

TOK = Tokenizer.default()
SEED = int.from_bytes(os.urandom(4), "little")  # fresh data each run; printed on failure
CLOSERS = tuple(i for i in range(TOK.vocab_size) if TOK.decode([i]) in ('"', "}", "]", '"}', "},", ",", "0", "1"))


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "optional"] + ["object", "array"] * (depth < 2)
    kind = rng.choice(kinds)
    if kind == "object" or depth == 0:
        props = {f"{rng.choice(string.ascii_lowercase)}{i}_é": random_schema(rng, depth + 1)
                 for i in range(rng.randint(1, 4))}
        return {"type": "object", "properties": props, "required": rng.sample(list(props), rng.randint(0, len(props)))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1)}
    if kind == "enum":
        return {"enum": ["fast", "fastest", 1, 12, None, True]}
    if kind == "optional":
        return {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "maybe"}
    return {"type": kind}


def random_value(rng: random.Random, schema: dict):
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "anyOf" in schema:
        return random_value(rng, rng.choice(schema["anyOf"]))
    kind = schema["type"]
    if kind == "object":
        props = schema["properties"]
        return {k: random_value(rng, v) for k, v in props.items() if k in schema["required"] or rng.random() < 0.5}
    if kind == "array":
        return [random_value(rng, schema["items"]) for _ in range(rng.randint(0, 3))]
    return {"string": lambda: "".join(rng.choice('ab "\\\n\t/é中😀') for _ in range(rng.randint(0, 12))),
            "integer": lambda: rng.randint(-10**6, 10**6), "number": lambda: rng.choice([0.5, -1e-7, 3, 2.5e30]),
            "boolean": lambda: rng.random() < 0.5, "null": lambda: None}[kind]()


def feed_text(constraint: JSONConstraint, text: str) -> None:
    for token in TOK.encode(text):
        allowed = constraint.allowed()
        assert allowed is not None and token in allowed, (SEED, text, TOK.decode([token]), constraint.stack)
        constraint.feed(token)


def test_valid_documents_pass_token_by_token_and_then_only_eos():
    rng = random.Random(SEED)
    for _ in range(12):
        schema = random_schema(rng)
        constraint = JSONConstraint(TOK, compile_schema(schema))
        for separators in ((",", ":"), (", ", ": ")):
            constraint.reset(thinking=False)
            feed_text(constraint, json.dumps(random_value(rng, schema), ensure_ascii=False, separators=separators))
            assert constraint.done and constraint.allowed() == (TOK.eos_id,), SEED
            constraint.feed(TOK.eos_id)
            assert constraint.phase == "done" and not constraint.released
    any_object = JSONConstraint(TOK, compile_schema(None))
    any_object.reset(thinking=False)
    feed_text(any_object, '{"a": [1, -0.5e+3, {"b": null}, "x\\u00e9\\n"], "c": {}, "d": true}')
    assert any_object.done


def test_random_walks_give_json_that_matches_the_schema():
    rng = random.Random(SEED)
    for _ in range(8):
        schema = random_schema(rng)
        constraint = JSONConstraint(TOK, compile_schema(schema))
        constraint.reset(thinking=False)
        ids = []
        while not constraint.done and len(ids) < 400:
            allowed = constraint.allowed()
            closing = [t for t in CLOSERS if t in set(allowed)] if rng.random() < 0.6 else []
            token = rng.choice(closing or allowed)
            ids.append(token)
            constraint.feed(token)
            assert not constraint.released, (SEED, TOK.decode(ids))
        if constraint.done:
            jsonschema.validate(json.loads(TOK.decode(ids)), schema)


def test_the_trie_walk_equals_stepping_every_token():
    rng = random.Random(SEED)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"enum": ["a", "ab", 1, 12]}}},
              "required": ["name"]}
    prefixes = ['{', '{"name":', '{"name": "x', '{"name":"x\\', '{"name":"x","n":-1', '{"name":"x","tags":[1',
                '{"name":"x","tags":["a"', '{"name":"x","tags":[', '{"name":"x"}']
    for prefix in rng.sample(prefixes, 4):
        constraint = JSONConstraint(TOK, compile_schema(schema))
        constraint.reset(thinking=False)
        feed_text(constraint, prefix)
        naive = set()
        for token, piece in enumerate(constraint.vocab.bytes_of):
            stack = constraint.stack
            for b in piece or b"":
                stack = constraint.parser.step(stack, b) if stack is not None else None
            if piece and stack is not None:
                naive.add(token)
        expected = naive or {TOK.eos_id}
        assert set(constraint.allowed()) == expected, (SEED, prefix)


@pytest.mark.parametrize(("schema", "prefix", "bad"), [
    (None, "", [" {", "[", '"a"', "\n"]),  # the root is an object, no leading whitespace
    (None, '{"a":1}', [" ", "\n", ",", "}"]),  # after the document only EOS
    (None, '{"a":', ["}", ",", "  ", "tru e", "01", "-}", "nul,"]),
    (None, '{"a":"', ["\n", "\t"]),  # control characters must be escaped
    ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, '{', ["}", '"m"', '"n" :']),
    ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, '{"n":1', [".", "e", "}}"]),
    # keys in the declared order: nothing comes after the last one
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}, '{"b":"x"', [',', ',"a"']),
])
def test_malformed_continuations_are_not_allowed(schema, prefix, bad):
    constraint = JSONConstraint(TOK, compile_schema(schema))
    constraint.reset(thinking=False)
    feed_text(constraint, prefix)
    for text in bad:
        state = constraint.stack
        ok = all((state := constraint.parser.step(state, b)) is not None for b in text.encode()) if state else False
        assert not ok, (prefix, text)


@pytest.mark.parametrize(("schema", "where"), [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}}, "/properties/a: 'pattern'"),
    ({"type": "array", "items": {"type": "string"}}, "(root): the root must be an object"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "object"}, {"type": "object", "properties": {}}]}}},
     "/properties/a/anyOf: the branches must start differently"),
    ({"type": "object", "properties": {"n": {"$ref": "#/$defs/Node"}},
      "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}}}, "recursive"),
    ({"type": "object", "properties": {"a": {"type": "str"}}}, "/properties/a/type"),
])
def test_unsupported_schemas_are_refused_with_the_keyword_and_where(schema, where):
    with pytest.raises(UnsupportedSchema, match="".join("\\" + c if c in "()[]$+*.?" else c for c in where)):
        compile_schema(schema)


def test_defs_refs_and_thinking_mode():
    schema = {"type": "object", "properties": {"pet": {"$ref": "#/$defs/Pet"}}, "required": ["pet"],
              "$defs": {"Pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                                "required": ["kind"]}}}
    constraint = JSONConstraint(TOK, compile_schema(schema))
    constraint.reset(thinking=True)
    assert constraint.allowed() is None and constraint.free_rule().redirect_to == TOK.think_end_id
    for token in TOK.encode("reason freely { not json"):
        constraint.feed(token)
    constraint.feed(TOK.think_end_id)
    feed_text(constraint, '{"pet": {"kind": "dog"}}')
    assert constraint.done
    other = JSONConstraint(TOK, compile_schema(schema))
    other.reset(thinking=True)
    other.feed(TOK.eos_id)  # EOS in the reasoning (another processor forced it): the constraint lets go
    assert other.released and other.allowed() is None
