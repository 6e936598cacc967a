"""Where tools run: the `Sandbox` protocol, `LocalSandbox` (host, trusted) and `DockerSandbox` (hardened)."""
from sandboxes.base import CommandResult, Sandbox
from sandboxes.container import DockerSandbox, SandboxError
from sandboxes.image import DEFAULT_IMAGE, ImageError
from sandboxes.local import LocalSandbox
from sandboxes.paths import WorkspaceEscapeError

__all__ = [
    "CommandResult", "Sandbox", "LocalSandbox", "DockerSandbox", "SandboxError", "ImageError",
    "WorkspaceEscapeError", "DEFAULT_IMAGE",
]
