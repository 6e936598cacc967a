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

from .tokens import DSML, TOOLS_TEMPLATE


def to_json(value: Any) -> str:
    """JSON as the official encoder writes it: default separators, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


def render_tools_block(functions: list[dict]) -> str:
    """The "## Tools" section for a list of OpenAI `function` objects."""
    return TOOLS_TEMPLATE.replace("{tool_schemas}", "\n".join(to_json(fn) for fn in functions))


def render_parameters(arguments: dict[str, Any]) -> str:
    lines = []
    for key, value in arguments.items():
        is_str = isinstance(value, str)
        text = value if is_str else to_json(value)
        flag = "true" if is_str else "false"
        lines.append(f'<{DSML}parameter name="{key}" string="{flag}">{text}</{DSML}parameter>')
    return "\n".join(lines)


def render_tool_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    """The tool-call block appended to an assistant turn, from (name, arguments) pairs."""
    invokes = [f'<{DSML}invoke name="{name}">\n{render_parameters(args)}\n</{DSML}invoke>' for name, args in calls]
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def arguments_json(params: list[tuple[str, str, bool]]) -> str:
    """Rebuild a call's `arguments` JSON text from parsed (name, raw value, is_string) parameters.

    String values are JSON-encoded; non-string values are inserted verbatim, exactly like the
    official parser (so an invalid JSON value yields invalid `arguments`; callers check).
    """
    items = [f"{to_json(name)}: {to_json(value) if is_string else value}" for name, value, is_string in params]
    return "{" + ", ".join(items) + "}"
