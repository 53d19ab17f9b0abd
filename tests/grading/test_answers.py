"""Final-answer extraction and canonical strings (pure functions), checked against math-verify."""

import time

import pytest
from math_verify import parse, verify

from ttrl_jax.grading import answers
from ttrl_jax.grading.answers import canonical_answer, extract_answer, verifier_text
from ttrl_jax.grading.clustering import cluster_answers


@pytest.mark.parametrize(
    "text, expected",
    [
        # A sentence that names what it gives states the value after "is".
        ("Final Answer: The largest $n$ is 34.", "34"),
        (
            "Final Answer: The maximum number of points that could be in the domain of $f(x)$ "
            "is 19. <|im_start|>user",
            "19",
        ),
        ("Final Answer: Jane started growing Sphere 3 hours ago. I hope it is correct.", "3"),
        ("Final answer: 12 apples.", "12 apples"),
        ("The answer is yes.", "yes"),
        ("The final answer is 3.5.", "3.5"),
        # The last answer statement wins, boxed or phrased ...
        (
            r"so $0.05 \cdot 10,200 \cdot \frac{1}{2} = \boxed{255}$ and Dr. Zaius has $10,455. "
            r"Final Answer: The final answer is $10,455$. I hope it is correct.",
            "10,455",
        ),
        ("\\boxed{3}\n\nWait, let me recheck. The answer is 4.", "4"),
        # ... but a later phrase that states no value does not displace a box.
        (r"Thus the answer is \boxed{5}. This answer is consistent with the data.", "5"),
        (r"\boxed{5}. I hope the answer is correct.", "5"),
        (r"= \boxed{12}. So the answer is 12 cm.", "12"),  # restated with a unit
        (r"\boxed{3}. Final answer: x = 4", "x = 4"),
        (r"The answer is: $\boxed{7}$", "7"),
        # Several answers in one statement are one list answer.
        (r"The solutions are \boxed{2} and \boxed{3}.", "2, 3"),
        (r"$n = \boxed{-2} \quad \text{and} \quad \boxed{1}$", "-2, 1"),
        (r"\(\boxed{1}\) and \(\boxed{-2}\).", "1, -2"),
        (r"\[ \boxed{(1, 2)}, \boxed{(2, 1)} \]", "(1, 2), (2, 1)"),
        (r"$\boxed{1}\boxed{2}$", "1, 2"),
        (r"\boxed{5} \boxed{5}", "5"),
        (r"\boxed{5}. Then we get \boxed{6}", "6"),
        (r"\boxed{5} is wrong, so \boxed{6}", "6"),
        ("the answer is $2$ or $3$.", "2, 3"),
        ("$1$ and $2$ and $3$", "1, 2, 3"),
        # Without a box or phrase: the math span that closes the response.
        ("Therefore $x = 5$.", "x = 5"),
        ("Thus $x \\leq 2$ is our answer.", "x \\leq 2"),
        (r"So the area is $\frac{1}{2}$ square units.", r"\frac{1}{2}"),
        ("$$x = 3$$", "x = 3"),
        ("Answer \\( 9 \\)", "9"),
        ("Answer $$ \n 9 \n $$", "9"),
        ("Answer $ \n 9 \n $", None),  # an inline span ends at its line
        ("Answer \\( \n 9 \n \\)", None),
        ("we compute $x^2 + 3", None),  # truncated: unclosed
        ("where $n$ is an integer. Then 5 + 3 = 8", None),  # more reasoning after the span
        ("\\[ x = 1 and $y$ is 2", None),  # an unclosed display span opens nothing
    ],
)
def test_extract_math_statements(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the probability that Alice wins the game is 2/3. <|im_start|>user", "2/3"),
        ("the number is not 10 which is 1,000.99€", "1,000.99"),
        ("AZYUK2A", None),  # a digit inside a word is no number
        ("so it is .4", ".4"),
    ],
)
def test_last_number_fallback_reads_numbers_and_fractions(text, expected):
    assert extract_answer(text, last_number_fallback=True) == expected


def test_span_scans_of_megabyte_text_return():
    cases = ["\\[" * 300_000, "$" * 600_000 + "x", "$a$ " * 200_000, "\\(" * 300_000 + "\n"]
    for text in cases:
        start = time.monotonic()
        extract_answer(text)
        assert time.monotonic() - start < 5.0  # "returns instead of hanging", not a benchmark
    assert extract_answer("$a$ " * 200_000) == "a"  # listed repeats are one answer


# --- canonical strings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("32,349", "32349"),
        (r"32,\! 349", "32349"),
        ("1{,}000{,}000", "1000000"),
        ("32, 349", "32, 349"),  # a list, not a number with a thousands separator
        ("1, 2", "1,2"),
        ("0,111", "0,111"),  # a decimal comma, not a thousands separator
        ("28 percent", "28"),
        (r"28\text{ percent}", "28"),
        (r"28\%", "28"),
        (r"0.5\%", r"0.5\%"),  # only a whole-number percentage equals its number
        ("x = 2x+3", "x=2x+3"),  # the variable's name matters once the value has variables
        (r"k = \frac{1}{3}", r"\frac{1}{3}"),
        (r"x = \pi", r"\pi"),
        (r"p = -1 \text{ and } p = \dfrac{15}{8}", r"p=-1\text{and}p=\frac{15}{8}"),
        (r"\cfrac{1}{3}", r"\frac{1}{3}"),
    ],
)
def test_canonical_answer_forms(answer, expected):
    assert canonical_answer(answer) == expected


def _math_verify_equal(a: str, b: str) -> bool:
    pa = parse("\\boxed{" + verifier_text(a) + "}", parsing_timeout=None)
    pb = parse("\\boxed{" + verifier_text(b) + "}", parsing_timeout=None)
    return verify(pa, pb, timeout_seconds=None) and verify(pb, pa, timeout_seconds=None)


# Pairs the canonical strings merge: math-verify must call each pair equal, both ways.
MERGED = [
    ("025", "25"),
    ("142.0", "142"),
    (".5", "0.5"),
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"),
    (r"$\left( 3, \frac{\pi}{2} \right)$", r"(3,\frac{\pi}{2})"),
    (r"5.4 \text{ cents}", "5.4"),
    (r"15\mbox{ cm}^2", "15"),
    (r"11,\! 111,\! 111,\! 100", "11111111100"),
    ("32,349", "32349"),
    (r"30^\circ", "30"),
    (r"\$18.90", "18.9"),
    (r"50\%", "50"),
    ("28 percent", r"28\%"),
    ("x = 5", "5"),
    (r"\text{(B)}", "B"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
]
# Pairs math-verify tells apart: their canonical strings must differ.
APART = [
    ("12:00", "1:00"),
    (r"\frac{1}{0}", "5/0"),
    ("32, 349", "32349"),
    ("0,111", "111"),
    ("x = 2x+3", "z=2x+3"),
    (r"0.5\%", "0.5"),
    (r"12.5\%", "12.5"),
    ("1,22", "122"),
    ("137 1/2", "1371/2"),
]


@pytest.mark.parametrize("a, b", MERGED)
def test_merged_forms_are_equal_to_math_verify(a, b):
    assert canonical_answer(a) == canonical_answer(b)
    assert _math_verify_equal(a, b)


@pytest.mark.parametrize("a, b", APART)
def test_forms_math_verify_tells_apart_stay_apart(a, b):
    assert not _math_verify_equal(a, b)
    assert canonical_answer(a) != canonical_answer(b)


def test_verifier_text_reads_bare_words_as_text():
    assert verifier_text("$Evelyn$") == r"\text{Evelyn}"
    assert verifier_text(r"\(x+1\)") == "x+1"
    assert _math_verify_equal("Evelyn", "evelyn")


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{\sqrt{3}}{2}}.", r"\frac{\sqrt{3}}{2}"),
        (
            r"first \boxed{1}, then \boxed{\left( 3, \frac{\pi}{2} \right)}",
            r"\left( 3, \frac{\pi}{2} \right)",
        ),
        (r"\boxed{2} but really \fbox{12}", "12"),
        (r"\fbox{12} no, \boxed{13}", "13"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"\boxed{\boxed{7}}", "7"),
        (r"\boxed{5} and then the truncated \boxed{\frac{1}{", None),
        (r"\boxed{}", None),
        ("The answer is 25.", "25"),
        ("the ANSWER is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("Final Answer: 1.5\nDone.", "1.5"),
        ("answer: 3, wait, answer: 4", "4"),
        ("**Final Answer:** **42**", "42"),
        ("The final answer is:\n$$\n7\n$$", "7"),
        ("The answer is $\\$36$.", "\\$36"),
        ("no final answer here, just 3 and 4", None),
    ],
)
def test_extract_math(text, expected):
    assert extract_answer(text) == expected


def test_last_number_fallback():
    text = "we get 3 apples and then 1,234.5 pears"
    assert extract_answer(text) is None
    assert extract_answer(text, last_number_fallback=True) == "1,234.5"
    assert extract_answer("The answer is 7 but 8", last_number_fallback=True) == "7 but 8"


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{C}", "C"),
        (r"\boxed{\text{(B)}}", "B"),
        (r"\boxed{d}", "D"),
        ("The correct answer is (C).", "C"),
        ("Answer: D", "D"),
        ("the answer is **A** because", "A"),
        ("Answer: B. Wait, the answer is (A)", "A"),
        ("(B)", "B"),
        ("the answer is a bit unclear", None),
        (r"\boxed{Darwin}", None),
        ("I cannot decide.", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_answer(text, mode="choice") == expected


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown mode"):
        extract_answer("x", mode="code")
    with pytest.raises(ValueError, match="unknown mode"):
        cluster_answers(["1"], mode="code")


def test_extraction_of_megabyte_text_returns():
    cases = [
        "\\boxed{" + "{" * 10_000,
        "\\boxed{" * 100_000,
        "{" * 10**6 + "\\boxed{5}",
        "answer: " * 100_000,
        "the answer is $" + "1" * 10**6,
        "1," * 500_000,
    ]
    for text in cases:
        for kwargs in ({"last_number_fallback": True}, {"mode": "choice"}):
            start = time.monotonic()
            extract_answer(text, **kwargs)
            assert time.monotonic() - start < 5.0  # "returns instead of hanging"
    assert extract_answer(cases[0]) is None
    assert extract_answer(cases[2]) == "5"


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("025", "25"),
        ("142.0", "142"),
        ("-0.50", "-0.5"),
        (".5", "0.5"),
        ("0", "0"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"),
        (r"$\left( 3, \frac{\pi}{2} \right)$", r"(3,\frac{\pi}{2})"),
        (r"5.4 \text{ cents}", "5.4"),
        (r"15\mbox{ cm}^2", "15"),
        (r"11,\! 111,\! 111,\! 100", "11111111100"),
        (r"30^\circ", "30"),
        (r"\$18.90", "18.9"),
        (r"50\%", "50"),
        ("x = 5", "5"),
        (r"\text{(B)}", "B"),
        (r"\text{Evelyn}", "Evelyn"),
        ("137 1/2", "137 1/2"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    ],
)
def test_canonical_answer(answer, expected):
    assert canonical_answer(answer) == expected


def test_canonical_answer_rejects_missing_and_overlong():
    assert canonical_answer(None) is None
    assert canonical_answer("  ") is None
    assert canonical_answer("1" * (answers.MAX_ANSWER_CHARS + 1)) is None
