"""Keep file IO inside the workspace: a path that leaves it is refused with an error that says so."""
from __future__ import annotations

import posixpath
from pathlib import Path


MAX_READ_BYTES = 256 * 2**20  # read_file refuses bigger files rather than pull them all into memory


def file_too_big(path: str) -> ValueError:
    return ValueError(f"{path!r} is larger than {MAX_READ_BYTES} bytes: read parts of it with a command "
                      "(head -c, tail -c, sed -n) instead")


class WorkspaceEscapeError(ValueError):
    """A file path points outside the sandbox workspace (by `..`, an absolute path or a symlink)."""


def _escape(path: str, resolved: str, workspace: str) -> WorkspaceEscapeError:
    return WorkspaceEscapeError(
        f"path {path!r} resolves to {resolved}, outside the workspace {workspace}: "
        "sandbox file IO only reaches the workspace (use a relative path or one under the workspace)"
    )


def host_path_in_workspace(workspace: Path, path: str) -> Path:
    """`path` (relative to the workspace, or absolute inside it) on the host, symlinks followed."""
    if not path or "\x00" in path:
        raise ValueError(f"invalid file path {path!r}")
    root = workspace.resolve()
    resolved = (root / path).resolve()  # `root / "/abs"` is "/abs": absolute paths are checked as they are
    if resolved != root and root not in resolved.parents:
        raise _escape(path, str(resolved), str(root))
    return resolved


def container_path_in_workspace(workspace: str, path: str) -> str:
    """`path` inside the container, normalised without following links (the container re-checks with realpath)."""
    if not path or "\x00" in path:
        raise ValueError(f"invalid file path {path!r}")
    resolved = posixpath.normpath(posixpath.join(workspace, path))
    if resolved != workspace and not resolved.startswith(workspace.rstrip("/") + "/"):
        raise _escape(path, resolved, workspace)
    return resolved
