"""DSV4 chat encoding (byte-exact with the official `encoding_dsv4.py`), its tokenizer,
append-only encoding for agent sessions, a streaming DSML tool-call parser, and the
DSML grammar constraint for decoding. Pure Python."""
from __future__ import annotations

from .append import AppendOnlyEncoder
from .constrain import DSMLConstraint, FreeText, tools_from_prompt
from .encode import encode_messages
from .errors import DSMLParseError, MessageError
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

__all__ = [
    "AppendOnlyEncoder",
    "AssistantMessage",
    "DeveloperMessage",
    "DSMLConstraint",
    "FreeText",
    "FunctionCall",
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
    "ReasoningDelta",
    "StreamParser",
    "ToolCallComplete",
    "ToolCallParameter",
    "ToolCallStarted",
    "encode_messages",
    "parse_message_from_completion_text",
    "tools_from_prompt",
]
