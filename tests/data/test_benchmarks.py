"""data/benchmarks.py: benchmark files, hub rows and built-in tasks as items, and its errors."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ttrl_jax.data import benchmarks as data

# The benchmark files live in shared/ beside the checkout; tests skip when they are absent.
TTRL_DATA = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[3] / "shared/data/ttrl",
            Path("/work/shared/data/ttrl"),
        )
        if p.is_dir()
    ),
    Path("/work/shared/data/ttrl"),
)


REAL_COUNTS = {
    "AIME-TTT": 30,
    "AMC-TTT": 83,
    "MATH-TTT": 500,
    "MATH-L1-TTT": 43,
    "MATH-L2-TTT": 90,
    "MATH-L3-TTT": 105,
    "MATH-L4-TTT": 128,
    "MATH-L5-TTT": 134,
}


def write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


RECORDS = [
    {"prompt": "What is 1+1?", "answer": "2", "id": "a"},
    {"prompt": "What is 2+2?", "answer": "4", "id": "b"},
]


@pytest.mark.parametrize("name, count", sorted(REAL_COUNTS.items()))
def test_real_ttrl_files(name, count):
    folder = TTRL_DATA / name
    if not (folder / "test.json").is_file():
        pytest.skip(f"{folder} not present")
    items = data.load_benchmark(str(folder))
    assert len(items) == count
    assert len({it["id"] for it in items}) == count
    assert all(it["prompt"].strip() and it["answer"] for it in items)
    assert all(it["source"] == name for it in items)
    if name.startswith("MATH-L"):  # these files name the id field unique_id
        assert all(it["id"].startswith("test/") for it in items)
    assert data.load_benchmark(str(folder / "test.json")) == items


def test_real_amc_answers_are_upstream_strings():
    path = TTRL_DATA / "AMC-TTT" / "test.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    items = data.load_benchmark(str(path))
    assert items[0]["answer"] == "142.0"


def test_json_array_file(tmp_path):
    items = data.load_benchmark(str(write_json(tmp_path / "set.json", RECORDS)))
    assert items == [
        {"id": "a", "prompt": "What is 1+1?", "answer": "2", "source": "set"},
        {"id": "b", "prompt": "What is 2+2?", "answer": "4", "source": "set"},
    ]
    # A {split}.json file takes its benchmark name from its folder, like upstream's AIME-TTT/.
    write_json(tmp_path / "MY-SET" / "test.json", RECORDS)
    assert data.load_benchmark(str(tmp_path / "MY-SET" / "test.json"))[0]["source"] == "MY-SET"


def test_jsonl_file_and_folder_split(tmp_path):
    folder = tmp_path / "MY-SET"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    items = data.load_benchmark(str(folder), split="train")
    assert [it["id"] for it in items] == ["a", "b"] and items[0]["source"] == "MY-SET"


def test_unlabeled_records_and_default_ids(tmp_path):
    path = write_json(tmp_path / "x.json", [{"question": "Q1"}, {"problem": "Q2", "answer": 3}])
    items = data.load_benchmark(str(path))
    assert [(it["id"], it["prompt"], it["answer"]) for it in items] == [
        ("0", "Q1", None),
        ("1", "Q2", "3"),
    ]


def test_unique_id_field(tmp_path):
    path = write_json(tmp_path / "x.json", [{"prompt": "Q", "answer": "1", "unique_id": "u/1"}])
    assert data.load_benchmark(str(path))[0]["id"] == "u/1"


def test_verl_parquet_rows(tmp_path):
    rows = [
        {
            "data_source": "aime",
            "prompt": [{"role": "user", "content": f"Question {i}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(i * 7)},
            "extra_info": {"split": "test", "index": f"aime-{i}"},
        }
        for i in range(3)
    ]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    items = data.load_benchmark(str(tmp_path))
    assert [(it["id"], it["prompt"], it["answer"]) for it in items] == [
        (f"aime-{i}", f"Question {i}", str(i * 7)) for i in range(3)
    ]


def test_gpqa_csv_rows(tmp_path):
    path = tmp_path / "gpqa_diamond.csv"
    path.write_text(
        "Record ID,Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,"
        "Incorrect Answer 3\nrec1,Which is right?,yes,no,never,nope\n"
    )
    (item,) = data.load_benchmark(str(path))
    assert item["id"] == "rec1"
    assert f"{item['answer']}) yes" in item["prompt"]
    assert item["prompt"].startswith("Which is right?\n\n")


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "none" / "test.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.load_benchmark(str(missing))


def test_folder_without_the_split_lists_its_files(tmp_path):
    write_json(tmp_path / "AIME" / "test.json", RECORDS)
    with pytest.raises(FileNotFoundError, match=r"no 'train' split.*train.json.*test.json"):
        data.load_benchmark(str(tmp_path / "AIME"), split="train")


def test_bad_field_names(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"Question": "Q", "Answer": "1"}])
    with pytest.raises(ValueError) as err:
        data.load_benchmark(str(path))
    msg = str(err.value)
    assert str(path) in msg and "['Answer', 'Question']" in msg
    assert "prompt, problem, question" in msg and "unique_id" in msg


def test_duplicate_ids(tmp_path):
    path = write_json(tmp_path / "dup.json", [RECORDS[0], RECORDS[0]])
    with pytest.raises(ValueError, match=r"ids must be unique, repeated: \['a'\]"):
        data.load_benchmark(str(path))


def test_empty_question(tmp_path):
    path = write_json(tmp_path / "e.json", [{"prompt": "  ", "id": "z"}])
    with pytest.raises(ValueError, match="item z has an empty question"):
        data.load_benchmark(str(path))


def test_not_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path} is neither a JSON array nor JSON lines"):
        data.load_benchmark(str(path))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hi")
    with pytest.raises(ValueError, match=r"unsupported suffix '.txt'"):
        data.load_benchmark(str(path))


def test_unknown_benchmark_lists_known_names():
    with pytest.raises(ValueError) as err:
        data.load_benchmark("aime25")
    msg = str(err.value)
    assert "'aime25'" in msg and all(name in msg for name in data.BENCHMARK_NAMES)
    assert "data.path" in msg


def test_builtin_benchmarks_have_only_a_test_split():
    with pytest.raises(ValueError, match=r"'math500' has only the 'test' split"):
        data.load_benchmark("math500", split="train")


def test_hub_failure_is_reraised_with_the_fix(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(data.HubLoadError) as err:
        data.load_benchmark("gpqa")
    msg = str(err.value)
    assert "'gpqa'" in msg and "Idavidrein/gpqa (gpqa_diamond)" in msg
    assert "Couldn't reach the hub" in msg and "data.path=" in msg and "HF_TOKEN" in msg


def test_hub_rows_are_mapped(monkeypatch):
    import datasets

    calls = []
    rows = {
        "HuggingFaceH4/aime_2024": [{"id": 60, "problem": "P", "answer": "204", "url": "u"}],
        "AI-MO/aimo-validation-amc": [{"id": 0, "problem": "Q", "answer": 142.0, "url": "u"}],
        "HuggingFaceH4/MATH-500": [
            {"problem": f"M{i}", "answer": str(i), "unique_id": f"t/{i}.json", "level": 1 + i % 5}
            for i in range(10)
        ],
    }

    def fake_load(hub_id, config, split):
        calls.append((hub_id, config, split))
        return rows[hub_id]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert data.load_benchmark("aime24") == [
        {"id": "60", "prompt": "P", "answer": "204", "source": "aime24"}
    ]
    assert data.load_benchmark("amc")[0]["answer"] == "142.0"
    level2 = data.load_benchmark("math500_l2")
    assert [it["id"] for it in level2] == ["t/1.json", "t/6.json"]
    assert len(data.load_benchmark("math500")) == 10
    assert calls[:3] == [
        ("HuggingFaceH4/aime_2024", None, "train"),
        ("AI-MO/aimo-validation-amc", None, "train"),
        ("HuggingFaceH4/MATH-500", None, "test"),
    ]


def test_hub_rows_with_a_changed_format():
    with pytest.raises(ValueError, match=r"lacks \['answer'\].*data.path"):
        data.hub_rows_to_items("aime24", [{"id": 1, "problem": "P"}])


def test_gpqa_options_are_shuffled_deterministically():
    rows = [
        {
            "Record ID": f"r{i}",
            "Question": f"Question {i}?",
            "Correct Answer": f"right {i}",
            "Incorrect Answer 1": f"wrong a{i}",
            "Incorrect Answer 2": f"wrong b{i}",
            "Incorrect Answer 3": f"wrong c{i}",
        }
        for i in range(40)
    ]
    items = data.hub_rows_to_items("gpqa", rows)
    assert data.hub_rows_to_items("gpqa", rows[::-1]) == items[::-1]  # not row-order dependent
    for i, item in enumerate(items):
        assert item["answer"] in "ABCD"
        assert f"\n{item['answer']}) right {i}\n" in item["prompt"]
        assert all(f"wrong {x}{i}" in item["prompt"] for x in "abc")
    assert len({it["answer"] for it in items}) == 4  # the gold letter is not always the same


def test_toy_split():
    pytest.importorskip("ttrl_jax.data.toy_task")
    items = data.load_benchmark("toy")
    assert len(items) == data.TOY_TEST_SIZE
    assert len({it["id"] for it in items}) == len(items)
    assert all(it["answer"] is not None and it["source"] == "toy" for it in items)
    assert data.load_benchmark("toy") == items


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    good = [json.dumps({"prompt": f"q{i}", "id": str(i)}) for i in range(6)]
    path.write_text("\n".join(good + ["{broken", json.dumps({"prompt": "q", "id": "7"})]) + "\n")
    with pytest.raises(ValueError, match=r"line 7 is not JSON"):
        data.load_benchmark(str(path))
