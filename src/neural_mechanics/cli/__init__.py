"""`nmech`: the command line. Thin by design: every command is one library call plus printing.

Commands: `symmetries` (find, certify, print or export the groups of a model), `check` (gradient and
Hessian constraints against random baselines), `train` (a config-driven run with the tracker, on built-in data or
yours: image folders, dataset factories, token files), `report` (one HTML file from a run directory), `demo` (the
embedded default, end to end), `presets` and `configs` (what a MODEL or CONFIG argument can name); `groups`,
`balance`, `equalize`, `distance` and `completeness` put the certified symmetries to work (neural_mechanics.uses).
User errors (`NMechError`) print what happened and what to do, and exit with status 2; anything else is a bug and
keeps its traceback.

Layout: `app` (the typer app, consoles, entry point), `options` (shared options), one module per command family
(`analyse`, `runs`, `uses`), each registering its commands on import.
"""

from __future__ import annotations

from . import analyse, runs, uses  # noqa: F401  (importing registers the commands on `app`)
from .app import app, console, err_console, main

__all__ = ["app", "console", "err_console", "main"]
