"""The built-in tools, run through the Sandbox protocol on LocalSandbox and (marked docker) DockerSandbox."""
from __future__ import annotations

import os
import time

import anyio
import pytest

from tools import ToolContext, Toolset, builtin_tools

BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=BACKENDS)
async def ctx(request, tmp_path):
    if request.param == "local":
        from sandboxes import LocalSandbox

        async with LocalSandbox(tmp_path / "ws") as sandbox:
            yield ToolContext(sandbox=sandbox, run_id="t")  # workspace: taken from LocalSandbox.workspace
    else:
        from sandboxes import DockerSandbox
        from sandboxes.container import WORKSPACE

        try:
            sandbox = DockerSandbox()  # workspace: the container's own tmpfs
            await sandbox.__aenter__()
        except Exception as exc:  # no engine here, or no sandbox image built
            pytest.skip(f"no Docker sandbox here: {exc}")
        try:
            yield ToolContext(sandbox=sandbox, workspace=WORKSPACE, run_id="t")
        finally:
            await sandbox.__aexit__(None, None, None)


@pytest.fixture
def tools():
    return Toolset(builtin_tools())


pytestmark = pytest.mark.anyio


async def test_builtin_names_and_schemas(tools):
    assert tools.names == ["bash", "python", "read_file", "write_file", "edit_file", "list_dir", "find", "grep"]
    for schema in tools.openai_schemas():
        params = schema["function"]["parameters"]
        assert "ctx" not in params["properties"] and schema["function"]["description"]
    assert [t.name for t in tools if t.parallel_safe] == ["read_file", "list_dir", "find", "grep"]


def test_bash_schema_offers_background(tools):
    [bash_schema] = [s["function"] for s in tools.openai_schemas() if s["function"]["name"] == "bash"]
    background = bash_schema["parameters"]["properties"]["background"]
    assert background["type"] == "boolean" and background["default"] is False
    assert "background" not in bash_schema["parameters"]["required"]
    words = " ".join(background["description"].split())
    assert "return at once (for servers)" in words and "log file" in words
    assert "processes started without it are ended when the command returns" in words.lower()


async def _process_state(tools, ctx, pid: int) -> str:
    """ps's state letter of `pid` in the sandbox, "" once it is gone ("Z": killed, not yet reaped)."""
    shown = await tools.invoke("bash", {"command": f"ps -o stat= -p {pid} || true"}, ctx)
    return shown.content.removesuffix("[exit code 0]").strip()[:1]


async def test_bash_background_keeps_a_server_and_ends_other_leftovers(tools, ctx):
    left = await tools.invoke("bash", {"command": "sleep 300 & echo $!"}, ctx)
    assert await _process_state(tools, ctx, int(left.content.split()[0])) in ("", "Z")
    started = await tools.invoke("bash", {"command": "cd / && while :; do echo tick; sleep 0.1; done",
                                          "background": True}, ctx)
    assert not started.is_error and started.content.startswith("[started in the background as process ")
    log, pid = started.metadata["log_path"], started.metadata["background_pid"]
    assert log in started.content
    deadline = time.monotonic() + 30
    while (await tools.invoke("bash", {"command": f"grep -c tick {log}"}, ctx)).content.split()[0] in ("0", "1"):
        assert time.monotonic() < deadline, "the background command wrote nothing to its log"
        await anyio.sleep(0.1)
    assert await _process_state(tools, ctx, pid) not in ("", "Z"), "the background command was ended"
    # it ran in the session's state, but its `cd` is not the session's
    here = await tools.invoke("bash", {"command": "pwd"}, ctx)
    assert here.content.splitlines()[0] != "/"


async def test_bash_is_a_persistent_shell(tools, ctx):
    first = await tools.invoke("bash", {"command": "mkdir -p deep/er && cd deep/er && export GREETING=hello"}, ctx)
    assert not first.is_error and first.content.endswith("[exit code 0]")
    second = await tools.invoke("bash", {"command": 'echo "$GREETING from $(basename "$PWD")"'}, ctx)
    assert second.content == "hello from er\n[exit code 0]"
    failed = await tools.invoke("bash", {"command": "echo oops >&2; exit 7"}, ctx)
    assert failed.is_error and failed.metadata["exit_code"] == 7
    assert failed.content == "[stderr]\noops\n[exit code 7]"


async def test_bash_timeout_kills_the_command(tools, ctx):
    result = await tools.invoke("bash", {"command": "sleep 30", "timeout": 0.5}, ctx)
    assert result.is_error and result.metadata["timed_out"]
    assert "[timed out after 0.5 s" in result.content
    assert (await tools.invoke("bash", {"command": "echo alive"}, ctx)).content == "alive\n[exit code 0]"
    bad = await tools.invoke("bash", {"command": "true", "timeout": -1}, ctx)
    assert bad.is_error and "parameter 'timeout'" in bad.content


async def test_bash_output_keeps_head_and_tail_and_states_the_elision(tools, ctx):
    result = await tools.invoke("bash", {"command": "seq 1 200000"}, ctx)
    assert result.content.startswith("1\n2\n3\n")
    assert result.content.endswith("199999\n200000\n[exit code 0]")
    assert "elided" in result.content and len(result.content.encode()) <= tools["bash"].max_output_bytes


async def test_python_runs_in_the_sandbox(tools, ctx):
    code = "import os, sys\nprint(sum(range(10)), sys.version_info[0])\nprint(os.path.exists('made_by_bash'))"
    await tools.invoke("bash", {"command": "touch made_by_bash"}, ctx)
    result = await tools.invoke("python", {"code": code}, ctx)
    assert result.content == "45 3\nTrue\n[exit code 0]"
    crash = await tools.invoke("python", {"code": "raise ValueError('nope')"}, ctx)
    assert crash.is_error and "ValueError: nope" in crash.content and crash.metadata["exit_code"] == 1
    quoting = await tools.invoke("python", {"code": "print('it''s', \"$HOME\", '`x`')"}, ctx)
    assert quoting.content.startswith("its $HOME `x`")


async def test_write_then_read_with_line_ranges(tools, ctx):
    body = "".join(f"line {i}\n" for i in range(1, 31))
    wrote = await tools.invoke("write_file", {"path": "notes/a.txt", "content": body}, ctx)
    assert wrote.content == f"wrote {len(body)} bytes to notes/a.txt"
    assert await ctx.sandbox.read_file("notes/a.txt") == body.encode()
    shown = await tools.invoke("bash", {"command": "wc -l < notes/a.txt"}, ctx)
    assert shown.content.startswith("30")  # the shell sees what the file API wrote
    part = await tools.invoke("read_file", {"path": "notes/a.txt", "start_line": 9, "end_line": 11}, ctx)
    assert part.content == " 9\tline 9\n10\tline 10\n11\tline 11\n[lines 9-11 of 30]"
    whole = await tools.invoke("read_file", {"path": "notes/a.txt"}, ctx)
    assert whole.content.splitlines()[-1] == "30\tline 30" and whole.metadata["total_lines"] == 30
    past = await tools.invoke("read_file", {"path": "notes/a.txt", "start_line": 31}, ctx)
    assert past.is_error and "has 30 lines" in past.content


async def test_read_file_errors(tools, ctx):
    missing = await tools.invoke("read_file", {"path": "absent.txt"}, ctx)
    assert missing.is_error and "absent.txt" in missing.content
    await ctx.sandbox.write_file("blob.bin", bytes(range(256)))
    binary = await tools.invoke("read_file", {"path": "blob.bin"}, ctx)
    assert binary.is_error and "binary file (256 bytes)" in binary.content
    escape = await tools.invoke("read_file", {"path": "../../etc/passwd"}, ctx)
    assert escape.is_error and "outside the workspace" in escape.content
    await ctx.sandbox.write_file("empty.txt", b"")
    assert (await tools.invoke("read_file", {"path": "empty.txt"}, ctx)).content == "(empty.txt is empty)"


async def test_edit_file_needs_exactly_one_match(tools, ctx):
    await ctx.sandbox.write_file("m.py", "def f():\n    return 1\n\n\ndef g():\n    return 1\n")
    none = await tools.invoke("edit_file", {"path": "m.py", "old_string": "return 9", "new_string": "x"}, ctx)
    assert none.is_error and "0 matches" in none.content
    two = await tools.invoke("edit_file", {"path": "m.py", "old_string": "return 1", "new_string": "return 2"}, ctx)
    assert two.is_error and "matches 2 times" in two.content
    assert await ctx.sandbox.read_file("m.py") == b"def f():\n    return 1\n\n\ndef g():\n    return 1\n"
    one = await tools.invoke(
        "edit_file", {"path": "m.py", "old_string": "def g():\n    return 1", "new_string": "def g():\n    return 3"}, ctx
    )
    assert not one.is_error and "replaced 1 occurrence(s)" in one.content and "6\t    return 3" in one.content
    every = await tools.invoke(
        "edit_file", {"path": "m.py", "old_string": "def ", "new_string": "async def ", "replace_all": True}, ctx
    )
    assert every.metadata["replacements"] == 2
    assert await ctx.sandbox.read_file("m.py") == b"async def f():\n    return 1\n\n\nasync def g():\n    return 3\n"
    empty = await tools.invoke("edit_file", {"path": "m.py", "old_string": "", "new_string": "x"}, ctx)
    assert empty.is_error and "write_file" in empty.content


async def _make_tree(ctx):
    for path, text in {
        "src/app.py": "import os\nTODO = 1\n",
        "src/util.py": "def helper():\n    return 'todo later'\n",
        "docs/readme.md": "# Todo\n",
        ".git/config": "TODO in git internals\n",
    }.items():
        await ctx.sandbox.write_file(path, text)


async def test_list_dir_find_grep(tools, ctx):
    await _make_tree(ctx)
    # a cd in the session must not move the search tools, and they must not move the session
    await tools.invoke("bash", {"command": "cd docs"}, ctx)
    listing = await tools.invoke("list_dir", {}, ctx)
    assert listing.content.splitlines() == [".git/", "docs/", "src/"]
    assert (await tools.invoke("list_dir", {"path": "src"}, ctx)).content == "app.py\nutil.py"
    missing = await tools.invoke("list_dir", {"path": "nope"}, ctx)
    assert missing.is_error and "nope" in missing.content

    found = await tools.invoke("find", {"pattern": "*.py"}, ctx)
    assert found.content == "./src/app.py\n./src/util.py"
    dirs = await tools.invoke("find", {"pattern": "*", "kind": "dir"}, ctx)
    assert dirs.content == "./docs\n./src"  # .git is skipped
    capped = await tools.invoke("find", {"pattern": "*", "kind": "file", "max_results": 1}, ctx)
    assert capped.content.startswith("./docs/readme.md\n[more than 1 matches") and capped.metadata["more"]
    nothing = await tools.invoke("find", {"pattern": "*.rs"}, ctx)
    assert not nothing.is_error and "no names match" in nothing.content

    hits = await tools.invoke("grep", {"pattern": "todo", "ignore_case": True, "include": "*.py"}, ctx)
    assert sorted(hits.content.splitlines()) == ["./src/app.py:2:TODO = 1", "./src/util.py:2:    return 'todo later'"]
    one = await tools.invoke("grep", {"pattern": "t[o]do", "max_results": 1, "ignore_case": True}, ctx)
    assert one.metadata["more"] and "[more than 1 matching lines" in one.content
    none = await tools.invoke("grep", {"pattern": "no-such-text"}, ctx)
    assert not none.is_error and "no lines match" in none.content
    broken = await tools.invoke("grep", {"pattern": "("}, ctx)
    assert broken.is_error and "grep" in broken.content
    assert (await tools.invoke("bash", {"command": "basename $PWD"}, ctx)).content == "docs\n[exit code 0]"


async def test_builtins_refuse_to_run_without_a_sandbox(tools):
    result = await tools.invoke("bash", {"command": "echo hi"}, ToolContext())
    assert result.is_error and "no sandbox" in result.content
    host_marker = "/tmp/dsv4_tools_must_not_exist"
    await tools.invoke("write_file", {"path": host_marker, "content": "x"}, ToolContext())
    assert not os.path.exists(host_marker)


@pytest.mark.docker
@pytest.mark.parametrize("ctx", ["docker"], indirect=True)
async def test_docker_builtins_run_inside_the_container(tools, ctx):
    import socket

    where = await tools.invoke("python", {"code": "import os, socket; print(socket.gethostname(), os.getuid(), os.getcwd())"}, ctx)
    hostname, uid, cwd = where.content.split("\n")[0].split()
    assert hostname != socket.gethostname() and uid != "0" and cwd == "/workspace"
    await tools.invoke("write_file", {"path": "only_in_container.txt", "content": "x"}, ctx)
    found = await tools.invoke("find", {"pattern": "only_in_container.txt"}, ctx)
    assert found.content == "./only_in_container.txt"
    assert not os.path.exists("/workspace/only_in_container.txt")
