"""Agent settings: limits, effort, approval and the system prompt. One pydantic model, unknown keys rejected."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Effort = Literal["max", "high", "none"]
Approval = Literal["auto", "confirm"]

DEFAULT_SYSTEM_PROMPT = (
    "You are dsv4-agent, an autonomous agent that solves the user's task with the tools below. "
    "Work step by step: call tools to inspect, act and verify; read every tool result before the next step. "
    "Independent calls may go in one tool_calls block; they run in parallel. "
    "When the task is done, reply with the final answer and no tool call."
)


class AgentConfig(BaseModel):
    """What an `Agent` may spend and how it behaves. Every limit is checked at the source (each engine call)."""

    model_config = ConfigDict(extra="forbid")

    effort: Effort = Field(
        "max", description="max = Think Max (thinking + the max-effort prefix), high = thinking, none = chat mode"
    )
    max_steps: int = Field(50, ge=1, description="engine calls (turns) before the run stops with max_steps")
    max_tokens: int | None = Field(
        None, ge=1, description="tokens the engine may compute (new prefill + decode) before max_tokens"
    )
    max_wall_s: float | None = Field(None, gt=0, description="wall-clock seconds before the run stops with timeout")
    max_turn_tokens: int = Field(
        32768, ge=1, description="decode cap of one turn; a cut-off turn is reported to the model"
    )
    max_format_errors: int = Field(3, ge=1, description="consecutive malformed or empty turns before format_error")
    stuck_repeats: int = Field(3, ge=2, description="identical consecutive tool-call turns that count as stuck")
    tool_timeout_s: float = Field(120.0, gt=0, description="default per-call timeout for tools that set none")
    max_parallel_tools: int = Field(8, ge=1, description="parallel-safe calls that may run at once")
    session_save_max_bytes: int = Field(
        1 << 30, ge=0, description="a call's KV session is saved into its run folder when it ends if it takes at "
        "most this many bytes (engine backend), so a later `reply` loads it instead of re-prefilling; 0 = never",
    )
    approval: Approval = Field("auto", description="auto runs tool calls freely; confirm asks before each call")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="rendered once, before the tool schemas")

    @classmethod
    def from_yaml(cls, path: Path, **overrides: object) -> AgentConfig:
        """Settings from a YAML file, then `overrides` (e.g. CLI flags) on top."""
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must be a mapping of settings, got {type(data).__name__}")
        try:
            return cls(**{**data, **overrides})
        except ValidationError as e:
            raise ValueError(f"config {path}: {describe_validation_error(e)}") from None


def describe_validation_error(error: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """A pydantic error as one line: each bad field (under `names[field]` when given, e.g. the flag that
    set it), what is wrong, and the value given."""
    problems = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(settings)"
        field = (names or {}).get(field, field)
        given = "" if problem["type"] == "missing" else f" (got {problem.get('input')!r})"
        problems.append(f"{field}: {problem['msg']}{given}")
    return "; ".join(problems)
