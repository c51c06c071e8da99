#!/usr/bin/env bash
# Set up .venv and run every test this machine can run (extra arguments go to pytest).
# As root, it also starts a two-node SLURM cluster on this machine for the launcher tests (scripts/local_slurm.sh;
# installs slurm-wlm and munge on Debian/Ubuntu; one-node jobs use either node) and stops it at the end; without
# one, those tests are skipped.
# ADALA_REQUIRE_SLURM=1 turns that skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e ".[test]"
started=0
if ! sinfo >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    if bash scripts/local_slurm.sh up --nodes 2; then
        started=1
    else
        echo "test.sh: could not start a local SLURM cluster; the SLURM tests will be skipped" >&2
    fi
fi
trap 'if [[ $started == 1 ]]; then bash scripts/local_slurm.sh down; fi' EXIT
.venv/bin/python -m pytest -q "$@"
