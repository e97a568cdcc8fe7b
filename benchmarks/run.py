"""Run every benchmark in turn (never two at once: timings on a shared CPU would be worthless)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = sorted(p for p in HERE.glob("*.py") if p.name not in {"run.py", "common.py"})

failed = [s.name for s in SCRIPTS if subprocess.run([sys.executable, str(s)]).returncode]
if failed:
    sys.exit(f"benchmarks failed: {', '.join(failed)}")
