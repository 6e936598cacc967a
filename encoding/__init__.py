"""DSV4 chat encoding (byte-exact with the official `encoding_dsv4.py`), its tokenizer,
append-only encoding for agent sessions, a streaming DSML tool-call parser, and the
DSML grammar constraint and the JSON grammar constraint for decoding. Pure Python."""
from __future__ import annotations

from .append import AppendOnlyEncoder
from .constrain import DSMLConstraint, FreeText, tools_from_prompt
from .encode import encode_messages, render_messages
from .errors import DSMLParseError, MessageError
from .json_constraint import JSONConstraint, JSONGrammar, UnsupportedSchema, compile_schema
from .parse import parse_message_from_completion_text
from .messages import (
    AssistantMessage,
    DeveloperMessage,
    FunctionCall,
    LatestReminderMessage,
    Message,
    SystemMessage,
    ToolCall,
    ToolMessage,
    ToolSpec,
    UserMessage,
)
from .stream import (
    ContentDelta,
    End,
    Event,
    ReasoningDelta,
    StreamParser,
    ToolCallComplete,
    ToolCallParameter,
    ToolCallStarted,
)
from .tokenizer import Tokenizer
from .tokens import Piece

__all__ = [
    "AppendOnlyEncoder",
    "AssistantMessage",
    "DeveloperMessage",
    "DSMLConstraint",
    "FreeText",
    "FunctionCall",
    "JSONConstraint",
    "JSONGrammar",
    "LatestReminderMessage",
    "Message",
    "SystemMessage",
    "ToolCall",
    "ToolMessage",
    "ToolSpec",
    "Tokenizer",
    "UserMessage",
    "ContentDelta",
    "DSMLParseError",
    "End",
    "Event",
    "MessageError",
    "Piece",
    "ReasoningDelta",
    "StreamParser",
    "ToolCallComplete",
    "ToolCallParameter",
    "ToolCallStarted",
    "UnsupportedSchema",
    "compile_schema",
    "encode_messages",
    "parse_message_from_completion_text",
    "render_messages",
    "tools_from_prompt",
]
