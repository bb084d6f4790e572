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


def test_report_on_a_run_that_logged_no_step_yet_says_so(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")  # the Monitor creates it before the first step
    with pytest.raises(RlcpmError, match="no metrics logged yet"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 1
    assert "no metrics logged yet" in capsys.readouterr().err


def test_report_names_a_line_that_is_json_but_not_an_object(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n[1, 2]\n')
    with pytest.raises(RlcpmError, match="metrics.jsonl:2: not a JSON object"):
        write_report(tmp_path)
