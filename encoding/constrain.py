"""DSML-constrained decoding: the next tokens that keep a DSV4 completion well-formed for its tools.

    constraint = DSMLConstraint(Tokenizer.default(), tools)   # once per session (builds its tables)
    constraint.reset(thinking=True)                          # at the start of every turn
    each step:  constraint.allowed()    -> tuple of ids (only these may come next), or None in free text
                constraint.free_rule()  -> FreeText(banned, redirect, redirect_to) for free text
                ... the sampler draws `token` ...
                constraint.feed(token)

The grammar (dsv4-reference §5.3), with `<｜DSML｜` etc. standing for the single special tokens:

    thinking: REASONING </think> CONTENT (EOS | BLOCK EOS)      chat: CONTENT (EOS | BLOCK EOS)
    BLOCK  = "\\n\\n<｜DSML｜tool_calls>\\n" INVOKE ("\\n" INVOKE)* "\\n</｜DSML｜tool_calls>"
    INVOKE = "<｜DSML｜invoke name=\\"TOOL\\">\\n" (PARAM ("\\n" PARAM)*)? "\\n</｜DSML｜invoke>"
    PARAM  = "<｜DSML｜parameter name=\\"P\\" string=\\"true|false\\">" VALUE "</｜DSML｜parameter>"

Free text (reasoning, content, parameter values) stays free except for the few special tokens
that would break the grammar there:
  * reasoning: `｜DSML｜` (a tool call without `</think>`, vLLM #45862) and EOS are not valid before
    `</think>`; their probability is moved onto `</think>`, so the model closes its reasoning at the
    very step it wanted to call a tool or stop, and writes the call in the content. (Force-closing
    after the fact cannot work: the `\\n\\n<` before the markup is already in the reasoning.)
  * content: `｜DSML｜` only right after "\\n\\n<" (it then opens the block: no DSML fragments leak
    into content, vLLM #40801); BOS, `<think>`, `</think>` never.
  * a parameter value: EOS never (a call is open); `｜DSML｜` only right after "</" (it closes the
    parameter).
Everything between two values is a finite choice of byte strings ("choice points"): the tool
names declared in the prompt followed by `">\\n<`, that tool's parameter names not given yet with
the `string` flag(s) its JSON schema allows, the closing tags (`</｜DSML｜invoke>` only once every
required parameter is given), and EOS right after the block. Values with a finite schema
(`enum`, `const`, `boolean`, `null`) are choices too; other values are free text (the parser
checks JSON).

At a choice point a token is allowed iff its bytes continue one of the alternatives (a token may
run past the end of an alternative only into a free value). The allowed ids come from a byte
index of the vocabulary (exact-bytes dict + sorted list for prefix ranges), computed once per
(choice, bytes written so far) and cached, so a step costs a dict lookup after the first turn.

A token the grammar does not allow (another processor forced it) turns the constraint off for
the rest of the turn: `allowed()` is None from then on, `released` says so.

Whether a call is made (OpenAI's `tool_choice`): `calls="auto"` leaves it to the model; `"none"`
bans `｜DSML｜` in the content, so no block can open; `"required"` makes the content start with the
block (`"\n\n<"` then `｜DSML｜`, right after `</think>` in thinking mode), so a call is made within
a bounded number of tokens. `allowed=[names]` offers only those tools in an invoke header (a named
`tool_choice`: `calls="required", allowed=[name]`); `parallel=False` closes the block after one invoke.
"""
from __future__ import annotations

import bisect
import functools
import json
from dataclasses import dataclass
from typing import Any, Hashable

from .dsml import to_json
from .tokens import BOS, DSML, EOS, THINK_END, THINK_START

__all__ = ["DSMLConstraint", "FreeText", "tools_from_prompt", "token_bytes"]


# --- the vocabulary as bytes ----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte is shown as one printable character (GPT-2 scheme)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@functools.lru_cache(maxsize=4)
def token_bytes(tokenizer: Any) -> tuple[bytes | None, ...]:
    """Bytes of every token id of a byte-level tokenizer; None for added (special) tokens, which
    are single symbols of the grammar, never spelled by bytes."""
    hf = tokenizer._hf  # encoding.Tokenizer: the HF tokenizer it wraps
    added = set(hf.get_added_tokens_decoder())
    table = _byte_of_char()
    out: list[bytes | None] = [None] * tokenizer.vocab_size
    for text, token_id in hf.get_vocab(with_added_tokens=False).items():
        if token_id in added or token_id >= len(out):
            continue
        try:
            out[token_id] = bytes(table[ch] for ch in text)
        except KeyError:  # not a byte-level token: never used at a choice point
            continue
    return tuple(out)


class _VocabIndex:
    """Byte tokens by exact bytes and, sorted, by prefix."""

    def __init__(self, tokenizer: Any):
        self.bytes_of = token_bytes(tokenizer)
        self.by_bytes: dict[bytes, list[int]] = {}
        for token_id, b in enumerate(self.bytes_of):
            if b:
                self.by_bytes.setdefault(b, []).append(token_id)
        pairs = sorted((b, i) for i, b in enumerate(self.bytes_of) if b)
        self.sorted_bytes = [b for b, _ in pairs]
        self.sorted_ids = [i for _, i in pairs]

    def starting_with(self, prefix: bytes) -> list[int]:
        lo = bisect.bisect_left(self.sorted_bytes, prefix)
        hi = lo
        while hi < len(self.sorted_bytes) and self.sorted_bytes[hi].startswith(prefix):
            hi += 1
        return self.sorted_ids[lo:hi]


@functools.lru_cache(maxsize=4)
def _vocab_index(tokenizer: Any) -> _VocabIndex:
    return _VocabIndex(tokenizer)


# --- tools ------------------------------------------------------------------------------------------
_SCHEMAS_HEADER = "### Available Tool Schemas\n\n"
_SCHEMAS_END = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas"


def tools_from_prompt(text: str) -> list[dict] | None:
    """The tool `function` objects rendered in a prompt's "## Tools" blocks (the ones the model
    sees), in order; None when the prompt has no tools block."""
    found: list[dict] | None = None
    start = text.find(_SCHEMAS_HEADER)
    while start != -1:
        start += len(_SCHEMAS_HEADER)
        end = text.find(_SCHEMAS_END, start)
        if end == -1:
            break
        found = found or []
        for line in text[start:end].split("\n"):
            if line.strip():
                try:
                    found.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"tools block: a schema line is not JSON ({e}): {line[:80]!r}") from e
        start = text.find(_SCHEMAS_HEADER, end)
    return found


@dataclass(frozen=True)
class _Param:
    name: str
    values: dict[str, tuple[str, ...] | None]  # string flag -> finite value texts, or None (free text)


@dataclass(frozen=True)
class _Tool:
    name: str
    params: tuple[_Param, ...]
    required: frozenset[str]


def _schema_types(schema: dict) -> set[str] | None:
    """JSON types a schema admits; None when it does not say (anything goes)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    subs = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(subs, list):
        types: set[str] = set()
        for sub in subs:
            sub_types = _schema_types(sub) if isinstance(sub, dict) else None
            if sub_types is None:
                return None
            types |= sub_types
        return types
    return None


def _param(name: str, schema: Any) -> _Param:
    """The string flags a parameter may take and, per flag, its finite values (if the schema has them)."""
    schema = schema if isinstance(schema, dict) else {}
    if "const" in schema or isinstance(schema.get("enum"), list) and schema["enum"]:
        choices = [schema["const"]] if "const" in schema else schema["enum"]
        raw = tuple(dict.fromkeys(v for v in choices if isinstance(v, str)))
        other = tuple(dict.fromkeys(to_json(v) for v in choices if not isinstance(v, str)))
        values = {flag: vals for flag, vals in (("true", raw), ("false", other)) if vals}
        return _Param(name, values)
    types = _schema_types(schema)
    if types is None:
        return _Param(name, {"true": None, "false": None})
    values: dict[str, tuple[str, ...] | None] = {}
    if "string" in types:
        values["true"] = None
    others = types - {"string"}
    if others:
        literal = {"boolean": ("true", "false"), "null": ("null",)}
        values["false"] = tuple(v for t in sorted(others) for v in literal[t]) if others <= set(literal) else None
    return _Param(name, values or {"true": None, "false": None})


def _tool(spec: Any) -> _Tool:
    fn = spec.get("function", spec) if isinstance(spec, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"a tool schema needs a non-empty 'name' (OpenAI function object), got {spec!r:.120}")
    parameters = fn.get("parameters") or {}
    props = parameters.get("properties") or {}
    for name in (fn["name"], *props):
        if '"' in name or DSML in name:
            raise ValueError(f"tool {fn['name']!r}: the name {name!r} cannot be written in DSML (it holds '\"' or the DSML token)")
    required = frozenset(r for r in parameters.get("required") or () if r in props)
    return _Tool(fn["name"], tuple(_param(k, v) for k, v in props.items()), required)


# --- the state machine --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FreeText:
    """What is not allowed in free text: `banned` ids never come next; the probability of the
    `redirect` ids moves onto `redirect_to` (reasoning: markup or EOS means "close the think")."""

    banned: tuple[int, ...]
    redirect: tuple[int, ...] = ()
    redirect_to: int | None = None


# What follows an alternative of a choice: the DSML token then another choice (by key), EOS, or a
# parameter value ("value", tool, given, param, flag).
_Next = tuple


@dataclass
class _Choice:
    alts: dict[bytes, _Next]
    allowed: dict[bytes, tuple[int, ...]]  # bytes written so far -> allowed ids (cache)


class DSMLConstraint:
    """Grammar state of one completion; see the module docstring. Not thread-safe (one per session)."""

    def __init__(self, tokenizer: Any, tools: list[dict], *, calls: str = "auto",
                 allowed: list[str] | None = None, parallel: bool = True):
        self.tokens = _vocab_index(tokenizer)
        self.tools = {t.name: t for t in map(_tool, tools)}
        if not self.tools:
            raise ValueError("DSMLConstraint needs at least one tool (without tools nothing constrains a call)")
        if calls not in ("auto", "none", "required"):
            raise ValueError(f"calls must be 'auto', 'none' or 'required', got {calls!r}")
        unknown = [name for name in allowed or () if name not in self.tools]
        if unknown:
            raise ValueError(f"allowed names tools that are not declared: {unknown} (declared: {list(self.tools)})")
        self.calls, self.parallel = calls, parallel
        self.allowed_tools = list(allowed) if allowed is not None else list(self.tools)
        ids = tokenizer.special_ids
        self.dsml, self.eos, self.think_end = ids[DSML], ids[EOS], ids[THINK_END]
        self._reasoning_rule = FreeText((ids[BOS], ids[THINK_START]), (self.dsml, self.eos), self.think_end)
        self._content_rule = FreeText((ids[BOS], ids[THINK_START], self.think_end, self.dsml))
        self._content_open_rule = FreeText((ids[BOS], ids[THINK_START], self.think_end))
        self._value_rule = FreeText((ids[BOS], self.eos, self.dsml))
        self._value_close_rule = FreeText((ids[BOS], self.eos))
        self._choices: dict[Hashable, _Choice] = {}
        self.reset(thinking=True)

    # -- public ---------------------------------------------------------------------------------
    def reset(self, thinking: bool) -> None:
        """A new completion: it starts in the reasoning (thinking mode) or the content (chat mode)."""
        self.phase = "reasoning"
        self.released = False
        self._tail = b""  # the last bytes of the current free text
        self._choice: _Choice | None = None
        self._written = b""  # bytes written inside the current choice
        self._special: tuple[int, _Next] | None = None  # (expected id, then)
        self._value: _Next | None = None  # the context of the free value being written
        if not thinking:
            self._enter_content()

    def allowed(self) -> tuple[int, ...] | None:
        """The ids that may come next at a constrained point; None in free text (see free_rule)."""
        if self.phase == "choice":
            cached = self._choice.allowed.get(self._written)
            if cached is None:
                cached = self._choice.allowed[self._written] = self._allowed_in_choice()
            return cached
        if self.phase == "special":
            return (self._special[0],)
        return None

    def free_rule(self) -> FreeText | None:
        """The few special tokens that break the grammar in the current free text; None when the
        constraint is off or the completion has ended."""
        if self.phase == "reasoning":
            return self._reasoning_rule
        if self.phase == "content":
            opens = self._tail.endswith(b"\n\n<") and self.calls != "none"
            return self._content_open_rule if opens else self._content_rule
        if self.phase == "value":
            return self._value_close_rule if self._tail.endswith(b"</") else self._value_rule
        return None

    def feed(self, token: int) -> None:
        """Advance over one generated token."""
        phase = self.phase
        if phase in ("done", "off"):
            return
        piece = self.tokens.bytes_of[token] if 0 <= token < len(self.tokens.bytes_of) else None
        if phase == "choice":
            self._feed_choice(piece)
        elif phase == "special":
            expected, then = self._special
            self._then(then) if token == expected else self._release()
        elif phase == "reasoning":
            if token == self.think_end:
                self._enter_content()
            elif token in (self.dsml, self.eos):
                self._release()
            else:
                self._tail = (self._tail + piece)[-3:] if piece else b""
        elif phase == "content":
            if token == self.eos:
                self.phase = "done"
            elif token == self.dsml:
                opens = self._tail.endswith(b"\n\n<") and self.calls != "none"
                self._enter_choice(("block_open",)) if opens else self._release()
            else:
                self._tail = (self._tail + piece)[-3:] if piece else b""
        else:  # a free value
            if token == self.dsml:
                _, tool, given, _, _ = self._value
                self._enter_choice(("after_param", tool, given)) if self._tail.endswith(b"</") else self._release()
            elif token == self.eos:
                self._release()
            else:
                self._tail = (self._tail + piece)[-3:] if piece else b""

    # -- transitions ------------------------------------------------------------------------------
    def _release(self) -> None:
        self.phase, self.released = "off", True

    def _enter_content(self) -> None:
        """The content begins: free text, or (a call required) the opening of the block right away."""
        self.phase, self._tail = "content", b""
        if self.calls == "required":
            self._enter_choice(("call_start",))

    def _enter_choice(self, key: Hashable) -> None:
        self.phase, self._written = "choice", b""
        self._choice = self._choices.get(key) or self._build(key)

    def _then(self, then: _Next, spill: bytes = b"") -> None:
        """Go where an alternative leads: a special token, or a value (`spill`: its first bytes)."""
        if then[0] == "dsml":
            self.phase, self._special = "special", (self.dsml, ("choice", then[1]))
        elif then[0] == "eos":
            self.phase, self._special = "special", (self.eos, ("done",))
        elif then[0] == "choice":
            self._enter_choice(then[1])
        elif then[0] == "done":
            self.phase = "done"
        else:  # ("value", tool, given, param, flag)
            _, tool, given, param, flag = then
            if self._param_values(tool, param, flag) is not None:
                self._enter_choice(("values", tool, given, param, flag))
            else:
                self.phase, self._value, self._tail = "value", then, spill[-3:]

    def _feed_choice(self, piece: bytes | None) -> None:
        if not piece:
            return self._release()
        written = self._written + piece
        live = False
        for alt, then in self._choice.alts.items():
            if alt == written:
                return self._then(then)
            if written.startswith(alt) and self._spills(then):
                return self._then(then, spill=written[len(alt):])
            live = live or alt.startswith(written)
        if live:
            self._written = written
        else:
            self._release()

    def _spills(self, then: _Next) -> bool:
        """Whether a token may run past the alternative into what follows (a free value)."""
        return then[0] == "value" and self._param_values(then[1], then[3], then[4]) is None

    def _allowed_in_choice(self) -> tuple[int, ...]:
        written, ids = self._written, set()
        for alt, then in self._choice.alts.items():
            if not alt.startswith(written):
                continue
            rest = alt[len(written):]
            for k in range(1, len(rest) + 1):
                ids.update(self.tokens.by_bytes.get(rest[:k], ()))
            if self._spills(then):
                ids.update(self.tokens.starting_with(rest))
        return tuple(sorted(ids))

    # -- the grammar's choice points ------------------------------------------------------------------
    def _param_values(self, tool: str, param: str, flag: str) -> tuple[str, ...] | None:
        return next(p for p in self.tools[tool].params if p.name == param).values[flag]

    def _build(self, key: Hashable) -> _Choice:
        """The alternatives of one choice point (keys: see the branches) -> what follows each."""
        kind = key[0]
        alts: dict[str, _Next] = {}
        if kind == "call_start":  # a call is required: the content is the block
            alts["\n\n<"] = ("dsml", ("block_open",))
        elif kind == "block_open":  # after "\n\n<｜DSML｜"
            alts["tool_calls>\n<"] = ("dsml", ("invoke",))
        elif kind == "invoke":  # after "<｜DSML｜": an invoke header
            for tool in (self.tools[name] for name in self.allowed_tools):
                if tool.params:
                    alts[f'invoke name="{tool.name}">\n<'] = ("dsml", ("params", tool.name, ()))
                if not tool.required:
                    alts[f'invoke name="{tool.name}">\n\n</'] = ("dsml", ("invoke_end",))
        elif kind == "params":  # after "<｜DSML｜": a parameter not given yet (`given` sorted: one key per set)
            _, name, given = key
            for param in self.tools[name].params:
                if param.name not in given:
                    for flag in param.values:
                        then = ("value", name, tuple(sorted((*given, param.name))), param.name, flag)
                        alts[f'parameter name="{param.name}" string="{flag}">'] = then
        elif kind == "values":  # a finite value, then "</"
            _, name, given, param, flag = key
            for value in self._param_values(name, param, flag):
                alts[f"{value}</"] = ("dsml", ("after_param", name, given))
        elif kind == "after_param":  # after "</｜DSML｜" closing a value
            _, name, given = key
            tool = self.tools[name]
            if any(p.name not in given for p in tool.params):
                alts["parameter>\n<"] = ("dsml", ("params", name, given))
            if tool.required <= set(given):
                alts["parameter>\n</"] = ("dsml", ("invoke_end",))
        elif kind == "invoke_end":  # after "</｜DSML｜" closing an invoke: another invoke or the block end
            if self.parallel:
                alts["invoke>\n<"] = ("dsml", ("invoke",))
            alts["invoke>\n</"] = ("dsml", ("block_end",))
        elif kind == "block_end":
            alts["tool_calls>"] = ("eos",)
        choice = self._choices[key] = _Choice({a.encode(): t for a, t in alts.items()}, {})
        return choice
