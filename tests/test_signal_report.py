"""The signal report: which signals track gold, over run directories, from the command line."""

import json

from ttrl_jax import signal_report


def write_run(path, avgs, ratios, margins):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for step, (a, m, v) in enumerate(zip(avgs, ratios, margins)):
            f.write(json.dumps({"step": step, "train": True, "loss": 0.0}) + "\n")
            row = {"eval/avg@16": a, "eval/majority_ratio": m, "eval/vote_margin": v}
            f.write(json.dumps({"step": step, "eval": True, **row}) + "\n")


def test_report_ranks_signals_by_pooled_correlation(tmp_path, capsys):
    write_run(tmp_path / "up", [0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.5, 0.6], [0.1, 0.3, 0.2, 0.4])
    write_run(tmp_path / "down", [0.5, 0.4, 0.3, 0.2], [0.6, 0.5, 0.4, 0.3], [0.1, 0.3, 0.2, 0.4])
    assert signal_report.main([str(tmp_path / "up"), str(tmp_path / "down")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| signal | up | down | pooled |")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:]}
    # The ratio moves with avg@16 in both runs; the margin's ranks follow neither.
    assert rows["majority_ratio"][1:4] == ["+1.00", "+1.00", "+1.00"]
    assert rows["vote_margin"][1:3] == ["+0.80", "-0.80"]
    assert lines[2].startswith("| majority_ratio |")  # the strongest pooled signal first
    assert rows["answer_entropy"][1:4] == ["–", "–", "–"]  # not logged


def test_a_run_without_gold_is_an_error(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval": True}) + "\n")
    assert signal_report.main([str(tmp_path / "r")]) == 2
    assert "has no evaluation with eval/avg@" in capsys.readouterr().err
