"""JSON-constrained decoding: the next tokens that keep a completion's answer one JSON object, of any
shape (OpenAI's `response_format: json_object`) or matching a JSON schema (`json_schema`).

    grammar = JSONGrammar(schema)              # None: any JSON object; UnsupportedSchema names what is not
    constraint = JSONConstraint(tokenizer, grammar)
    constraint.reset(thinking=True)            # at the start of every turn (as DSMLConstraint)
    each step:  constraint.allowed()    -> tuple of ids (only these may come next), or None in the reasoning
                constraint.free_rule()  -> FreeText for the reasoning (`｜DSML｜` and EOS move onto `</think>`)
                constraint.feed(token)

In thinking mode the reasoning stays free; the answer after `</think>` (the whole completion in chat
mode) is the JSON document, compact except for one optional space after `,` and `:` (so a model
cannot pad it with whitespace forever), then EOS. Strings may hold any character but the control
characters JSON forbids, with JSON's escapes; bytes of multi-byte UTF-8 characters are not checked
across tokens (a byte-level model could split one badly; the text then decodes with U+FFFD, which is
still a valid string).

The schema subset (anything else is refused with `UnsupportedSchema` naming the keyword and where):
`type` (one or a list), `properties` (keys written in the declared order; the `required` ones always,
the others optionally; no other keys, which every `additionalProperties` allows), an object without
`properties` (any keys; only `{}` with `additionalProperties: false`), `items`, `enum`, `const`,
`anyOf` / `oneOf` whose branches start differently (`Optional[X]`: X or null), `$ref` into `$defs` /
`definitions` (not recursive), and annotations (`title`, `description`, `default`, ...). The root is
an object, as OpenAI requires.

How a step is computed: the parser state is an immutable stack of frames; the allowed ids of a state
come from walking the vocabulary's sorted byte strings as a trie (`bisect` per branch), stepping the
parser byte by byte and pruning dead branches. Inside a string every token without `"`, `\\` or a
control byte is allowed, so only the tokens holding those are walked. Results are cached per state on
the grammar (shared by every request using the same schema), so a repeated state costs a dict lookup.
"""
from __future__ import annotations

import bisect
import functools
import json
import re
from typing import Any

from .constrain import FreeText, _vocab_index
from .tokens import BOS, DSML, EOS, THINK_END, THINK_START

__all__ = ["JSONConstraint", "JSONGrammar", "UnsupportedSchema", "compile_schema"]

_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "strict", "additionalProperties", "$defs", "definitions"}
_SUPPORTED = {"type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "$ref"}
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_DIGITS = b"0123456789"
_NUMBER_START = frozenset(b"-0123456789")
_ESCAPES = frozenset(b'"\\/bfnrt')
_HEX = frozenset(b"0123456789abcdefABCDEF")


class UnsupportedSchema(ValueError):
    """A schema the JSON constraint cannot enforce; `where` is the JSON-pointer-like path of the keyword."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where or '(root)'}: {message}")
        self.where = where


# --- compiling a schema into nodes -----------------------------------------------------------------------
# A node is a tuple; nodes refer to each other by index into JSONGrammar.nodes:
#   ("object", ((key bytes + b":", node, required), ...) | None for any keys, ...)   ("array", item node)
#   ("string",)  ("number", integer?)  ("literal", (json bytes, ...))  ("union", (node, ...))  ("any",)
class JSONGrammar:
    """A compiled schema (None: any JSON object). Hashable by its schema; holds the per-state cache."""

    def __init__(self, schema: dict[str, Any] | None = None) -> None:
        self.schema = schema
        self.nodes: list[tuple] = []
        self._defs = (schema or {}).get("$defs") or (schema or {}).get("definitions") or {}
        self._expanding: list[str] = []
        self.any = self._add(("any",))
        self.any_object = self._add(("object", None))
        self.any_array = self._add(("array", self.any))
        if schema is None:
            self.root = self.any_object
        else:
            if not isinstance(schema, dict):
                raise UnsupportedSchema("", "a JSON schema is an object")
            self.root = self._compile(schema, "")
            if self._starts(self.root) != frozenset(b"{"):
                raise UnsupportedSchema("", "the root must be an object schema (type: object), as OpenAI requires")
        self.cache: dict[int, dict[tuple, tuple[int, ...]]] = {}  # per vocabulary: parser state -> allowed ids

    def _add(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _compile(self, schema: Any, where: str) -> int:
        if schema is True or schema == {}:
            return self.any
        if not isinstance(schema, dict):
            raise UnsupportedSchema(where, f"a schema must be an object, got {schema!r:.60}")
        unknown = sorted(set(schema) - _SUPPORTED - _ANNOTATIONS)
        if unknown:
            raise UnsupportedSchema(where, f"{', '.join(map(repr, unknown))} cannot be enforced by the JSON constraint "
                                           f"(supported: {', '.join(sorted(_SUPPORTED))})")
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise UnsupportedSchema(f"{where}/enum", "enum must be a non-empty list")
            texts = tuple(dict.fromkeys(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()
                                        for v in values))
            return self._add(("literal", texts))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = schema[key]
                if not isinstance(branches, list) or not branches:
                    raise UnsupportedSchema(f"{where}/{key}", f"{key} must be a non-empty list")
                nodes = [self._compile(b, f"{where}/{key}/{i}") for i, b in enumerate(branches)]
                return self._union(nodes, f"{where}/{key}")
        kind = schema.get("type")
        if kind is None:
            if "properties" in schema:
                kind = "object"
            elif "items" in schema:
                kind = "array"
            else:
                return self.any
        kinds = [kind] if isinstance(kind, str) else kind
        if not isinstance(kinds, list) or not kinds or any(k not in _TYPES for k in kinds):
            raise UnsupportedSchema(f"{where}/type", f"type must be one of {_TYPES} or a list of them, got {kind!r}")
        if "number" in kinds and "integer" in kinds:
            kinds = [k for k in kinds if k != "integer"]
        nodes = [self._typed(k, schema, where) for k in dict.fromkeys(kinds)]
        return nodes[0] if len(nodes) == 1 else self._union(nodes, f"{where}/type")

    def _typed(self, kind: str, schema: dict, where: str) -> int:
        if kind == "object":
            props = schema.get("properties")
            if props is None:
                return self._add(("object", ())) if schema.get("additionalProperties") is False else self.any_object
            if not isinstance(props, dict):
                raise UnsupportedSchema(f"{where}/properties", "properties must be an object")
            required = schema.get("required") or []
            if not isinstance(required, list) or any(r not in props for r in required):
                raise UnsupportedSchema(f"{where}/required", "required must list names from properties")
            entries = tuple((json.dumps(name, ensure_ascii=False).encode() + b":",
                             self._compile(sub, f"{where}/properties/{name}"), name in required)
                            for name, sub in props.items())
            return self._add(("object", entries))
        if kind == "array":
            return self._add(("array", self._compile(schema.get("items", True), f"{where}/items")))
        if kind == "string":
            return self._add(("string",))
        if kind in ("number", "integer"):
            return self._add(("number", kind == "integer"))
        return self._add(("literal", (b"true", b"false") if kind == "boolean" else (b"null",)))

    def _ref(self, ref: Any, where: str) -> int:
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if match is None or match.group(2) not in self._defs:
            raise UnsupportedSchema(f"{where}/$ref", f"only references into the root's $defs are supported, "
                                                     f"got {ref!r}")
        name = match.group(2)
        if name in self._expanding:
            raise UnsupportedSchema(f"{where}/$ref", f"a recursive schema ({' -> '.join(self._expanding + [name])}) "
                                                     "cannot be enforced")
        self._expanding.append(name)
        try:
            return self._compile(self._defs[name], f"/$defs/{name}")
        finally:
            self._expanding.pop()

    def _union(self, nodes: list[int], where: str) -> int:
        seen: set[int] = set()
        for node in nodes:
            starts = self._starts(node)
            if starts & seen:
                raise UnsupportedSchema(where, "the branches must start differently (e.g. a string or null) for the "
                                               "constraint to tell them apart from the first character")
            seen |= starts
        return self._add(("union", tuple(nodes)))

    def _starts(self, node: int) -> frozenset[int]:
        """The bytes a value of `node` can start with."""
        kind = self.nodes[node][0]
        if kind == "object":
            return frozenset(b"{")
        if kind == "array":
            return frozenset(b"[")
        if kind == "string":
            return frozenset(b'"')
        if kind == "number":
            return _NUMBER_START
        if kind == "literal":
            return frozenset(text[0] for text in self.nodes[node][1])
        if kind == "union":
            return frozenset().union(*(self._starts(n) for n in self.nodes[node][1]))
        return frozenset(b'{["tfn') | _NUMBER_START


@functools.lru_cache(maxsize=16)
def _compiled(schema_text: str | None) -> JSONGrammar:
    return JSONGrammar(None if schema_text is None else json.loads(schema_text))


def compile_schema(schema: dict[str, Any] | None) -> JSONGrammar:
    """The grammar of a schema, shared by every request with the same schema (its cache too)."""
    return _compiled(None if schema is None else json.dumps(schema))  # key order matters: properties come in order


# --- the parser: frames on an immutable stack ----------------------------------------------------------
# ("value", node)                 a value of node comes next
# ("obj", node, phase, index)     phase: open | comma | key_space | key | colon | value | value_space | sep;
#                                 index: the next declared property (the chosen one while its value is due)
# ("arr", node, phase)            phase: open | comma | item | sep
# ("str", escape)                 escape: 0, "\\" just read, or the count of \\u hex digits still due
# ("num", integer, phase)         phase: minus | zero | int | dot | frac | exp_mark | exp_sign | exp
# ("lit", texts, written)         a literal (enum value, true, a declared key + ":") being written
_NUM_DONE = frozenset({"zero", "int", "frac", "exp"})


class _Parser:
    def __init__(self, grammar: JSONGrammar) -> None:
        self.nodes = grammar.nodes
        self.any, self.any_object, self.any_array = grammar.any, grammar.any_object, grammar.any_array

    def step(self, stack: tuple, b: int) -> tuple | None:
        """The stack after byte b, or None when b cannot come next."""
        while stack:
            frame = stack[-1]
            rest = stack[:-1]
            kind = frame[0]
            if kind == "str":
                return self._string(rest, frame[1], b)
            if kind == "value":
                return self._value(rest, frame[1], b)
            if kind == "num":
                nxt = self._number(frame, b)
                if nxt is not None:
                    return rest + (nxt,)
                if frame[2] not in _NUM_DONE:
                    return None
                stack = rest  # the number ended before b: b belongs to the frame below
                continue
            if kind == "lit":
                texts, written = frame[1], frame[2] + bytes((b,))
                if any(t.startswith(written) for t in texts):
                    return self._literal_progress(rest, texts, written)
                if frame[2] not in texts:
                    return None
                stack = self._literal_done(rest, frame[2])
                continue
            if kind == "obj":
                return self._object(rest, frame, b)
            return self._array(rest, frame, b)
        return None  # the document is complete: only EOS

    # -- values ----------------------------------------------------------------------------------------
    def _value(self, rest: tuple, node: int, b: int) -> tuple | None:
        spec = self.nodes[node]
        kind = spec[0]
        if kind == "union":
            for branch in spec[1]:
                out = self._value(rest, branch, b)
                if out is not None:
                    return out
            return None
        if kind == "any":
            target = {ord("{"): self.any_object, ord("["): self.any_array}.get(b)
            if target is not None:
                return self._value(rest, target, b)
            if b == ord('"'):
                return rest + (("str", 0),)
            if b in _NUMBER_START:
                return rest + (self._number(("num", False, "start"), b),)
            return self._literal_progress(rest, (b"true", b"false", b"null"), bytes((b,))) if b in b"tfn" else None
        if kind == "object":
            return rest + (("obj", node, "open", 0),) if b == ord("{") else None
        if kind == "array":
            return rest + (("arr", node, "open"),) if b == ord("[") else None
        if kind == "string":
            return rest + (("str", 0),) if b == ord('"') else None
        if kind == "number":
            nxt = self._number(("num", spec[1], "start"), b)
            return None if nxt is None else rest + (nxt,)
        written = bytes((b,))
        return self._literal_progress(rest, spec[1], written) if any(t.startswith(written) for t in spec[1]) else None

    def _literal_progress(self, rest: tuple, texts: tuple, written: bytes) -> tuple:
        """A literal written so far; complete and not the prefix of another one: it ends now."""
        if written in texts and not any(len(t) > len(written) and t.startswith(written) for t in texts):
            return self._literal_done(rest, written)
        return rest + (("lit", texts, written),)

    def _literal_done(self, rest: tuple, written: bytes) -> tuple:
        """A literal ended; if it was a declared key, its value comes next."""
        if rest and rest[-1][0] == "obj" and rest[-1][2] == "key":
            _, node, _, index = rest[-1]
            entries = self.nodes[node][1]
            chosen = next(i for i in range(index, len(entries)) if entries[i][0] == written)
            return rest[:-1] + (("obj", node, "value", chosen),)
        return rest

    @staticmethod
    def _string(rest: tuple, escape: Any, b: int) -> tuple | None:
        if escape == 0:
            if b == ord('"'):
                return rest
            if b < 0x20:
                return None
            return rest + (("str", "\\"),) if b == ord("\\") else rest + (("str", 0),)
        if escape == "\\":
            if b == ord("u"):
                return rest + (("str", 4),)
            return rest + (("str", 0),) if b in _ESCAPES else None
        if b not in _HEX:
            return None
        return rest + (("str", escape - 1 or 0),)

    @staticmethod
    def _number(frame: tuple, b: int) -> tuple | None:
        _, integer, phase = frame
        digit = b in _DIGITS
        if phase in ("start", "minus"):
            if b == ord("-") and phase == "start":
                nxt = "minus"
            elif digit:
                nxt = "zero" if b == ord("0") else "int"
            else:
                return None
        elif phase in ("zero", "int"):
            if digit and phase == "int":
                nxt = "int"
            elif b == ord(".") and not integer:
                nxt = "dot"
            elif b in b"eE" and not integer:
                nxt = "exp_mark"
            else:
                return None
        elif phase in ("dot", "frac"):
            if digit:
                nxt = "frac"
            elif b in b"eE" and phase == "frac":
                nxt = "exp_mark"
            else:
                return None
        elif phase == "exp_mark" and b in b"+-":
            nxt = "exp_sign"
        elif digit:  # exp_mark, exp_sign, exp
            nxt = "exp"
        else:
            return None
        return ("num", integer, nxt)

    # -- containers --------------------------------------------------------------------------------------
    def _object(self, rest: tuple, frame: tuple, b: int) -> tuple | None:
        _, node, phase, index = frame
        entries = self.nodes[node][1]  # None: any keys
        if phase == "colon":  # any keys: the key string is written, ":" is due
            return rest + (("obj", node, "value", index),) if b == ord(":") else None
        if phase in ("value", "value_space"):  # after ":": one optional space, then the value
            if b == ord(" ") and phase == "value":
                return rest + (("obj", node, "value_space", index),)
            value = self.any if entries is None else entries[index][1]
            return self._value(rest + (("obj", node, "sep", 0 if entries is None else index + 1),), value, b)
        if phase == "sep":  # after a value: "," or "}"
            if b == ord("}"):
                return rest if self._may_close(entries, index) else None
            if b == ord(",") and self._may_continue(entries, index):
                return rest + (("obj", node, "comma", index),)
            return None
        # open (after "{") or comma (after ","): a key; after "," one optional space first; "{}" when allowed
        if phase == "comma" and b == ord(" "):
            return rest + (("obj", node, "key_space", index),)
        if phase == "open" and b == ord("}"):
            return rest if self._may_close(entries, index) else None
        if entries is None:
            return rest + (("obj", node, "colon", 0), ("str", 0)) if b == ord('"') else None
        candidates = []
        for i in range(index, len(entries)):
            candidates.append(entries[i][0])
            if entries[i][2]:
                break
        written = bytes((b,))
        if not any(c.startswith(written) for c in candidates):
            return None
        return self._literal_progress(rest + (("obj", node, "key", index),), tuple(candidates), written)

    @staticmethod
    def _may_close(entries: tuple | None, index: int) -> bool:
        return entries is None or not any(required for _, _, required in entries[index:])

    @staticmethod
    def _may_continue(entries: tuple | None, index: int) -> bool:
        return entries is None or index < len(entries)

    def _array(self, rest: tuple, frame: tuple, b: int) -> tuple | None:
        _, node, phase = frame
        if phase == "sep":
            if b == ord("]"):
                return rest
            return rest + (("arr", node, "comma"),) if b == ord(",") else None
        if phase == "open" and b == ord("]"):
            return rest
        if phase == "comma" and b == ord(" "):
            return rest + (("arr", node, "item"),)
        return self._value(rest + (("arr", node, "sep"),), self.nodes[node][1], b)


# --- the vocabulary split for strings ------------------------------------------------------------------------
class _StringSplit:
    """Byte tokens that are plain string text anywhere in a string, and the sorted rest (to be walked)."""

    def __init__(self, tokenizer: Any) -> None:
        index = _vocab_index(tokenizer)
        special = re.compile(rb'["\\\x00-\x1f]')
        plain, keys, ids = [], [], []
        for key, token_id in zip(index.sorted_bytes, index.sorted_ids, strict=True):
            if special.search(key):
                keys.append(key)
                ids.append(token_id)
            else:
                plain.append(token_id)
        self.plain = tuple(plain)
        self.keys, self.ids = keys, ids


@functools.lru_cache(maxsize=4)
def _string_split(tokenizer: Any) -> _StringSplit:
    return _StringSplit(tokenizer)


# --- the constraint ---------------------------------------------------------------------------------------------
class JSONConstraint:
    """Grammar state of one completion whose answer is a JSON document; see the module docstring."""

    def __init__(self, tokenizer: Any, grammar: JSONGrammar) -> None:
        self.grammar = grammar
        self.parser = _Parser(grammar)
        self.vocab = _vocab_index(tokenizer)
        self.strings = _string_split(tokenizer)
        ids = tokenizer.special_ids
        self.eos, self.think_end, self.dsml = ids[EOS], ids[THINK_END], ids[DSML]
        self._reasoning_rule = FreeText((ids[BOS], ids[THINK_START]), (self.dsml, self.eos), self.think_end)
        self._eos_only = (self.eos,)
        self._cache = grammar.cache.setdefault(id(self.vocab), {})  # state -> allowed ids, per vocabulary
        self.reset(thinking=True)

    def reset(self, thinking: bool) -> None:
        """A new completion: reasoning first (thinking mode), or the JSON right away (chat mode)."""
        self.phase = "reasoning" if thinking else "json"
        self.released = False
        self.stack: tuple = (("value", self.grammar.root),)

    def allowed(self) -> tuple[int, ...] | None:
        if self.phase == "json":
            if not self.stack:
                return self._eos_only
            cached = self._cache.get(self.stack)
            if cached is None:
                cached = self._cache[self.stack] = self._allowed_now()
            return cached
        return None

    def free_rule(self) -> FreeText | None:
        return self._reasoning_rule if self.phase == "reasoning" else None

    def feed(self, token: int) -> None:
        if self.phase == "reasoning":
            if token == self.think_end:
                self.phase = "json"
            elif token in (self.dsml, self.eos):
                self._release()
        elif self.phase == "json":
            if not self.stack:
                if token == self.eos:
                    self.phase = "done"
                else:
                    self._release()
                return
            piece = self.vocab.bytes_of[token] if 0 <= token < len(self.vocab.bytes_of) else None
            stack = self.stack
            for b in piece or b"":
                stack = self.parser.step(stack, b)
                if stack is None:
                    break
            if not piece or stack is None:
                return self._release()
            self.stack = stack

    @property
    def done(self) -> bool:
        """The JSON document is complete (EOS may follow)."""
        return self.phase in ("json", "done") and not self.stack

    def _release(self) -> None:
        self.phase, self.released = "off", True

    def _allowed_now(self) -> tuple[int, ...]:
        if self.stack[-1] == ("str", 0):  # inside a string: plain text tokens always, walk the others
            found = self._walk(self.strings.keys, self.strings.ids)
            return tuple(sorted((*self.strings.plain, *found)))
        return tuple(sorted(self._walk(self.vocab.sorted_bytes, self.vocab.sorted_ids)))

    def _walk(self, keys: list[bytes], ids: list[int]) -> list[int]:
        """Ids of the tokens (sorted `keys`) whose every byte the parser accepts from the current state."""
        out: list[int] = []
        step = self.parser.step
        todo = [(0, len(keys), 0, self.stack)]
        while todo:
            lo, hi, depth, stack = todo.pop()
            while lo < hi and len(keys[lo]) == depth:  # tokens that end here
                out.append(ids[lo])
                lo += 1
            i = lo
            while i < hi:
                b = keys[i][depth]
                j = hi if b == 255 else bisect.bisect_left(keys, keys[i][:depth] + bytes((b + 1,)), i, hi)
                nxt = step(stack, b)
                if nxt is not None:
                    todo.append((i, j, depth + 1, nxt))
                i = j
        return out
