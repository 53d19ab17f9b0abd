"""run/logbook.py: metrics.jsonl and answers.jsonl, a resumed run's records, the summary."""

import json

import numpy as np
import pytest

from ttrl_jax.run import logbook, signals


def votes(ids_PN, labels_P):
    ids_PN = np.asarray(ids_PN, np.int32)
    shape = ids_PN.shape
    return signals.Votes(np.arange(shape[0]), ids_PN, labels_P, np.ones(shape), np.ones(shape))


def test_records_and_answers_round_trip_and_a_resume_drops_what_came_after(tmp_path):
    book = logbook.Logbook(str(tmp_path), tensorboard=False)
    book.log(0, {"eval/avg@4": 0.25}, kind="eval")
    book.log(1, {"loss": np.float32(0.5), "votes_per_prompt": [4, 2]})
    book.answers(1, "train", votes([[0, 1, 0, -2], [-1, 0, -2, -2]], [["7", "8"], ["3"]]))
    book.log(2, {"loss": 0.25})
    assert book.has_kind("eval") and not book.has_kind("baseline")
    records = logbook.read_records(book.path)
    assert [(r["step"], "train" in r) for r in records] == [(0, False), (1, True), (2, True)]
    assert records[1]["loss"] == 0.5 and records[1]["votes_per_prompt"] == [4, 2]
    (answers,) = logbook.read_records(book.answers_path)
    # Slots the vote did not draw are left out; -1 (no answer) stays.
    assert [p["ids"] for p in answers["prompts"]] == [[0, 1, 0], [-1, 0]]
    assert logbook.majority_labels(answers) == {0: "7", 1: "3"}
    resumed = logbook.Logbook(str(tmp_path), keep_upto=1, tensorboard=False)
    assert [r["step"] for r in logbook.read_records(resumed.path)] == [0, 1]


def test_a_torn_last_line_is_dropped_and_a_bad_earlier_line_named(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "train": True}) + '\n{"step": 2, "tr')
    assert logbook.read_records(str(path)) == [{"step": 1, "train": True}]
    assert "dropped a torn last line 2" in capsys.readouterr().out
    path.write_text('{"oops": 1}\n' + json.dumps({"step": 1}) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a metrics record"):
        logbook.read_records(str(path))


def test_majority_labels_break_ties_to_the_first_seen_answer():
    record = {"prompts": [
        {"index": 3, "labels": ["a", "b"], "ids": [1, 0, 0, 1, -1]},
        {"index": 5, "labels": [], "ids": [-1, -1]},
        {"index": 7, "labels": ["c"], "ids": []},
    ]}  # fmt: skip
    assert logbook.majority_labels(record) == {3: "a", 5: None, 7: None}


def test_summary_puts_the_base_the_kept_and_the_last_evaluation_side_by_side():
    records = [
        {"step": 0, "eval": True, "eval/score": 0.5, "eval/avg@4": 0.25},
        {"step": 1, "train": True, "label_accuracy": 0.5, "majority_ratio": 0.6},
        {"step": 1, "eval": True, "eval/score": 0.7, "eval/avg@4": 0.5},
        {"step": 2, "train": True, "label_accuracy": 0.75, "majority_ratio": 0.8},
        {"step": 2, "eval": True, "eval/score": 0.6, "eval/avg@4": 0.75},
        {"step": 2, "result": True, "kept_step": 1, "kept_why": "step 1 scores best"},
    ]
    result, table = logbook.summary(records)
    assert result["steps"] == 2 and result["kept_step"] == 1 and result["gold_best_step"] == 2
    assert result["eval_before"]["eval/avg@4"] == 0.25
    assert result["eval_kept"]["eval/avg@4"] == 0.5 and result["eval_after"]["eval/avg@4"] == 0.75
    assert "| | base model | kept (step 1) | last (step 2) |" in table
    assert "| score | 0.500 | 0.700 | 0.600 |" in table
    assert "| avg@4 (gold) | 0.250 | 0.500 | 0.750 |" in table
    assert "Kept: step 1 scores best." in table
