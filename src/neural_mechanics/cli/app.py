"""The `nmech` application object, its console and the entry point that turns user errors into exit status 2."""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup, TyperOption

from ..errors import NMechError


def _no_flag_metavar(params: list[Any]) -> list[Any]:
    """A flag takes no value, so its help shows none (typer would print `<bool>` after every flag and --help)."""
    for p in params:
        if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_metavar(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_metavar(super().get_params(ctx))


app = typer.Typer(
    name="nmech",
    help=(
        "Neural mechanics for any PyTorch model: find its symmetries, check the constraints they put on "
        "gradients and Hessians, and track the conserved and broken charges during training next to exact "
        "and continuous-time predictions (Kunin et al., ICLR 2021)."
    ),
    no_args_is_help=True,
    add_completion=False,
    cls=_Group,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def main() -> None:
    """Console-script entry point: user errors become a message and exit status 2."""
    # torch's fake-tensor tracebacks in front of a clean capture error are silenced by capture itself, for the
    # capture only (symmetry.utils.quiet_logs), so library callers get it too and the loggers are restored.
    try:
        app()
    except NMechError as exc:
        # escaped: a message may hold brackets that are not markup (pip install 'neural-mechanics[hf]')
        err_console.print(f"[red]error:[/red] {escape(exc.what)}")
        if exc.fix:
            err_console.print(f"[cyan]what to do:[/cyan] {escape(exc.fix)}")
        sys.exit(2)
