"""data/word_problems.py: the built-in word-problem tasks, as benchmarks."""

from ttrl_jax.data import benchmarks as data
from ttrl_jax.data import word_problems


def test_built_in_word_problems():
    items = data.load_benchmark(word_problems.APPLES)
    pairs = lambda rows: [(r["id"], r["prompt"], r["answer"]) for r in rows]
    assert pairs(items) == pairs(word_problems.apples())
    assert len(items) == 81 and len({it["id"] for it in items}) == 81
    first = items[0]
    assert first["prompt"].startswith("Tom has 1 apples and buys 1 more.")
    assert first["answer"] == "2" and items[-1]["answer"] == "18"
