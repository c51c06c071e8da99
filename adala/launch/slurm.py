"""What a SLURM cluster offers and what its jobs are doing, read with ``sinfo`` and ``scontrol``."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

from adala.errors import UserError

ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED"}


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int


def available() -> bool:
    return shutil.which("sinfo") is not None


def partition(name: Optional[str] = None) -> Partition:
    """The named partition, or the default one; its node count and the most CPUs and GPUs one node has."""
    out = _run(["sinfo", "-h", "-o", "%P|%D|%c|%G", *(["-p", name] if name else [])])
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    if not name:
        rows = [r for r in rows if r[0].endswith("*")] or rows
    if not rows:
        raise UserError(f"SLURM has no partition {name!r}; see sinfo for the partitions" if name
                        else "SLURM reports no partitions; check sinfo")
    return Partition(
        name=rows[0][0].rstrip("*"),
        nodes=sum(int(r[1]) for r in rows),
        cpus_per_node=max(int(r[2].rstrip("+")) for r in rows),
        gpus_per_node=max(_gpus(r[3]) for r in rows),
    )


def check_request(part: Partition, *, nodes: int, gpus_per_node: int, cpus_per_node: int) -> None:
    """Refuse a job shape the partition can never run (SLURM would queue it forever or reject it later)."""
    for what, asked, has in (("nodes", nodes, part.nodes), ("GPUs per node", gpus_per_node, part.gpus_per_node),
                             ("CPUs per node", cpus_per_node, part.cpus_per_node)):
        if asked > has:
            raise UserError(f"{asked} {what} requested, but partition {part.name!r} has {has}; "
                            f"ask for at most {has} or choose another partition (--partition)")


def job_state(job_id: str) -> dict[str, str]:
    """``scontrol show job`` fields (JobState, Reason, Dependency, ...); empty once SLURM has forgotten the job."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def node_address(name: str) -> str:
    """The address the other nodes of a job reach node ``name`` at: its ``NodeAddr`` in ``scontrol show node``.

    A node's name need not resolve (several nodes on one machine, clusters that name nodes apart from their
    hosts); its NodeAddr is what slurmctld itself connects to. Where SLURM does not report one, the name.
    """
    out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True)
    fields = dict(field.split("=", 1) for field in out.stdout.split() if "=" in field) if out.returncode == 0 else {}
    return fields.get("NodeAddr") or name


def _gpus(gres: str) -> int:
    counts = [int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)]
    return max(counts, default=0)


def _run(command: list[str]) -> str:
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"{' '.join(command)} failed: {out.stderr.strip()}; is the SLURM controller reachable?")
    return out.stdout
