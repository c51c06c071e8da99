#!/bin/bash
# Stage 3 (supervised fine-tuning) on SLURM: one torchrun per node, a rendezvous on the first node.
# Classification by default; segmentation with stage=finetune_seg.
#
#   sbatch slurm/stage3.sh model=dinov2_l data=in1k stage.init=runs/dinov2_l/s2/export/model.safetensors ...
#   sbatch slurm/stage3.sh stage=finetune_seg data=ade20k stage.init=... run_dir=runs/dinov2_l/s3_ade20k ...
#   sbatch --nodes=4 --time=48:00:00 slurm/stage3.sh ...   # sbatch options on the command line win over these
#   adala slurm-script stage3 > stage3.sh                 # this script, from an installed adala (no checkout)
#
# The job validates its config first (a mistake ends it with exit code 2 and one line in the log), always runs
# with resume=auto, and 5 minutes before its time limit (--signal) saves a checkpoint and requeues itself.
# ADALA_PYTHON: the interpreter adala is installed in (default: the first python on PATH); ADALA_NPROC_PER_NODE:
# processes per node (default: the GPUs per node); ADALA_ENTRY: a Python file of yours to run on every rank instead of
# `python -m adala` (one that calls adala.run.run_stage, e.g. with a data stream of its own).
#SBATCH --job-name=adala-s3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-gpu=8
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
exec "${ADALA_PYTHON:-python}" -m adala.launch.slurm_job finetune_cls "$@"
