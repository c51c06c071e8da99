"""Talking to the SLURM cluster the launcher tests run on (``scripts/local_slurm.sh up`` starts one)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from adala.launch.slurm import job_state

REPO = Path(__file__).resolve().parents[1]


def require_cluster(nodes: int = 1) -> None:
    """Skip unless a SLURM controller answers and ``nodes`` nodes are up (fail instead with ADALA_REQUIRE_SLURM=1)."""
    missing = pytest.fail if os.environ.get("ADALA_REQUIRE_SLURM") == "1" else pytest.skip
    start = f"`bash scripts/local_slurm.sh up --nodes {max(nodes, 2)}` (as root)"
    if shutil.which("sinfo") is None:
        missing(f"no SLURM here; start a local cluster with {start}")
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    up = {line.split()[0] for line in out.stdout.splitlines() if line.split()[-1] in {"idle", "mix", "alloc"}}
    if out.returncode != 0 or not up:
        missing(f"the SLURM cluster does not answer or has no node up: {out.stderr.strip() or out.stdout.strip()}")
    if len(up) < nodes:
        missing(f"the SLURM cluster has {len(up)} node(s) up and this test needs {nodes}; start one with {start}")


def job_env() -> dict[str, str]:
    """What a job needs to run this checkout: sbatch passes the submitting environment on."""
    return {**os.environ, "ADALA_PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def wait_done(job_id: str, timeout: float) -> dict[str, str]:
    """Wait until the job has ended; returns its last ``scontrol`` record."""
    wait_for(lambda: job_state(job_id).get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"},
             timeout, f"job {job_id} to end")
    return job_state(job_id)
