"""The fixed strings of the DSV4 chat format: special tokens and prompt texts.

Every string here is part of the wire format the model was trained on and must stay byte-exact
with the official `encoding/encoding_dsv4.py` (fullwidth bars `｜` U+FF5C, `▁` U+2581).
`Piece` tells these strings apart from message data in a rendered prompt.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Piece:
    """A stretch of a rendered prompt: the format's own text (`markup`: role, think and DSML markers,
    tags, the tools prose), or message data (content, reasoning, tool names, arguments, schemas,
    tool results). `Tokenizer.encode_prompt` emits the control tokens of markup as their ids and
    encodes data as ordinary text, so no string in a message can become a control token."""

    text: str
    markup: bool

    @staticmethod
    def of_markup(text: str) -> Piece:
        return Piece(text, True)

    @staticmethod
    def of_data(text: str) -> Piece:
        return Piece(text, False)


def prompt_text(pieces: list[Piece]) -> str:
    return "".join(piece.text for piece in pieces)


BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"

# Quick-instruction tasks: a message's `task` appends its token after the message.
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# The read_url task's caller ends the user content with "<｜extracted_url｜>{url}" (the official README);
# in a read_url turn the last one is markup, every other occurrence is text.
EXTRACTED_URL = "<｜extracted_url｜>"

# DSML markup of tool calls (the tag names follow the `｜DSML｜` token).
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke"
PARAMETER_OPEN = f"<{DSML}parameter"
PARAMETER_CLOSE = f"</{DSML}parameter"
# What starts a tool-call block in a completion: the official parser requires the blank line.
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"

# Tokens that never belong inside reasoning or content text.
FORBIDDEN_IN_TEXT = (BOS, EOS, THINK_START, THINK_END, DSML)

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, "
    "and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

RESPONSE_FORMAT_PREFIX = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)

# The tools block appended to a system or developer message; `{tool_schemas}` is one JSON
# object per line (each tool's OpenAI `function` object).
TOOLS_TEMPLATE = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{tool_schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""
