"""Benchmarks → items: benchmarks from the hub, local files, the built-in synthetic ones.

An item is a dict `{"id": str, "prompt": str, "answer": str | None, "source": str}`: the
question text, the gold answer (used only for metrics, never for training) and a unique id.

Built-in benchmarks come from the Hugging Face hub; each has a fixed field mapping
(hub dataset, split: prompt field / gold field / id field):

- aime24: HuggingFaceH4/aime_2024, train: problem / answer / id (30 items)
- amc: AI-MO/aimo-validation-amc, train: problem / answer, a float / id (83, upstream's AMC-TTT)
- math500: HuggingFaceH4/MATH-500, test: problem / answer / unique_id (500)
- math500_l1..l5: the same, rows with level == k (43 / 90 / 105 / 128 / 134)
- gpqa: Idavidrein/gpqa config gpqa_diamond, train: Question with the correct and three
  incorrect answers as options A-D in a per-record shuffled order / the correct letter /
  Record ID (198; gated: accept the terms on the hub, then set HF_TOKEN)
- toy: ttrl_jax.toy.task.test_split: prompt / answer / id (synthetic, no download)
- apples, addsub, sum2: ttrl_jax.word_problems, word problems and arithmetic for small
  instruct models (81 one-digit word sums; 64 add-or-take-away problems; 64 two-digit sums)

AMC answers stay as upstream writes them ("142.0"); the answer checker compares values. Local
files use the upstream TTRL format (`prompt`, `answer`, `id` or `unique_id`), see
`load_benchmark`. Items become prompt ids in prompts.py; their order per step is schedule.py's.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ttrl_jax.data import toy_task as task
from ttrl_jax.data import word_problems

logger = logging.getLogger(__name__)

Item = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class HubBenchmark:
    """Where a built-in benchmark lives on the hub and how its fields map to an item."""

    hub_id: str
    hub_config: str | None
    hub_split: str
    prompt_field: str
    answer_field: str
    id_field: str
    size: int  # number of items, to catch a changed upstream dataset
    level: int | None = None  # keep only rows of this MATH difficulty level
    multiple_choice: bool = False  # GPQA columns -> question with options and a letter


_MATH500 = dict(
    hub_id="HuggingFaceH4/MATH-500",
    hub_config=None,
    hub_split="test",
    prompt_field="problem",
    answer_field="answer",
    id_field="unique_id",
)
_MATH500_LEVEL_SIZES = {1: 43, 2: 90, 3: 105, 4: 128, 5: 134}

HUB_BENCHMARKS: dict[str, HubBenchmark] = {
    "aime24": HubBenchmark(
        "HuggingFaceH4/aime_2024", None, "train", "problem", "answer", "id", size=30
    ),
    "amc": HubBenchmark(
        "AI-MO/aimo-validation-amc", None, "train", "problem", "answer", "id", size=83
    ),
    "math500": HubBenchmark(**_MATH500, size=500),
    **{
        f"math500_l{k}": HubBenchmark(**_MATH500, size=n, level=k)
        for k, n in _MATH500_LEVEL_SIZES.items()
    },
    "gpqa": HubBenchmark(
        "Idavidrein/gpqa",
        "gpqa_diamond",
        "train",
        "Question",
        "Correct Answer",
        "Record ID",
        size=198,
        multiple_choice=True,
    ),
}
TOY = "toy"
BUILT_IN = {
    TOY: "ttrl_jax.data.toy_task.test_split",
    **{name: f"ttrl_jax.data.word_problems.{name}" for name in ("apples", "addsub", "sum2")},
}
BENCHMARK_NAMES = (*HUB_BENCHMARKS, *BUILT_IN)
# The toy split the packaged model was pretrained to leave out (ttrl_jax.toy.task.test_split).
TOY_TEST_SEED = 0
TOY_TEST_SIZE = 64

# Accepted field names in local files, in order of preference.
PROMPT_FIELDS = ("prompt", "problem", "question")
ANSWER_FIELDS = ("answer",)
ID_FIELDS = ("id", "unique_id")
GPQA_FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
CHOICE_LETTERS = "ABCD"


class HubLoadError(RuntimeError):
    """A built-in benchmark could not be fetched from the Hugging Face hub."""


# ----------------------------------------------------------------------------- loading


def load_benchmark(name_or_path: str, split: str = "test") -> list[Item]:
    """Loads a benchmark's items by name (see the module table) or from a local file/folder.

    Args:
      name_or_path: a name in BENCHMARK_NAMES, or a path. A file may be a JSON array, JSONL,
        parquet or CSV of records with `prompt` (or `problem`/`question`), optional `answer`
        and optional `id` (or `unique_id`; default: the row index). Upstream's verl parquet
        rows (`prompt` = chat messages, `reward_model.ground_truth`, `extra_info.index`) and
        GPQA CSV rows (`Question`, `Correct Answer`, `Incorrect Answer 1..3`) also work. A
        folder holds `{split}.json` (or .jsonl/.parquet/.csv), like upstream's `AIME-TTT/`.
      split: the folder file to read; built-in benchmarks only have "test" (TTRL trains on the
        test questions without their answers).

    Returns:
      Items `{"id", "prompt", "answer", "source"}` in file order, ids unique.

    Raises:
      FileNotFoundError: the path (or the folder's split file) does not exist.
      ValueError: unknown name, records without the expected fields, empty or duplicate ids.
      HubLoadError: the hub could not provide a built-in benchmark.
    """
    if name_or_path in BENCHMARK_NAMES:  # names win; write ./amc for a local folder "amc"
        if split != "test":
            raise ValueError(
                f"benchmark '{name_or_path}' has only the 'test' split (TTRL trains on the "
                f"test questions without their labels); got split={split!r}"
            )
        if name_or_path == TOY:
            return _load_toy()
        if name_or_path in BUILT_IN:
            return _load_word_problems(name_or_path)
        return _load_hub(name_or_path, HUB_BENCHMARKS[name_or_path])
    path = Path(name_or_path)
    if path.is_dir():
        return _load_file(_split_file(path, split))
    if path.is_file():
        return _load_file(path)
    if os.sep in name_or_path or path.suffix in LOCAL_SUFFIXES:
        raise FileNotFoundError(f"benchmark file or folder {name_or_path} does not exist")
    raise ValueError(
        f"unknown benchmark {name_or_path!r}: not one of {', '.join(BENCHMARK_NAMES)} and not an "
        "existing file or folder (set data.path to a local file in the TTRL format)"
    )


def _split_file(folder: Path, split: str) -> Path:
    for suffix in LOCAL_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"benchmark folder {folder} has no '{split}' split: expected one of "
        f"{', '.join(split + s for s in LOCAL_SUFFIXES)}; found {present or 'nothing'}"
    )


def _load_file(path: Path) -> list[Item]:
    # Upstream keeps each benchmark in a folder of {split}.json files: the folder names it.
    source = path.parent.name if path.stem in ("test", "train") else path.stem
    return _records_to_items(_read_records(path), source=source, origin=str(path))


def _read_records(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix not in (".json", ".jsonl"):
        raise ValueError(
            f"benchmark file {path}: unsupported suffix {suffix!r}; use one of "
            f"{', '.join(LOCAL_SUFFIXES)}"
        )
    text = path.read_text(encoding="utf-8")
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError:
        loaded = None  # JSON lines: several documents in one file
    if isinstance(loaded, list):
        return loaded
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"benchmark file {path}: expected a JSON array of objects or JSON lines")
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"benchmark file {path} is neither a JSON array nor JSON lines: line {number} "
                f"is not JSON ({e.msg} at column {e.colno}); fix or remove that line"
            ) from None
    return records


def _records_to_items(records: Sequence[Any], source: str, origin: str) -> list[Item]:
    """Maps raw records onto items; `origin` names the file (or function) in errors."""
    if not records:
        raise ValueError(f"benchmark {origin} has no records")
    items = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(
                f"benchmark {origin}: record {index} is a {type(record).__name__}, "
                "expected an object with fields"
            )
        items.append(_record_to_item(record, index, source, origin))
    _check_unique_ids(items, origin)
    return items


def _record_to_item(record: Mapping[str, Any], index: int, source: str, origin: str) -> Item:
    if all(field in record for field in GPQA_FIELDS):
        return _choice_item(record, index, source)
    prompt = next((record[f] for f in PROMPT_FIELDS if record.get(f) is not None), None)
    if isinstance(prompt, list):  # verl parquet: a list of chat messages
        prompt = next((m.get("content") for m in reversed(prompt) if m.get("role") == "user"), None)
    if not isinstance(prompt, str):
        raise ValueError(
            f"benchmark {origin}: record {index} has fields {sorted(record)}; expected a "
            f"question in one of {', '.join(PROMPT_FIELDS)} (a string), optionally "
            f"{', '.join(ANSWER_FIELDS)} and {' or '.join(ID_FIELDS)}"
        )
    answer = next((record[f] for f in ANSWER_FIELDS if record.get(f) is not None), None)
    if answer is None and isinstance(record.get("reward_model"), Mapping):
        answer = record["reward_model"].get("ground_truth")
    item_id = next((record[f] for f in ID_FIELDS if record.get(f) is not None), None)
    if item_id is None and isinstance(record.get("extra_info"), Mapping):
        item_id = record["extra_info"].get("index")
    return _item(prompt, answer, index if item_id is None else item_id, source, origin)


def _item(prompt: str, answer: Any, item_id: Any, source: str, origin: str) -> Item:
    if not prompt.strip():
        raise ValueError(f"benchmark {origin}: item {item_id} has an empty question")
    return {
        "id": str(item_id),
        "prompt": prompt,
        "answer": None if answer is None else str(answer).strip(),
        "source": source,
    }


def _choice_item(record: Mapping[str, Any], index: int, source: str) -> Item:
    """GPQA row → question with options A-D in a per-record shuffled order, gold = a letter."""
    question = str(record["Question"]).strip()
    item_id = record.get("Record ID") or index
    options = [str(record["Correct Answer"]).strip()] + [
        str(record[f"Incorrect Answer {k}"]).strip()
        for k in (1, 2, 3)
        if record.get(f"Incorrect Answer {k}") is not None
    ]
    # Seeded by the record itself, so an option order never depends on row order or run.
    digest = hashlib.sha256(f"{item_id}\n{question}".encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(options))
    lines = [f"{CHOICE_LETTERS[i]}) {options[j]}" for i, j in enumerate(order)]
    gold = CHOICE_LETTERS[int(np.flatnonzero(order == 0)[0])]
    letters = ", ".join(CHOICE_LETTERS[: len(options)])
    prompt = (
        f"{question}\n\n" + "\n".join(lines) + "\n\nPut the letter of the correct option "
        f"({letters}) in \\boxed{{}}."
    )
    return {"id": str(item_id), "prompt": prompt, "answer": gold, "source": source}


def _check_unique_ids(items: Sequence[Item], origin: str) -> None:
    counts = collections.Counter(it["id"] for it in items)
    repeated = sorted(i for i, c in counts.items() if c > 1)
    if repeated:
        raise ValueError(
            f"benchmark {origin}: ids must be unique, repeated: {repeated[:5]}; fix the file's "
            "id/unique_id field or remove it (ids then default to the row index)"
        )


def _load_hub(name: str, spec: HubBenchmark) -> list[Item]:
    where = spec.hub_id + (f" ({spec.hub_config})" if spec.hub_config else "")
    try:
        import datasets

        rows = list(datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split))
    except Exception as e:  # the hub raises many types: connection, gated, missing
        raise HubLoadError(
            f"cannot load benchmark '{name}' from the Hugging Face hub dataset {where}, split "
            f"'{spec.hub_split}': {type(e).__name__}: {e}. Fix: download it where the hub is "
            "reachable and pass the local file or folder with data.path=... (fields prompt, "
            "answer, id); for gpqa also accept the dataset's terms and set HF_TOKEN."
        ) from e
    return hub_rows_to_items(name, rows)


def hub_rows_to_items(name: str, rows: Sequence[Mapping[str, Any]]) -> list[Item]:
    """Applies a built-in benchmark's field mapping (and level filter) to its hub rows."""
    spec = HUB_BENCHMARKS[name]
    origin = f"'{name}' ({spec.hub_id})"
    if spec.level is not None:
        rows = [r for r in rows if int(r["level"]) == spec.level]
    required = (spec.prompt_field, spec.answer_field, spec.id_field)
    if spec.multiple_choice:
        required = GPQA_FIELDS
    items = []
    for index, row in enumerate(rows):
        missing = [f for f in required if f not in row]
        if missing:
            raise ValueError(
                f"benchmark {origin}: row {index} lacks {missing} (has {sorted(row)}); the hub "
                "dataset changed its format, pass a local copy with data.path"
            )
        if spec.multiple_choice:
            items.append(_choice_item(row, index, name))
        else:
            items.append(
                _item(
                    row[spec.prompt_field], row[spec.answer_field], row[spec.id_field], name, origin
                )
            )
    _check_unique_ids(items, origin)
    if len(items) != spec.size:
        logger.warning("benchmark %s has %d items, expected %d", origin, len(items), spec.size)
    return items


def _load_word_problems(name: str) -> list[Item]:
    return _records_to_items(getattr(word_problems, name)(), source=name, origin=BUILT_IN[name])


def _load_toy() -> list[Item]:
    records = task.test_split(seed=TOY_TEST_SEED, n=TOY_TEST_SIZE)
    return _records_to_items(records, source=TOY, origin=BUILT_IN[TOY])
