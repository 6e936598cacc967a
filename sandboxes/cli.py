"""`dsv4-agent sandbox build|ls|gc`: the image and the containers, from the command line.

Mounted by agent/cli.py as `app.add_typer(sandbox_app, name="sandbox")`; also `python -m sandboxes.cli`.
Exit codes: 0 done, 5 sandbox error (no engine, build failed), as in the project's CLI conventions.
"""
from __future__ import annotations

import json

import docker
import docker.errors
import typer
from rich.console import Console
from rich.table import Table

from sandboxes.image import DEFAULT_IMAGE, ImageError, build_image
from sandboxes.owner import list_sandboxes, reap

SANDBOX_ERROR = 5
sandbox_app = typer.Typer(help="Docker sandboxes: build the offline image, list and reap containers.",
                          no_args_is_help=True)
console = Console(stderr=True)


def _client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as exc:
        console.print(f"[red]no Docker engine reachable:[/] {exc}\n"
                      "start dockerd (scripts/setup.sh does) or set DOCKER_HOST")
        raise typer.Exit(SANDBOX_ERROR) from exc


@sandbox_app.command()
def build(
    if_missing: bool = typer.Option(False, "--if-missing", help="do nothing when the tag already exists"),
    tag: str = typer.Option(DEFAULT_IMAGE, "--tag", help="name of the image to make"),
    mirror: str = typer.Option(None, "--mirror", help="Debian mirror (default: $DSV4_DEBIAN_MIRROR or deb.debian.org)"),
) -> None:
    """Build the default sandbox image offline (debootstrap a minimal Debian, docker import); cached."""
    _client()
    try:
        build_image(tag=tag, if_missing=if_missing, mirror=mirror, log=console.print)
    except ImageError as exc:
        console.print(f"[red]sandbox image build failed:[/] {exc}")
        raise typer.Exit(SANDBOX_ERROR) from exc


@sandbox_app.command("ls")
def ls(as_json: bool = typer.Option(False, "--json", help="one JSON object per sandbox on stdout")) -> None:
    """List dsv4 sandbox containers with their owner and expiry."""
    infos = list_sandboxes(_client())
    if as_json:
        for info in infos:
            typer.echo(json.dumps(info.__dict__ | {"reap_reason": info.reap_reason()}))
        return
    table = Table("id", "name", "status", "owner", "owner state", "age", "expires in", "pooled", "image")
    for info in infos:
        table.add_row(info.id, info.name, info.status, info.owner, info.owner_state, f"{info.age_s:.0f}s",
                      f"{info.expires_in_s:.0f}s", "yes" if info.pooled else "", info.image)
    Console().print(table if infos else "no dsv4 sandboxes")


@sandbox_app.command()
def gc(everything: bool = typer.Option(False, "--all", help="remove every dsv4 sandbox, live owners too")) -> None:
    """Remove sandboxes whose owner process is gone, that expired, or that stopped."""
    reaped = reap(_client(), everything=everything)
    for info, reason in reaped:
        typer.echo(f"removed {info.id} {info.name} ({reason})")
    typer.echo(f"{len(reaped)} sandbox(es) removed")


if __name__ == "__main__":
    sandbox_app()
