#!/usr/bin/env python
"""The ``adala-ray-sweep`` command from a checkout: the whole method for several VFMs as Ray Train runs, and one
results table (``--help`` lists the options). The code is :mod:`adala.launch.ray_sweep`."""
import sys

from adala.launch.ray_sweep import main

if __name__ == "__main__":
    sys.exit(main(command=f"python {sys.argv[0]}"))
