#!/bin/bash
# Stage 2 (feature alignment against the frozen teacher) on SLURM: one torchrun per node, a rendezvous on the first node.
#
#   sbatch slurm/stage2.sh model=dinov2_l strategy=fsdp run_dir=runs/dinov2_l/s2 [overrides ...]
#   sbatch --nodes=4 --time=48:00:00 slurm/stage2.sh ...   # sbatch options on the command line win over these
#   adala slurm-script stage2 > stage2.sh                 # this script, from an installed adala (no checkout)
#
# The job validates its config first (a mistake ends it with exit code 2 and one line in the log), always runs
# with resume=auto, and 5 minutes before its time limit (--signal) saves a checkpoint and requeues itself.
# ADALA_PYTHON: the interpreter adala is installed in (default: the first python on PATH); ADALA_NPROC_PER_NODE:
# processes per node (default: the GPUs per node); ADALA_ENTRY: a Python file of yours to run on every rank instead of
# `python -m adala` (one that calls adala.run.run_stage, e.g. with a data stream of its own).
#SBATCH --job-name=adala-s2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-gpu=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
exec "${ADALA_PYTHON:-python}" -m adala.launch.slurm_job align_features "$@"
