"""`package.module:attr` strings: the one way a user's model factory or dataset factory is imported.

`import_object("mypkg.models:build")` imports `mypkg.models` and follows the attribute path (dotted paths such as
`pkg.mod:Outer.build` work). The current directory is searched first, as `python -m` does: `nmech` run as a
console script would otherwise not see a package that sits in the directory it is run from (its `sys.path[0]` is
the script's own directory), while `python -m neural_mechanics.cli` would. `import_object` puts the current
directory at the front of `sys.path` (once; it stays there, since a package imported from it may import its own
modules later), so both ways of running `nmech` import the same module.

Errors are raised as the caller's `NMechError` subclass (ModelSpecError for models, ConfigError for datasets),
with what to do.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from neural_mechanics.errors import NMechError


def split_spec(spec: str, error: type[NMechError], what: str) -> tuple[str, str]:
    """`"pkg.mod:attr.path"` -> ("pkg.mod", "attr.path"); `error` when either part is missing."""
    module_name, _, attr_path = spec.strip().partition(":")
    if not module_name or not attr_path:
        raise error(f"{what} {spec!r} is not of the form package.module:factory",
                    "write e.g. mypkg.models:build_net (a module you can import, a colon, a name defined in it)")
    return module_name, attr_path


def _current_directory_first() -> None:
    """Put the current directory first on sys.path, as `python -m` does (a no-op when it already is on it)."""
    cwd = os.getcwd()
    if "" in sys.path or cwd in sys.path or os.path.realpath(cwd) in map(os.path.realpath, sys.path):
        return
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()


def import_object(spec: str, error: type[NMechError], what: str = "spec") -> Any:
    """The object `spec` ("package.module:attr.path") names, imported with the current directory searched first.

    `error` (an NMechError subclass) is raised for a malformed spec, a module that cannot be imported (with its
    ImportError) and a missing attribute (with close matches); `what` names the spec in those messages.
    """
    module_name, attr_path = split_spec(spec, error, what)
    _current_directory_first()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(
            f"cannot import module {module_name!r} (from {what} {spec!r}): {exc}",
            f"check the spelling; the module must be importable from the current directory ({os.getcwd()}), "
            "installed (`pip install -e .` in its project), or on PYTHONPATH",
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise error(
                f"{module_name} has no attribute {attr_path!r} (missing {part!r})",
                f"{hint}name a function or class defined in {module_name}",
            )
        obj = getattr(obj, part)
    return obj


def accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` can be called with keyword argument `name` (a parameter of that name, or **kwargs); False when
    its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
