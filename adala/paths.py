"""Where adala's own files are: the Hydra configs (``conf/``) and the sbatch scripts (``slurm/``).

A checkout keeps them at the top level of the repository; a wheel carries the same files inside the package
(``adala/conf``, ``adala/slurm``), mapped there at build time. Imports nothing heavy: ``adala.models`` reads
the model configs through it.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _bundled(name: str) -> Path:
    """``adala/<name>`` in an installed wheel, else ``<checkout>/<name>`` beside the package."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


def config_dir() -> Path:
    """The Hydra config directory (``ADALA_CONFIG_DIR`` overrides it)."""
    return Path(os.environ.get("ADALA_CONFIG_DIR") or _bundled("conf"))


def slurm_dir() -> Path:
    """The directory of the sbatch scripts ``stage1.sh``, ``stage2.sh`` and ``stage3.sh``."""
    return _bundled("slurm")
