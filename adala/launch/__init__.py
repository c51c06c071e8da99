"""Launching the method on clusters: the job graph of one model's pipeline, SLURM and Ray helpers.

``launchers/submit.py`` (submitit), ``launchers/ray_sweep.py`` (Ray Train) and ``slurm/stage*.sh`` (sbatch) are the
entry points; this package holds what they share. Submitit and Ray are imported where they are used.
"""
