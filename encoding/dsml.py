"""DSML, the tool-call markup of DSV4: rendering calls and tool schemas, and rebuilding arguments.

A call renders as

    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="K" string="true">raw text</｜DSML｜parameter>
    <｜DSML｜parameter name="N" string="false">JSON value</｜DSML｜parameter>
    </｜DSML｜invoke>

String values go in raw (string="true"); every other JSON type as `json.dumps(ensure_ascii=False)`.
"""
from __future__ import annotations

import json
from typing import Any

from .tokens import DSML, TOOLS_TEMPLATE, Piece, prompt_text

markup, data = Piece.of_markup, Piece.of_data


def to_json(value: Any) -> str:
    """JSON as the official encoder writes it: default separators, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


def tools_block_pieces(functions: list[dict]) -> list[Piece]:
    """The "## Tools" section for a list of OpenAI `function` objects; the schemas are data."""
    head, tail = TOOLS_TEMPLATE.split("{tool_schemas}")
    return [markup(head), data("\n".join(to_json(fn) for fn in functions)), markup(tail)]


def render_tools_block(functions: list[dict]) -> str:
    return prompt_text(tools_block_pieces(functions))


def parameter_pieces(arguments: dict[str, Any]) -> list[Piece]:
    pieces: list[Piece] = []
    for key, value in arguments.items():
        is_str = isinstance(value, str)
        if pieces:
            pieces.append(markup("\n"))
        pieces += [markup(f'<{DSML}parameter name="'), data(str(key)), markup(f'" string="{"true" if is_str else "false"}">'),
                   data(value if is_str else to_json(value)), markup(f"</{DSML}parameter>")]
    return pieces


def tool_calls_pieces(calls: list[tuple[str, dict[str, Any]]]) -> list[Piece]:
    """The tool-call block appended to an assistant turn, from (name, arguments) pairs."""
    pieces = [markup(f"\n\n<{DSML}tool_calls>\n")]
    for i, (name, arguments) in enumerate(calls):
        if i:
            pieces.append(markup("\n"))
        pieces += [markup(f'<{DSML}invoke name="'), data(name), markup('">\n'), *parameter_pieces(arguments),
                   markup(f"\n</{DSML}invoke>")]
    return pieces + [markup(f"\n</{DSML}tool_calls>")]


def render_tool_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    return prompt_text(tool_calls_pieces(calls))


def arguments_json(params: list[tuple[str, str, bool]]) -> str:
    """Rebuild a call's `arguments` JSON text from parsed (name, raw value, is_string) parameters.

    String values are JSON-encoded; non-string values are inserted verbatim, exactly like the
    official parser (so an invalid JSON value yields invalid `arguments`; callers check).
    """
    items = [f"{to_json(name)}: {to_json(value) if is_string else value}" for name, value, is_string in params]
    return "{" + ", ".join(items) + "}"
