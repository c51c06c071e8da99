"""Launching the method on clusters: the job graph of one model's pipeline, SLURM and Ray helpers, and the two
launcher commands, ``adala-submit`` (:mod:`adala.launch.submit`, submitit) and ``adala-ray-sweep``
(:mod:`adala.launch.ray_sweep`, Ray Train); a checkout also runs them as ``launchers/*.py``. The sbatch scripts
(``slurm/stage*.sh``, or ``adala slurm-script``) run :mod:`adala.launch.slurm_job`. Submitit and Ray are imported
where they are used.
"""
