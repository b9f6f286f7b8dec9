"""The fuzz and fault suite with a larger budget than CI (issue #16).

Run: .venv/bin/python benchmarks/fuzz.py [--scale 20]

CI runs tests/test_fuzz_transform.py, tests/test_fuzz_inputs.py and tests/test_faults.py
with a fixed budget and fixed seeds (hypothesis ``derandomize=True``, seeded random
edits). This script runs the same files with every property's example count and the
random .tfm edit count multiplied by ``--scale`` and with fresh random seeds, so each
run explores new inputs. Outcome rules are the tests' own: a Transform / result or a
ValueError (RegistrationError), no crash (anything that could segfault runs in a
child process), no hang, nothing written outside the output folder, nothing
half-written counted as done, no input modified. Results go to
benchmarks/results/fuzz.json (pass/fail counts, seconds, the command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FILES = ["tests/test_fuzz_transform.py", "tests/test_fuzz_inputs.py", "tests/test_faults.py"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=int, default=20,
                   help="multiply every property's example count by this (CI: 1)")
    p.add_argument("--out", default=str(HERE / "results" / "fuzz.json"))
    args = p.parse_args()
    env = dict(os.environ, NAPARI_REGISTRATION_FUZZ_SCALE=str(args.scale),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    report = ROOT / "benchmarks" / "results" / ".fuzz-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
           f"--junitxml={report}", *FILES]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    import xml.etree.ElementTree as ET

    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    report.unlink(missing_ok=True)
    failed = [c.get("name") for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    result = {"command": f"python benchmarks/fuzz.py --scale {args.scale}", "scale": args.scale,
              "seconds": round(seconds, 1), **counts, "failed": failed,
              "tail": proc.stdout.strip().splitlines()[-3:]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
