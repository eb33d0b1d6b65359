"""Run the TRL tests against the newest TRL release on the package index (``make test-trl-newest``), or
against a given one (``python tests/trl_newest.py 1.15.0``: how this runner itself was exercised).

The newest wheel is installed without dependencies into a scratch directory put first on PYTHONPATH;
if it is the installed (pinned) version, the regular suite already covers it and nothing more runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import trl

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_trl_loss.py", "tests/test_trl_integration.py", "tests/test_outside_checks.py"]


def main(version: str | None = None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        dl = Path(tmp) / "dl"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                str(dl),
                f"trl=={version}" if version else "trl",
            ],
            check=True,
        )
        wheel = next(dl.glob("trl-*.whl"))
        newest = re.match(r"trl-([^-]+)-", wheel.name).group(1)
        print(f"{'requested' if version else 'newest'} TRL: {newest}; installed (pinned): {trl.__version__}")
        if newest == trl.__version__:
            print("the newest release is the pinned one: `make test` already runs the TRL tests against it")
            return 0
        site = Path(tmp) / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True
        )
        env = {"PYTHONPATH": f"{site}:{ROOT / 'src'}", "PATH": "/usr/bin:/bin"}
        print(f"running {' '.join(TESTS)} against trl {newest} (failures here mean rspo needs an update)")
        return subprocess.run([sys.executable, "-m", "pytest", "-q", *TESTS], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
