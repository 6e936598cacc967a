"""The default sandbox image, built offline: debootstrap a minimal Debian, then `docker import` it.

No image registry is reachable from our machines, so nothing is pulled. The root filesystem comes from
the Debian apt mirror (bookworm, minbase variant: bash, coreutils, grep, findutils, sed, ...) plus python3
and procps; a user `sandbox` (uid 1000) and /workspace are added; the tarball is cached so a later build
after `docker rmi` only re-imports it. `--if-missing` returns at once when the tag exists. Builds sharing a
cache folder (two `scripts/setup.sh` at once) take turns on a lock file: the second finds the first's
tarball (and image) and does not build again.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import docker
import docker.errors

IMAGE_REPOSITORY = "dsv4-agent/sandbox"
IMAGE_VERSION = "1"  # bump when the recipe below changes: the tag names the recipe
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_VERSION}"
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
EXTRA_PACKAGES = ["python3", "procps", "ca-certificates"]
SANDBOX_UID = 1000
# Written into the image's config by `docker import --change`.
IMAGE_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "WORKDIR /workspace",
    'CMD ["/bin/bash"]',
    f"LABEL dsv4.image.recipe={IMAGE_VERSION}",
]


class ImageError(RuntimeError):
    """The sandbox image is missing or could not be built; the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsv4-agent" / "sandbox"


def image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def require_image(client: docker.DockerClient, tag: str) -> None:
    """A clear error for an absent image, saying how to get the default one."""
    if not image_exists(client, tag):
        hint = ("build it with `dsv4-agent sandbox build`" if tag == DEFAULT_IMAGE else
                f"load or build it locally (no registry is used), or use the default image {DEFAULT_IMAGE} "
                "made by `dsv4-agent sandbox build`")
        raise ImageError(f"sandbox image {tag!r} is not in the local Docker engine: {hint}")


def build_image(tag: str = DEFAULT_IMAGE, if_missing: bool = False, mirror: str | None = None,
                log: Callable[[str], None] = print) -> str:
    """Build (or re-import from the cache) the default image under `tag`; returns the image id."""
    client = docker.from_env()
    if if_missing and image_exists(client, tag):
        log(f"{tag} is present")
        return client.images.get(tag).id
    with _one_build_at_a_time(log):
        if if_missing and image_exists(client, tag):  # made by the build we waited for
            log(f"{tag} is present")
            return client.images.get(tag).id
        tarball = cache_dir() / f"rootfs-{DEBIAN_SUITE}-{IMAGE_VERSION}.tar"
        if not tarball.exists():
            _build_rootfs_tarball(tarball, mirror or os.environ.get("DSV4_DEBIAN_MIRROR", DEFAULT_MIRROR), log)
        else:
            log(f"using the cached root filesystem {tarball}")
        repository, version = _split_tag(tag)
        log(f"importing {tarball.name} as {repository}:{version}")
        client.api.import_image(src=str(tarball), repository=repository, tag=version, changes=IMAGE_CHANGES)
    image = client.images.get(f"{repository}:{version}")
    log(f"built {repository}:{version} ({image.short_id}, {image.attrs['Size'] / 2**20:.0f} MiB)")
    return image.id


@contextlib.contextmanager
def _one_build_at_a_time(log: Callable[[str], None]) -> Iterator[None]:
    """An exclusive lock on the cache folder's lock file; the kernel drops it if the holder dies."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another sandbox image build is running (lock {lock.name}); waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _split_tag(tag: str) -> tuple[str, str]:
    """"repo/name:version" -> ("repo/name", "version"); no version means "latest", as docker reads it."""
    name, sep, version = tag.rpartition(":")
    if not sep or "/" in version:  # the colon was a registry port, not a tag
        return tag, "latest"
    return name, version


def _build_rootfs_tarball(tarball: Path, mirror: str, log: Callable[[str], None]) -> None:
    debootstrap = _find_debootstrap(log)
    (tarball.parent / "debs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dsv4-rootfs-", dir=tarball.parent) as work:
        rootfs = Path(work) / "rootfs"
        log(f"debootstrap {DEBIAN_SUITE} (minbase + {', '.join(EXTRA_PACKAGES)}) from {mirror}: a few minutes")
        _check(
            [debootstrap, "--variant=minbase", f"--include={','.join(EXTRA_PACKAGES)}",
             f"--cache-dir={tarball.parent / 'debs'}", DEBIAN_SUITE, str(rootfs), mirror],
            "debootstrap failed (is the mirror reachable? set DSV4_DEBIAN_MIRROR to another one)",
        )
        _add_sandbox_user(rootfs)
        _slim(rootfs)
        # A name of its own, renamed into place at once: no other build writes to it, and an interrupted
        # build never leaves a half tarball in the cache (the work folder, its parent, goes with it).
        partial = Path(work) / tarball.name
        _check(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."],
               "packing the root filesystem failed")
        os.replace(partial, tarball)


def _find_debootstrap(log: Callable[[str], None]) -> str:
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ImageError("debootstrap is missing: install it (apt-get install debootstrap) and run the build again")
    log("installing debootstrap with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _check(["apt-get", "update", "-qq"], "apt-get update failed", env=env)
    _check(["apt-get", "install", "-y", "-qq", "debootstrap"], "apt-get install debootstrap failed", env=env)
    found = shutil.which("debootstrap", path="/usr/sbin:/sbin:/usr/bin")
    if not found:
        raise ImageError("apt-get installed debootstrap, but it is not on /usr/sbin, /sbin or /usr/bin")
    return found


def _add_sandbox_user(rootfs: Path) -> None:
    """`sandbox` (uid/gid 1000, home /workspace): the identity commands run as."""
    with open(rootfs / "etc/passwd", "a") as f:
        f.write(f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/workspace:/bin/bash\n")
    with open(rootfs / "etc/group", "a") as f:
        f.write(f"sandbox:x:{SANDBOX_UID}:\n")
    with open(rootfs / "etc/shadow", "a") as f:
        f.write("sandbox:!:19000:0:99999:7:::\n")
    workspace = rootfs / "workspace"
    workspace.mkdir(mode=0o755, exist_ok=True)
    os.chown(workspace, SANDBOX_UID, SANDBOX_UID)


def _slim(rootfs: Path) -> None:
    """Drop what a sandbox never reads: package caches, apt lists, docs, man pages, locales."""
    for sub in ["var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                "usr/share/info", "usr/share/locale"]:
        folder = rootfs / sub
        if folder.is_dir():
            for child in folder.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name != "lock":
                    child.unlink()


def _check(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ImageError(f"{what} (exit {proc.returncode}):\n{tail}")
