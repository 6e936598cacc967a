"""What a running tool may know about its surroundings, injected by the agent loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sandboxes.base import Sandbox


@dataclass
class ToolContext:
    """Handed to a tool function that declares a parameter annotated `ToolContext`.

    The parameter never appears in the tool's JSON schema: the model cannot set it.
    """

    sandbox: Sandbox | None = None
    """Where commands and file operations run; built-in tools refuse to run without one."""
    workspace: str | None = None
    """The workspace folder inside the sandbox, where the search tools (list_dir, find, grep) start.
    When None: the sandbox's `workspace` attribute if it has one, else the shell's current folder.
    File tools pass relative paths to the sandbox, which resolves them against its workspace."""
    run_id: str = ""
    step: int = 0
    call_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything an application wants its own tools to see (settings, handles)."""
