#!/usr/bin/env python
"""The ``adala-submit`` command from a checkout: the whole method for one or several models as SLURM jobs
through submitit (``--help`` lists the options). The code is :mod:`adala.launch.submit`."""
import sys

from adala.launch.submit import main

if __name__ == "__main__":
    sys.exit(main(command=f"python {sys.argv[0]}"))
