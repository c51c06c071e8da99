"""The body of ``slurm/stage*.sh``, run by the batch script on the job's first node.

1. Validate the stage's config for this job's world size; bad input ends the job with exit code 2 before any
   process starts.
2. ``srun`` one ``torchrun`` per node, with a c10d rendezvous at the first node's address (its ``NodeAddr``; node
   names need not resolve), running ``python -m adala stage=... resume=auto <overrides>`` (``ADALA_ENTRY``: a
   Python file of your own to run instead, one that calls ``adala.run.run_stage``, e.g. with a data stream of
   yours); a requeued job therefore continues from its latest complete checkpoint.
3. The time-limit warning (``#SBATCH --signal=B:USR2@...``, sent to this process only) is forwarded to every
   rank, which saves at the next step boundary and exits; the job then requeues itself. SIGTERM (``scontrol
   requeue``, preemption, ``scancel``) reaches the ranks from SLURM directly and SLURM decides what follows, so
   it is only noted here. SIGUSR1 is never used: NCCL reserves it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import Optional, Sequence

from adala.errors import UserError
from adala.launch.slurm import node_address
from adala.logs import configure_logging

log = logging.getLogger("adala.slurm")

WARNING_SIGNAL = signal.SIGUSR2
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"  # torchrun forwards these to its workers


def rendezvous_port(job_id: str) -> int:
    """A port per job, so two jobs sharing a first node do not collide (``ADALA_RDZV_PORT`` overrides it)."""
    return int(os.environ.get("ADALA_RDZV_PORT") or 29500 + int(job_id.split("_")[0]) % 20000)


def first_node(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()[0]


def entry() -> list[str]:
    """What every rank runs: ``-m adala``, or the Python file ``ADALA_ENTRY`` names."""
    script = os.environ.get("ADALA_ENTRY")
    if not script:
        return ["-m", "adala"]
    if not os.path.isfile(script):
        raise UserError(f"ADALA_ENTRY={script}: no such file; name a Python file that calls adala.run.run_stage, "
                        "or unset ADALA_ENTRY to run python -m adala")
    return [os.path.abspath(script)]


def torchrun_command(program: Sequence[str], args: Sequence[str], *, nodes: int, procs_per_node: int, head: str,
                     job_id: str) -> list[str]:
    return [
        "srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--nproc-per-node={procs_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{rendezvous_port(job_id)}", f"--rdzv-id={job_id}",
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        # Let the ranks finish their preemption checkpoint; SLURM's KillWait still bounds it.
        f"--shutdown-timeout={os.environ.get('ADALA_SHUTDOWN_TIMEOUT', '600')}",
        *program, *args,
    ]


class SignalForwarder:
    """Forwards the time-limit warning to every rank of the job and remembers to requeue."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.requeue = False

    def install(self) -> None:
        signal.signal(WARNING_SIGNAL, self._warning)
        signal.signal(signal.SIGTERM, self._terminate)

    def _warning(self, signum: int, frame: Optional[FrameType]) -> None:
        if not self.requeue:
            log.warning("time limit close: asking every rank to save, then requeueing job %s", self.job_id)
        self.requeue = True
        # Without --batch/--full, scancel signals the job's steps (torchrun and its workers on every node).
        subprocess.run(["scancel", f"--signal={WARNING_SIGNAL.name[3:]}", self.job_id], check=False)

    def _terminate(self, signum: int, frame: Optional[FrameType]) -> None:
        log.warning("SIGTERM: the ranks save at the next step boundary; SLURM requeues or ends the job")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    job_id = os.environ.get("SLURM_JOB_ID")
    if not args or job_id is None:
        print("usage: sbatch slurm/stage<N>.sh [overrides ...]   (python -m adala.launch.slurm_job STAGE [overrides])",
              file=sys.stderr)
        return 2
    forwarder = SignalForwarder(job_id)
    forwarder.install()  # first: the time-limit warning must not kill this script, whenever it comes
    stage, overrides = args[0], args[1:]  # the script's stage, unless the user names another (stage3.sh: seg)
    chosen = [] if any(o.startswith("stage=") for o in overrides) else [f"stage={stage}"]
    run_args = [*chosen, "resume=auto", *overrides]
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    procs_per_node = int(os.environ.get("ADALA_NPROC_PER_NODE") or os.environ.get("SLURM_GPUS_ON_NODE") or 1)
    try:
        from adala.config import compose
        from adala.run import validate

        cfg = validate(compose(run_args), world_size=nodes * procs_per_node)
        program = entry()
    except UserError as err:
        print(f"adala: error: {err}", file=sys.stderr)
        return 2
    head = node_address(first_node(os.environ["SLURM_JOB_NODELIST"]))
    log.info("job %s (restart %s): %s on %d node(s) x %d process(es), rendezvous at %s:%d, run_dir %s", job_id,
             os.environ.get("SLURM_RESTART_COUNT", "0"), stage, nodes, procs_per_node, head, rendezvous_port(job_id),
             cfg.run_dir)
    command = torchrun_command(program, run_args, nodes=nodes, procs_per_node=procs_per_node, head=head, job_id=job_id)
    code = 0 if forwarder.requeue else subprocess.Popen(command).wait()  # a warning may come before the ranks start
    if forwarder.requeue:
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        log.info("job %s requeued; it resumes from %s/checkpoints", job_id, cfg.run_dir)
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
