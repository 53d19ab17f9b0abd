"""Benchmark loading, chat prompts, bucket padding and the prompt schedule."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ttrl_jax.data import benchmarks as data
from ttrl_jax.data import prompts, schedule

# The benchmark files live in shared/ beside the checkout; tests skip when they are absent.
TTRL_DATA = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[2] / "shared/data/ttrl",
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
DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Qwen-style: a default system turn when none is given; Qwen3's empty think block when
# enable_thinking is false.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def byte_tokenizer(chat_template=CHAT_TEMPLATE):
    """One token per UTF-8 byte plus three special tokens: lengths are easy to predict."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


RECORDS = [
    {"prompt": "What is 1+1?", "answer": "2", "id": "a"},
    {"prompt": "What is 2+2?", "answer": "4", "id": "b"},
]


# ----------------------------------------------------------------------------- real files


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


# ----------------------------------------------------------------------------- local formats


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


# ----------------------------------------------------------------------------- bad input


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


# ----------------------------------------------------------------------------- hub


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


# ----------------------------------------------------------------------------- toy


def test_toy_split():
    pytest.importorskip("ttrl_jax.data.toy_task")
    items = data.load_benchmark("toy")
    assert len(items) == data.TOY_TEST_SIZE
    assert len({it["id"] for it in items}) == len(items)
    assert all(it["answer"] is not None and it["source"] == "toy" for it in items)
    assert data.load_benchmark("toy") == items


# ----------------------------------------------------------------------------- prompts


def test_build_prompts_uses_the_chat_template(tokenizer):
    items = [{"id": "q", "prompt": "What is 1+1?", "answer": "2", "source": "t"}]
    ids, kept, n_skipped = prompts.build_prompts(items, tokenizer, None, 1000, skip_long=False)
    text = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert kept == items and n_skipped == 0
    assert ids == [tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert tokenizer.decode(ids[0]) == text


def test_build_prompts_with_a_system_prompt_and_thinking_off(tokenizer):
    items = [{"id": "q", "prompt": "Q?", "answer": None, "source": "t"}]
    ids, _, _ = prompts.build_prompts(
        items, tokenizer, "Be brief.", 1000, skip_long=False, enable_thinking=False
    )
    assert tokenizer.decode(ids[0]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_too_long_prompt_is_an_error_naming_item_length_and_fix(tokenizer):
    items = [{"id": "long-one", "prompt": "x" * 200, "answer": None, "source": "t"}]
    (ids,), _, _ = prompts.build_prompts(items, tokenizer, "", 10_000, skip_long=False)
    n = len(ids)
    with pytest.raises(ValueError) as err:
        prompts.build_prompts(items, tokenizer, "", n - 1, skip_long=False)
    msg = str(err.value)
    assert "'long-one'" in msg and f"{n} tokens" in msg and f"max_prompt_tokens={n - 1}" in msg
    assert "data.skip_long_prompts=true" in msg
    prompts.build_prompts(items, tokenizer, "", n, skip_long=False)  # exactly the budget is fine


def test_skip_long_counts_and_keeps_order(tokenizer):
    items = [
        {"id": str(i), "prompt": "y" * length, "answer": None, "source": "t"}
        for i, length in enumerate([5, 300, 10, 400, 1])
    ]
    ids, kept, n_skipped = prompts.build_prompts(items, tokenizer, None, 200, skip_long=True)
    assert n_skipped == 2
    assert [it["id"] for it in kept] == ["0", "2", "4"]
    assert len(ids) == 3 and all(len(x) <= 200 for x in ids)


def test_tokenizer_without_chat_template():
    with pytest.raises(ValueError, match="has no chat template"):
        prompts.build_prompts(
            [{"id": "q", "prompt": "Q", "answer": None, "source": "t"}],
            byte_tokenizer(chat_template=None),
            None,
            100,
            skip_long=False,
        )


# ----------------------------------------------------------------------------- padding


def test_bucket_and_pad_left_pads_to_the_smallest_bucket():
    tokens_PT, mask_PT = prompts.bucket_and_pad([[5, 6, 7], [8], [1, 2, 3, 4, 5]], [4, 8, 16], 0)
    assert tokens_PT.dtype == np.int32 and mask_PT.dtype == np.bool_
    np.testing.assert_array_equal(
        tokens_PT,
        [[0, 0, 0, 0, 0, 5, 6, 7], [0, 0, 0, 0, 0, 0, 0, 8], [0, 0, 0, 1, 2, 3, 4, 5]],
    )
    np.testing.assert_array_equal(mask_PT, tokens_PT != 0)


def test_bucket_and_pad_exact_fit_and_pad_id():
    tokens_PT, mask_PT = prompts.bucket_and_pad([[3, 3, 3, 3], [4, 4]], [8, 4], pad_id=9)
    np.testing.assert_array_equal(tokens_PT, [[3, 3, 3, 3], [9, 9, 4, 4]])
    np.testing.assert_array_equal(mask_PT, [[1, 1, 1, 1], [0, 0, 1, 1]])


def test_bucket_and_pad_too_long():
    with pytest.raises(ValueError, match=r"has 9 tokens but the largest prompt bucket is 8"):
        prompts.bucket_and_pad([[1] * 9], [4, 8], 0)


def test_bucket_and_pad_rejects_empty():
    with pytest.raises(ValueError, match="at least one prompt"):
        prompts.bucket_and_pad([], [4], 0)
    with pytest.raises(ValueError, match="prompt 1 of the batch is empty"):
        prompts.bucket_and_pad([[1], []], [4], 0)


# ----------------------------------------------------------------------------- order


def test_episode_order_is_a_deterministic_permutation():
    a = schedule.episode_order(3, 30, 0)
    np.testing.assert_array_equal(np.sort(a), np.arange(30))
    np.testing.assert_array_equal(a, schedule.episode_order(3, 30, 0))
    assert not np.array_equal(a, schedule.episode_order(3, 30, 1))
    assert not np.array_equal(a, schedule.episode_order(4, 30, 0))
    np.testing.assert_array_equal(schedule.episode_order(3, 30, 5, shuffle=False), np.arange(30))


def test_drop_schedule_like_aime():
    s = schedule.PromptSchedule(n_items=30, batch_prompts=8, episodes=80, seed=1)
    assert s.total_steps == 240 and s.n_dropped_per_episode == 6
    for episode in (0, 79):
        batches = [s.batch_indices(s.step_of(episode, k)) for k in range(3)]
        flat = np.concatenate(batches)
        assert all(b.shape == (8,) for b in batches)
        assert len(set(flat.tolist())) == 24  # no prompt twice within an episode
        np.testing.assert_array_equal(flat, schedule.episode_order(1, 30, episode)[:24])
    sat_out = [
        set(range(30))
        - set(np.concatenate([s.batch_indices(s.step_of(e, k)) for k in range(3)]).tolist())
        for e in range(3)
    ]
    assert all(len(x) == 6 for x in sat_out)
    assert len({frozenset(x) for x in sat_out}) > 1  # a different remainder sits out


def test_wrap_schedule_fills_batches_from_the_next_episode():
    s = schedule.PromptSchedule(n_items=30, batch_prompts=8, episodes=4, seed=2, last_batch="wrap")
    assert s.total_steps == 15 and s.n_dropped_per_episode == 0
    stream = np.concatenate([schedule.episode_order(2, 30, e) for e in range(5)])
    got = np.concatenate([s.batch_indices(t) for t in range(s.total_steps)])
    np.testing.assert_array_equal(got, stream[: 15 * 8])
    assert s.position(3) == (0, 3)  # positions 24..31 start in episode 0
    assert s.position(4) == (1, 0)  # 32..39: episode 1's first batch


def test_wrap_with_fewer_items_than_a_batch():
    s = schedule.PromptSchedule(n_items=3, batch_prompts=8, episodes=4, seed=0, last_batch="wrap")
    assert s.total_steps == 2  # ceil(4 episodes x 3 prompts / 8); the last batch runs on
    stream = np.concatenate([schedule.episode_order(0, 3, e) for e in range(6)])
    got = np.concatenate([s.batch_indices(t) for t in range(2)])
    np.testing.assert_array_equal(got, stream[:16])


def test_drop_with_fewer_items_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match=r"3 prompts cannot fill one batch.*data.last_batch=wrap"):
        schedule.PromptSchedule(n_items=3, batch_prompts=8, episodes=1, seed=0)


@pytest.mark.parametrize("last_batch", ["drop", "wrap"])
@pytest.mark.parametrize("n_items, batch", [(30, 8), (83, 8), (500, 32), (16, 8)])
def test_position_and_step_of_round_trip(last_batch, n_items, batch):
    s = schedule.PromptSchedule(n_items, batch, episodes=5, seed=0, last_batch=last_batch)
    seen = set()
    for step in range(s.total_steps):
        episode, k = s.position(step)
        assert s.step_of(episode, k) == step
        seen.add((episode, k))
    assert len(seen) == s.total_steps


def test_resume_continues_with_the_same_batches():
    s = schedule.PromptSchedule(n_items=83, batch_prompts=8, episodes=3, seed=7)
    full = list(s.iter_steps())
    resumed = list(s.iter_steps(start_step=13))
    assert [t for t, _ in resumed] == list(range(13, s.total_steps))
    for (t1, b1), (t2, b2) in zip(full[13:], resumed):
        assert t1 == t2
        np.testing.assert_array_equal(b1, b2)


def test_steps_outside_the_schedule():
    s = schedule.PromptSchedule(n_items=30, batch_prompts=8, episodes=2, seed=0)
    with pytest.raises(ValueError, match=r"step 6 is outside the schedule's \[0, 6\)"):
        s.batch_indices(6)
    with pytest.raises(ValueError, match=r"step_in_episode must be in \[0, 3\)"):
        s.step_of(0, 3)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    good = [json.dumps({"prompt": f"q{i}", "id": str(i)}) for i in range(6)]
    path.write_text("\n".join(good + ["{broken", json.dumps({"prompt": "q", "id": "7"})]) + "\n")
    with pytest.raises(ValueError, match=r"line 7 is not JSON"):
        data.load_benchmark(str(path))


def test_prompt_template_wraps_the_question(tokenizer):
    suffix = "Let's think step by step and output the final answer within \\boxed{}."
    template = "{question}\n" + suffix
    text = prompts.chat_prompt_text("What is 2 + 3?", tokenizer, None, None, template)
    assert "What is 2 + 3?\n" + suffix in text
    items = [{"id": "a", "prompt": "What is 2 + 3?"}]
    ids, _, _ = prompts.build_prompts(items, tokenizer, None, 512, False, template="Q: {question}")
    assert "Q: What is 2 + 3?" in tokenizer.decode(ids[0])


def test_prompt_template_needs_the_question_once():
    from ttrl_jax.config.load import load_config
    from ttrl_jax.config.schema import ConfigError

    with pytest.raises(ConfigError, match="data.prompt_template='Solve it' must hold"):
        load_config(None, ["data.prompt_template=Solve it"])
    cfg = load_config(None, ["data.prompt_template={question} Answer with a number."])
    assert cfg.data.prompt_template == "{question} Answer with a number."


def test_built_in_word_problems():
    items = data.load_benchmark("apples")
    assert len(items) == 81 and len({it["id"] for it in items}) == 81
    first = items[0]
    assert first["prompt"].startswith("Tom has 1 apples and buys 1 more.")
    assert first["answer"] == "2" and items[-1]["answer"] == "18"
