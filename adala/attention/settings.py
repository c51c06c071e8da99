"""Checks for plug settings, so a bad value stops when the plug is built, with the setting named."""
from __future__ import annotations

from typing import Any


def positive_int(plug: str, setting: str, value: Any, *, optional: bool = False) -> None:
    """ValueError unless ``value`` is an int ≥ 1 (or None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer" + (" or null" if optional else "")
        raise ValueError(f"attention {plug!r}: setting {setting} must be {allowed}, got {value!r}")
