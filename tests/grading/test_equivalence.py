"""grading/equivalence.py, the worker's side, run in this process: both-way equality."""

from ttrl_jax.grading import equivalence


def test_equal_is_symmetric():
    eq = equivalence.Equivalence()
    assert eq.equal("\\frac{1}{2}", "0.5", lambda: None)
    assert eq.equal("0.5", "\\frac{1}{2}", lambda: None)
    assert not eq.equal("2", "3", lambda: None)


def test_an_inequality_equals_the_set_it_solves():
    eq = equivalence.Equivalence()
    assert eq.equal("-2 \\le x \\le 7", "[-2, 7]", lambda: None)
    assert eq.equal("[-2, 7]", "-2 \\le x \\le 7", lambda: None)


def test_classify_names_the_first_equal_representative_it_may_use():
    eq, sent = equivalence.Equivalence(), []
    assert eq.classify("0.50", frozenset(), ["3", "\\frac12"], sent.append) == 1
    assert eq.classify("7", frozenset(), ["3", "\\frac12"], sent.append) == -1
    assert eq.classify("0.50", frozenset({"\\frac12"}), ["\\frac12"], sent.append) == -1
    assert eq.classify("not math at all ((", frozenset(), ["3"], sent.append) == -1
