"""``adala report`` imports the report alone, not the other subcommands' modules (in a fresh interpreter)."""
from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from adala.__main__ import main
try:
    main(["report", "--help"])
except SystemExit as stop:  # argparse's --help
    print(stop.code, "adala.eval.report" in sys.modules, "adala.launch.kernel_sweep" in sys.modules)
"""


def test_report_does_not_import_the_kernel_sweep() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-3:] == ["0", "True", "False"], result.stdout + result.stderr
