"""`python -m agent` is `dsv4-agent`."""

from agent.cli import app

app(prog_name="dsv4-agent")
