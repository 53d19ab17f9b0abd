"""The answer equivalence math-verify decides, as it runs inside a worker process (verifier.py).

Two answers are equivalent when math-verify accepts each as the other's gold: its `verify` is
asymmetric (an open interval equals a set one way only), and clustering needs a symmetric
relation. Two rules replace that test where it would mislead: an explicit set `\\{1,2\\}` never
equals the ordered pair or open interval `(1,2)`, and an inequality and a set are compared one
way, the inequality as the gold (the only way math-verify reads an inequality as its solution
set: `-2 \\le x \\le 7` = `[-2, 7]`). Cheap verdicts (identical parses, values that differ at a
generic point) skip math-verify's slow paths; none of them says "equal" where it would not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import zlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import NamedTuple

import numpy as np

# Extra address space a worker may allocate beyond its start-up size; an out-of-memory error
# in sympy or gmp then ends the comparison early instead of swapping the host.
WORKER_MEMORY_HEADROOM_BYTES = 2 << 30

# Protocol: the parent sends the cluster representatives so far and the items (answer, is_gold,
# representatives to skip) still to place (none, to have a spare parse representatives ahead).
# For each item the worker parses it, then compares it with each representative; it reports
# every slow comparison before starting it and the item's verdict when done, so on a time-out
# the parent knows which comparison was slow.

MSG_REPS_PARSED = "reps_parsed"
MSG_COMPARING = "comparing"
MSG_DONE = "done"
_EXPLICIT_SET_RE = re.compile(r"(?:\\left)?\\\{.*(?:\\right)?\\\}", re.DOTALL)


class _Parsed(NamedTuple):
    exprs: list  # math-verify's parse: [sympy object, its normalised string], or []
    value: object  # the value (mpmath) at fixed generic points, when it is a plain expression
    proper_interval: bool  # an interval (or union) of positive length with numeric ends
    ordered: bool  # an interval or tuple: `(1,2)`
    explicit_set: bool  # written as a set: `\\{1,2\\}`
    inequality: bool  # a relation other than equality: `-2 \\le x \\le 7`
    set_like: bool  # a set, or a variable's set: `[-2, 7]`, `x \\in [-2, 7]`


def _symbol_point(name: str) -> float:
    """A fixed, generic value for a free symbol (the same in every worker)."""
    return 0.6180339887 + (zlib.crc32(name.encode()) % 9973) / 13331.0


def _fingerprint(expr):
    """The value (mpmath) with free symbols at fixed generic points; None if unsuitable."""
    import mpmath
    import sympy

    # Unsuitable: sets, relations, matrices, percentages, and what math-verify compares by name
    # (a symbol, or a product of symbols such as `\\text{east}` read as e*a*s*t).
    if not isinstance(expr, sympy.Expr) or expr.has(sympy.UnevaluatedExpr):
        return None
    symbols = expr.free_symbols
    factors = expr.args if isinstance(expr, sympy.Mul) else (expr,)
    if symbols and all(isinstance(f, sympy.Symbol) or f is sympy.E for f in factors):
        return None
    try:
        number = expr.subs({s: _symbol_point(s.name) for s in symbols}).evalf(20)
        if number.is_infinite:
            return None
        value = complex(number)
        if not np.isfinite(value):  # beyond float range: (10^5)! has 456574 digits
            value = mpmath.mpmathify(str(number))
    except Exception:  # not a number after all (undefined functions, zoo, ...)
        return None
    return mpmath.mpc(value)


def _is_proper_interval_union(expr) -> bool:
    import sympy

    parts = expr.args if isinstance(expr, sympy.Union) else (expr,)
    if not all(isinstance(part, sympy.Interval) for part in parts):
        return False
    try:
        return all(bool(part.start < part.end) for part in parts)
    except Exception:  # symbolic endpoints have no truth value
        return False


def _is_inequality(expr) -> bool:
    import sympy

    parts = expr.args if isinstance(expr, sympy.And) else (expr,)
    relations = all(isinstance(part, sympy.core.relational.Relational) for part in parts)
    return relations and not all(isinstance(part, sympy.Eq) for part in parts)


def _is_set_like(expr) -> bool:
    import sympy

    if isinstance(expr, sympy.Eq) and isinstance(expr.lhs, sympy.Symbol):
        expr = expr.rhs
    return isinstance(expr, sympy.Set)


def _quick_verdict(a: _Parsed, b: _Parsed) -> bool | None:
    """Verdicts math-verify would reach slowly (or the symmetric rule's); None if it must decide."""
    import sympy

    if not a.exprs or not b.exprs:
        return False
    if (a.explicit_set and b.ordered) or (a.ordered and b.explicit_set):
        return False
    first = a.exprs[0]
    # math-verify never calls zoo or nan equal to anything (12:00 and 1:00 both parse to zoo).
    undefined = first is sympy.zoo or first is sympy.nan
    if not undefined and first == b.exprs[0]:
        return True
    # Two expressions whose values at the same point differ are not equal (math-verify rounds to
    # 1e-6, far inside this margin); a closed-form value never equals a proper interval.
    if a.value is not None and b.value is not None:
        margin = 1e-4 * (1 + max(abs(a.value), abs(b.value)))
        if abs(a.value - b.value) > margin:
            return False
    if (a.value is not None and b.proper_interval) or (a.proper_interval and b.value is not None):
        return False
    return None


class Equivalence:
    """Worker-side state: parse and comparison caches."""

    _MAX_CACHE = 4096

    def __init__(self):
        from math_verify import parse, verify

        self._parse_fn, self._verify_fn = parse, verify
        self._parsed: dict[str, _Parsed] = {}
        self._equal: dict[tuple[str, str], bool] = {}

    def parse(self, answer: str) -> _Parsed:
        if answer not in self._parsed:
            import sympy

            if len(self._parsed) >= self._MAX_CACHE:
                self._parsed.clear()
            # Timeouts are the parent's job (signals cannot stop C code), so math-verify's are off.
            exprs = self._parse_fn("\\boxed{" + answer + "}", parsing_timeout=None)
            first = exprs[0] if exprs else None
            if hasattr(first, "doit"):
                # Evaluate now what math-verify's comparisons would evaluate later ((10^{10})!),
                # so that an expensive answer exhausts its own time, not a later comparison's.
                with contextlib.suppress(Exception):  # math-verify's own doit() calls do the same
                    first.doit()
            self._parsed[answer] = _Parsed(
                exprs,
                _fingerprint(first),
                first is not None and _is_proper_interval_union(first),
                isinstance(first, (sympy.Interval, sympy.Tuple)),
                bool(_EXPLICIT_SET_RE.fullmatch(answer.strip())),
                _is_inequality(first),
                _is_set_like(first),
            )
        return self._parsed[answer]

    def equal(self, a: str, b: str, before_slow_check: Callable[[], None]) -> bool:
        """Whether math-verify accepts each of `a` and `b` as the other's gold."""
        # An inequality and a set are compared one way, the inequality as the gold: only then
        # does math-verify read an inequality as its solution set (`-2 \\le x \\le 7` = `[-2, 7]`).
        key = (a, b) if a <= b else (b, a)
        if key not in self._equal:
            if len(self._equal) >= self._MAX_CACHE:
                self._equal.clear()
            pa, pb = self.parse(a), self.parse(b)
            verdict = _quick_verdict(pa, pb)
            if verdict is None:
                before_slow_check()
                if pa.inequality and pb.set_like:
                    verdict = self._verify(pa, pb)
                elif pb.inequality and pa.set_like:
                    verdict = self._verify(pb, pa)
                else:
                    verdict = self._verify(pa, pb) and self._verify(pb, pa)
            self._equal[key] = verdict
        return self._equal[key]

    def _verify(self, gold: _Parsed, pred: _Parsed) -> bool:
        return bool(self._verify_fn(gold.exprs, pred.exprs, timeout_seconds=None))

    def classify(self, answer: str, skip: frozenset, reps: list[str], send) -> int:
        """Index of the first representative equivalent to `answer`, or -1."""
        if not self.parse(answer).exprs:
            return -1
        for j, rep in enumerate(reps):
            if rep not in skip and self.equal(rep, answer, lambda j=j: send((MSG_COMPARING, j))):
                return j
        return -1


def _limit_memory(headroom_bytes: int) -> None:
    try:
        import resource

        with open("/proc/self/statm") as f:
            size_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = size_bytes + headroom_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError):
        pass  # no /proc or no rlimits: the parent's time limit still applies


def serve(fd: int) -> None:
    """Worker process entry point: answer classification requests until the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which ends us
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    state = Equivalence()
    state.classify("\\frac{1}{2}", frozenset(), ["0.5"], lambda _: None)  # warm up the parser
    _limit_memory(WORKER_MEMORY_HEADROOM_BYTES)
    conn = Connection(fd)
    try:
        conn.send("ready")
        while True:
            reps, items = conn.recv()
            for rep in reps:  # parsed before, by a worker that has since been replaced
                state.parse(rep)
            conn.send((MSG_REPS_PARSED, None))
            for answer, is_gold, skip in items:
                try:
                    j = state.classify(answer, skip, reps, conn.send)
                except Exception:  # a sympy failure math-verify did not catch: "not equivalent"
                    j = -1
                if j < 0 and not is_gold:
                    reps.append(answer)
                conn.send((MSG_DONE, j))
    except (EOFError, OSError):
        return  # the parent has gone
