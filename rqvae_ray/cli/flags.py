"""Typer options shown as plain flags in ``--help``: typer labels every boolean option ``<bool>`` (its own ``--help``
too), as if it took a value, and ``--force true`` then reads as a flag and a model ID ``true``."""

from __future__ import annotations

from typing import Annotated

import typer


def flag(name: str, help: str):  # noqa: A002 - typer's own parameter name
    """A boolean option shown as a plain flag (no value) in --help."""
    return typer.Option(name, help=help, metavar="")


def _show_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help())
        raise typer.Exit()


# For a command made with ``add_help_option=False``: ``_help: HelpFlag = False``.
HelpFlag = Annotated[
    bool,
    typer.Option(
        "--help",
        help="Show this message and exit.",
        metavar="",
        is_eager=True,
        expose_value=False,
        callback=_show_help,
    ),
]
