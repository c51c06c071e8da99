"""A stage run as a submitit job: every task of the job is one rank of the run.

The time-limit warning (submitit's ``--signal=USR2@...``) reaches every task. During training the loop's own
handler takes it: the ranks save at the next step boundary, and rank 0 then hands the signal to submitit's
handler, which calls :meth:`StageJob.checkpoint` and requeues the job; the requeued job resumes (``resume=auto``
is among its overrides). SIGTERM (preemption, ``scontrol requeue``) also saves; SLURM decides what follows it.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Sequence

from adala.engine.preemption import REQUEUE_EXIT_CODE, Preempted
from adala.launch.slurm import node_address
from adala.launch.slurm_job import rendezvous_port


class StageJob:
    def __init__(self, overrides: Sequence[str]) -> None:
        self.overrides = list(overrides)

    def __call__(self) -> dict[str, Any]:
        import submitit

        from adala.config import compose
        from adala.logs import configure_logging
        from adala.run import run_stage

        configure_logging()
        env = submitit.JobEnvironment()
        os.environ.update(
            RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
            LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes), MASTER_ADDR=node_address(env.hostnames[0]),
            MASTER_PORT=str(rendezvous_port(str(env.job_id))),
        )
        try:
            result = run_stage(compose(self.overrides))
        except Preempted as stop:
            if stop.signum == submitit.JobEnvironment._usr_sig():
                signal.raise_signal(stop.signum)  # submitit's handler: checkpoint() and requeue (on rank 0)
            raise SystemExit(REQUEUE_EXIT_CODE) from None
        return {"export": str(result.export), "steps": result.steps, "metrics": result.metrics}

    def checkpoint(self) -> Any:
        """Called by submitit before it requeues the job: run the same stage again; it resumes from its checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.overrides))
