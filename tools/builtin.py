"""The built-in tools: shell, Python, and file operations, all run inside the sandbox of the context.

Nothing here touches the host: commands go through `Sandbox.run` (one persistent bash per sandbox),
files through `Sandbox.read_file` / `write_file`, which resolve paths against the workspace and refuse
paths that leave it. The search tools (list_dir, find, grep) run in a subshell that starts in the
workspace when the context names it (`ToolContext.workspace`), so a `cd` in an earlier bash call
does not move them, and the subshell leaves the session's own directory alone.
"""
from __future__ import annotations

import re
import shlex
from typing import Annotated, Literal

from pydantic import Field

from sandboxes.base import CommandResult, Sandbox
from tools.context import ToolContext
from tools.result import ToolResult
from tools.tool import Tool, tool

# Model-chosen command timeouts are bounded: one call cannot hold the run for more than an hour.
Timeout = Annotated[float, Field(gt=0, le=3600, description="seconds before the command is killed")]
MaxResults = Annotated[int, Field(ge=1, le=5000, description="stop after this many results")]
DEFAULT_READ_LINES = 2000
_BINARY_SNIFF_BYTES = 8192


def _sandbox(ctx: ToolContext) -> Sandbox:
    if ctx.sandbox is None:
        raise RuntimeError("no sandbox is attached to this run; built-in tools only run inside one")
    return ctx.sandbox


def _command_report(result: CommandResult, timeout: float) -> ToolResult:
    """stdout, then stderr, then how it ended: what the model needs to judge a command."""
    parts = [result.stdout.rstrip("\n")] if result.stdout else []
    if result.stderr:
        parts.append("[stderr]\n" + result.stderr.strip("\n"))
    if result.timed_out:
        parts.append(f"[timed out after {timeout:g} s: the command was killed; its shell state was not kept]")
    else:
        parts.append(f"[exit code {result.exit_code}]")
    return ToolResult(
        content="\n".join(parts),
        is_error=result.timed_out or result.exit_code != 0,
        metadata={
            "exit_code": result.exit_code,
            "timed_out": result.timed_out,
            "sandbox_truncated": result.truncated,
            "sandbox_duration_s": result.duration_s,
        },
    )


@tool
async def bash(command: str, ctx: ToolContext, timeout: Timeout = 120.0, background: bool = False) -> ToolResult:
    """Run a command in a persistent bash shell inside the sandbox.

    The shell keeps its state between calls: the working directory, exported variables and
    functions. Commands read no input, so do not start interactive programs (editors, pagers,
    prompts); pass flags such as -y instead. Long output keeps its head and tail.

    Args:
        command: the bash command line (may span several lines).
        timeout: seconds before the command and everything it started are killed.
        background: start the command in the background and return at once (for servers); its output
            goes to a log file whose path the result names. Processes started without it are ended
            when the command returns.
    """
    result = await _sandbox(ctx).run(command, timeout=timeout, background=background)
    if result.log_path is not None:
        return ToolResult(
            content=f"[started in the background as process {result.background_pid}; its output goes to "
                    f"{result.log_path}]",
            metadata={"background_pid": result.background_pid, "log_path": result.log_path},
        )
    return _command_report(result, timeout)


@tool
async def python(code: str, ctx: ToolContext, timeout: Timeout = 120.0) -> ToolResult:
    """Run a Python program with python3 inside the sandbox and return what it prints.

    Each call is a fresh interpreter (nothing is kept between calls); it starts in the shell's
    current directory. Print what you want to see.

    Args:
        code: the complete Python source to run.
        timeout: seconds before the program is killed.
    """
    result = await _sandbox(ctx).run(f"python3 -c {shlex.quote(code)}", timeout=timeout)
    return _command_report(result, timeout)


async def _read_text(sandbox: Sandbox, path: str) -> str | ToolResult:
    """The file as text, or an error result for a missing, binary or undecodable file."""
    try:
        data = await sandbox.read_file(path)
    except FileNotFoundError:
        return ToolResult.error(f"file not found: {path}")
    except IsADirectoryError:
        return ToolResult.error(f"{path} is a directory; use list_dir")
    except (ValueError, PermissionError) as exc:  # includes sandboxes.WorkspaceEscapeError
        return ToolResult.error(str(exc))
    if b"\0" in data[:_BINARY_SNIFF_BYTES]:
        return ToolResult.error(f"{path} is a binary file ({len(data)} bytes); inspect it with bash (xxd, file)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ToolResult.error(f"{path} is not UTF-8 text ({exc}); inspect it with bash")


@tool(parallel_safe=True)
async def read_file(
    path: str,
    ctx: ToolContext,
    start_line: Annotated[int, Field(ge=1)] = 1,
    end_line: Annotated[int | None, Field(ge=1)] = None,
) -> ToolResult:
    """Read a text file from the workspace, with line numbers.

    Reads at most 2000 lines per call; use start_line and end_line for other parts of a long file.

    Args:
        path: file path relative to the workspace.
        start_line: first line to show (1-based).
        end_line: last line to show (inclusive); default: 2000 lines from start_line.
    """
    text = await _read_text(_sandbox(ctx), path)
    if isinstance(text, ToolResult):
        return text
    lines = text.splitlines()
    total = len(lines)
    if total == 0:
        return ToolResult(content=f"({path} is empty)", metadata={"total_lines": 0})
    if start_line > total:
        return ToolResult.error(f"start_line {start_line} is past the end of {path}, which has {total} lines")
    if end_line is not None and end_line < start_line:
        return ToolResult.error(f"end_line {end_line} is before start_line {start_line}")
    last = min(end_line if end_line is not None else start_line + DEFAULT_READ_LINES - 1, total)
    width = len(str(last))
    body = "\n".join(f"{n:>{width}}\t{lines[n - 1]}" for n in range(start_line, last + 1))
    if start_line > 1 or last < total:
        body += f"\n[lines {start_line}-{last} of {total}]"
    return ToolResult(content=body, metadata={"total_lines": total})


@tool
async def write_file(path: str, content: str, ctx: ToolContext) -> str:
    """Create or overwrite a file in the workspace (parent folders are created).

    Args:
        path: file path relative to the workspace.
        content: the complete new content of the file.
    """
    data = content.encode("utf-8")
    await _sandbox(ctx).write_file(path, data)
    return f"wrote {len(data)} bytes to {path}"


@tool
async def edit_file(
    path: str, old_string: str, new_string: str, ctx: ToolContext, replace_all: bool = False
) -> ToolResult:
    """Replace an exact piece of text in a file of the workspace.

    old_string must match the file exactly (whitespace and indentation included) and, unless
    replace_all is set, exactly once: include enough surrounding lines to make it unique.

    Args:
        path: file path relative to the workspace.
        old_string: the exact text to replace.
        new_string: the text to put in its place.
        replace_all: replace every occurrence instead of requiring exactly one.
    """
    if old_string == "":
        return ToolResult.error("old_string is empty; to create or overwrite a file use write_file")
    if old_string == new_string:
        return ToolResult.error("old_string and new_string are identical; nothing would change")
    sandbox = _sandbox(ctx)
    text = await _read_text(sandbox, path)
    if isinstance(text, ToolResult):
        return text
    count = text.count(old_string)
    if count == 0:
        return ToolResult.error(
            f"old_string was not found in {path} (0 matches); read the file and copy the text exactly, "
            "including whitespace"
        )
    if count > 1 and not replace_all:
        return ToolResult.error(
            f"old_string matches {count} times in {path}; include more surrounding lines to make it unique, "
            "or set replace_all to replace all of them"
        )
    first_line = text[: text.index(old_string)].count("\n") + 1
    updated = text.replace(old_string, new_string)
    await sandbox.write_file(path, updated.encode("utf-8"))
    # Show the edited region so the model can check the result without another read.
    lines = updated.splitlines()
    lo, hi = max(first_line - 3, 1), min(first_line + new_string.count("\n") + 3, len(lines))
    width = len(str(hi))
    snippet = "\n".join(f"{n:>{width}}\t{lines[n - 1]}" for n in range(lo, hi + 1))
    return ToolResult(
        content=f"replaced {count} occurrence(s) in {path}; lines {lo}-{hi} now read:\n{snippet}",
        metadata={"replacements": count},
    )


def _workspace(ctx: ToolContext) -> str | None:
    """The workspace path inside the sandbox: the context's, else the sandbox's own `workspace`
    attribute (LocalSandbox: the host folder it runs in), else unknown."""
    if ctx.workspace:
        return ctx.workspace
    own = getattr(ctx.sandbox, "workspace", None)
    return str(own) if own is not None else None


def _in_workspace(ctx: ToolContext, command: str) -> str:
    """Run `command` in a subshell started in the workspace (when known, else in the shell's current
    folder), leaving the session's cwd alone."""
    workspace = _workspace(ctx)
    if workspace:
        return f"( cd -- {shlex.quote(workspace)} && {command} )"
    return f"( {command} )"


_EXIT_MARK = "__dsv4_tool_exit:"
_EXIT_RE = re.compile(rf"^{_EXIT_MARK}(\d+)\s*$", re.MULTILINE)


async def _listing(ctx: ToolContext, command: str, max_results: int) -> tuple[list[str], bool, int, str]:
    """Run a command whose stdout is one result per line, stopping after max_results.

    Returns (lines, more_exist, exit_code of the command itself, its stderr)."""
    # The command's own exit status is reported on stderr: `head` ends the pipe, not the command.
    piped = _in_workspace(ctx, f"{command}; echo {_EXIT_MARK}$? >&2") + f" | head -n {max_results + 1}"
    result = await _sandbox(ctx).run(piped)
    match = _EXIT_RE.search(result.stderr)
    code = int(match.group(1)) if match else result.exit_code
    stderr = _EXIT_RE.sub("", result.stderr).strip()
    lines = [line for line in result.stdout.splitlines() if line]
    return lines[:max_results], len(lines) > max_results, code, stderr


@tool(parallel_safe=True)
async def list_dir(ctx: ToolContext, path: str = ".") -> ToolResult:
    """List a folder of the workspace; folders end with '/'.

    Args:
        path: folder path relative to the workspace.
    """
    entries, _, code, stderr = await _listing(ctx, f"ls -1Ap -- {shlex.quote(path)}", 10_000)
    if code != 0:
        return ToolResult.error(stderr or f"cannot list {path} (exit code {code})")
    return ToolResult(content="\n".join(entries) if entries else f"({path} is empty)")


@tool(parallel_safe=True)
async def find(
    pattern: str,
    ctx: ToolContext,
    path: str = ".",
    kind: Literal["any", "file", "dir"] = "any",
    max_results: MaxResults = 200,
) -> ToolResult:
    """Find files and folders by name under a folder of the workspace (sorted; .git is skipped).

    Args:
        pattern: shell glob on the base name, e.g. "*.py" or "test_*".
        path: folder to search, relative to the workspace.
        kind: "file", "dir" or "any".
        max_results: stop after this many paths.
    """
    type_test = {"any": "", "file": "-type f ", "dir": "-type d "}[kind]
    command = (
        f"find {shlex.quote(path)} -mindepth 1 -name .git -prune -o {type_test}-name {shlex.quote(pattern)} -print | LC_ALL=C sort"
    )
    paths, more, code, stderr = await _listing(ctx, command, max_results)
    if code != 0 and not paths:
        return ToolResult.error(stderr or f"find failed (exit code {code})")
    if not paths:
        return ToolResult(content=f"no {'' if kind == 'any' else kind + ' '}names match {pattern!r} under {path}")
    text = "\n".join(paths)
    if more:
        text += f"\n[more than {max_results} matches; narrow the pattern or the path]"
    return ToolResult(content=text, metadata={"matches": len(paths), "more": more})


@tool(parallel_safe=True)
async def grep(
    pattern: str,
    ctx: ToolContext,
    path: str = ".",
    include: str | None = None,
    ignore_case: bool = False,
    max_results: MaxResults = 200,
) -> ToolResult:
    """Search file contents under a path of the workspace with a regular expression (grep -E).

    Prints path:line:text for each matching line; binary files and .git are skipped.

    Args:
        pattern: extended regular expression.
        path: file or folder to search, relative to the workspace.
        include: only search files whose name matches this glob, e.g. "*.py".
        ignore_case: match case-insensitively.
        max_results: stop after this many matching lines.
    """
    flags = "-rnIE" + ("i" if ignore_case else "")
    include_opt = f" --include={shlex.quote(include)}" if include else ""
    command = f"grep {flags} --exclude-dir=.git{include_opt} -e {shlex.quote(pattern)} -- {shlex.quote(path)}"
    matches, more, code, stderr = await _listing(ctx, command, max_results)
    # grep: 0 matches found, 1 none, 2 trouble; 141 is SIGPIPE from `head` once enough were found
    if code not in (0, 1, 141) and not matches:
        return ToolResult.error(stderr or f"grep failed (exit code {code})")
    if not matches:
        return ToolResult(content=f"no lines match {pattern!r} under {path}")
    text = "\n".join(matches)
    if more:
        text += f"\n[more than {max_results} matching lines; narrow the pattern, path or include]"
    return ToolResult(content=text, metadata={"matches": len(matches), "more": more})


def builtin_tools() -> list[Tool]:
    """The built-in tools in the order the model sees them."""
    return [bash, python, read_file, write_file, edit_file, list_dir, find, grep]
