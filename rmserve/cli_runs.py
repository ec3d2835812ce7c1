"""``rmserve runs``: read a server's run monitor (``list``) and draw a run's series (``plot``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rmserve.cli_support import fail as _fail

if TYPE_CHECKING:
    from rmserve_client import RewardClient

runs = typer.Typer(
    help="Read a server's run monitor: list its runs, plot one run's series.", no_args_is_help=True
)

UrlOption = Annotated[str, typer.Option(help="The server, e.g. http://127.0.0.1:8000.")]
KeyFileOption = Annotated[
    Path | None, typer.Option(help="A file holding the server's API key (keys never go on command lines).")
]


def _client(url: str, api_key_file: Path | None) -> RewardClient:
    """A client of the server (rmserve-client is imported here: the server package does not need it)."""
    if importlib.util.find_spec("rmserve_client") is None:
        raise _fail(
            ImportError("rmserve runs reads the server through rmserve-client: pip install ./clients")
        )
    from rmserve_client import RewardClient

    key = api_key_file.read_text().strip() if api_key_file is not None else None
    return RewardClient(url, api_key=key, max_retries=1, timeout=30)


@runs.command("list")
def list_runs(url: UrlOption, api_key_file: KeyFileOption = None) -> None:
    """The runs the server keeps, most recently seen first (JSON lines)."""
    client = _client(url, api_key_file)
    from rmserve_client import RewardClientError

    try:
        with client:
            lines = client.runs()
    except (RewardClientError, ValueError) as exc:
        raise _fail(exc) from None
    for line in lines:
        typer.echo(json.dumps(line))


@runs.command("plot")
def plot(
    run: Annotated[str, typer.Argument(help="The run's name.")],
    url: UrlOption,
    out: Annotated[Path, typer.Option(help="The PNG to write.")] = Path("run.png"),
    model: Annotated[list[str] | None, typer.Option(help="Draw only this model (repeat the flag).")] = None,
    save_json: Annotated[Path | None, typer.Option(help="Also write the series as JSON here.")] = None,
    api_key_file: KeyFileOption = None,
) -> None:
    """Draw a run's series: reward, disagreement, sigma, length correlation, saturation, length."""
    if importlib.util.find_spec("matplotlib") is None:
        raise _fail(ImportError("rmserve runs plot draws with matplotlib: pip install 'rmserve[lab]'"))
    from rmserve.runs_plot import plot_run

    client = _client(url, api_key_file)
    from rmserve_client import RewardClientError

    try:
        with client:
            series = client.run(run).model_dump()
        drawn = plot_run(series, out, model)
    except (RewardClientError, ValueError) as exc:
        raise _fail(exc) from None
    if save_json is not None:
        save_json.write_text(json.dumps(series, indent=1) + "\n")
    typer.echo(f"wrote {out} ({', '.join(drawn)})")
