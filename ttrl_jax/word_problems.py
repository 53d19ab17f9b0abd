"""Built-in word problems for small instruct models: the real-model task's unlabeled prompts.

`apples`: "Tom has 3 apples and buys 5 more. How many apples does Tom have now?" for every pair
of one-digit counts (81 questions). SmolLM2-135M-Instruct answers about a quarter of its samples
right at temperature 0.7 and its majority vote over 16 samples about half of the questions
(configs/smollm2-135m_apples.yaml): a gap TTRL can close without labels.
"""

from __future__ import annotations

APPLES = "apples"


def apples() -> list[dict[str, str]]:
    """The 81 questions with their answers (gold labels, for metrics only)."""
    return [
        {
            "id": f"apples-{a}-{b}",
            "prompt": f"Tom has {a} apples and buys {b} more. How many apples does Tom have now?",
            "answer": str(a + b),
        }
        for a in range(1, 10)
        for b in range(1, 10)
    ]
