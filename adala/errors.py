"""The one exception type for mistakes a user can fix, and the check for optional dependencies."""
from __future__ import annotations

import importlib.util


class UserError(Exception):
    """Bad input (config, paths, weights). The message says what is wrong and how to fix it."""


# Optional dependencies: module -> (what a user calls it, the pyproject extra that installs it).
EXTRAS = {
    "deepspeed": ("DeepSpeed", "deepspeed"),
    "submitit": ("submitit", "submitit"),
    "ray": ("Ray Train", "ray"),
    "transformers": ("transformers (its Mask2Former)", "seg"),
    "scipy": ("scipy (Mask2Former's matcher)", "seg"),
}


def require_extra(module: str, needed_by: str) -> None:
    """Raise a :class:`UserError` naming ``pip install 'adala[extra]'`` when the optional ``module`` is missing.

    It only looks the module up, without importing it (importing DeepSpeed is slow and fixes its accelerator
    from the environment), so call it where a run is checked, before any work starts.
    """
    if importlib.util.find_spec(module) is None:
        name, extra = EXTRAS[module]
        raise UserError(f"{needed_by} needs {name}: pip install 'adala[{extra}]'")
