"""`rlcpm report` writes one PNG per metric family; bad run directories get clear errors."""

from __future__ import annotations

import json

import pytest

from rlcpm.cli import main
from rlcpm.errors import RlcpmError
from rlcpm.report import write_report


def test_report_writes_pngs(tmp_path, capsys):
    rows = [
        {"step": s, "time": 0.0, "reward/mean": s / 10, "train/loss": 1 / s, "train/kl": None}
        for s in range(1, 6)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = write_report(tmp_path)
    assert sorted(p.name for p in paths) == ["reward.png", "train.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x")]) == 0
    assert "reward.png" in capsys.readouterr().out


def test_report_errors(tmp_path):
    with pytest.raises(RlcpmError, match="no metrics.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(RlcpmError, match="metrics.jsonl:2"):
        write_report(tmp_path)
