"""The rspo command line."""

from __future__ import annotations

import subprocess
import sys

from rspo.cli import main
from rspo.objectives import list_objectives


def test_objectives_table(capsys):
    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in list_objectives()]
    # grpo, gspo, gspo_token: 3 rows each (none, after, before); gmpo: 1; rspo: 2
    assert len(rows) == 3 * 3 + 1 + 2
    for row in rows:
        assert all(c.replace(".", "").replace("-", "").isdigit() for c in row[2:]), row


def test_objectives_list(capsys):
    assert main(["objectives", "--list"]) == 0
    out = capsys.readouterr().out
    for name in list_objectives():
        assert name in out


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "rspo.cli", "objectives", "--list"], capture_output=True, text=True)
    assert r.returncode == 0 and "rspo" in r.stdout


def test_models_lists_presets_with_counts(capsys):
    from rspo.lab.presets import list_presets

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_presets():
        assert name in out
    line = next(x for x in out.splitlines() if x.startswith("qwen3-moe-countdown "))
    total, active = (int(v.replace(",", "")) for v in line.split()[2:4])
    assert 3_000_000 < total < 4_000_000 and active < total / 4
