"""dsv4-agent's agent loop: `Agent`, its backends, trajectories and the `dsv4-agent` CLI.

from agent import Agent, ScriptedBackend, completion
from sandboxes import LocalSandbox
from tools import builtin_tools

backend = ScriptedBackend([completion("List the files.", calls=[("bash", {"command": "ls"})]),
                           completion("Done.", content="The folder holds: ...")])
agent = Agent(backend=backend, tools=builtin_tools(), sandbox=LocalSandbox("/tmp/ws"), approval="auto")
result = anyio.run(agent.run, "what is in the folder?")   # RunResult(status, final_answer, trajectory_path, ...)
"""

from agent.backends.base import Backend
from agent.backends.scripted import ScriptedBackend, ScriptExhausted, completion
from agent.config import AgentConfig
from agent.display import Observer, RichDisplay
from agent.loop import Agent, RunResult
from agent.status import EXIT_CODES, ExitStatus

__all__ = [
    "EXIT_CODES",
    "Agent",
    "AgentConfig",
    "Backend",
    "ExitStatus",
    "Observer",
    "RichDisplay",
    "RunResult",
    "ScriptExhausted",
    "ScriptedBackend",
    "completion",
]
