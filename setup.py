"""The package list, which pyproject.toml cannot extend: every ``adala`` package, plus the top-level ``conf/``
(Hydra configs) and ``slurm/`` (sbatch scripts) mapped into the wheel as ``adala/conf`` and ``adala/slurm``. The
repository keeps one copy of each, at the top level; :mod:`adala.paths` finds them in either place."""
from setuptools import find_namespace_packages, find_packages, setup

BUNDLED = {"adala.conf": "conf", "adala.slurm": "slurm"}  # package -> directory of the checkout


def bundled(package: str, directory: str) -> list[str]:
    """``package`` and one package per subdirectory (``adala.conf.model`` for ``conf/model``), so that setuptools
    knows every directory it copies."""
    found = find_namespace_packages(include=[directory, f"{directory}.*"])
    return [package + name[len(directory):] for name in found]


setup(
    packages=[*find_packages(include=["adala", "adala.*"]),
              *(name for package, directory in BUNDLED.items() for name in bundled(package, directory))],
    package_dir=BUNDLED,
)
