"""dsv4-agent command line (typer)."""
import typer

app = typer.Typer(help="Run DeepSeek-V4 as a tool-using agent on your own GPUs.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as _v

    typer.echo(_v("dsv4-agent"))
