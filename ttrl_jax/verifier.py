"""math-verify in a killable worker process: a symmetric, time-bounded answer equivalence.

Model output is adversarial (`10^{10^{10}}`, factorial towers, deep nesting) and sympy can hang
inside C code that no signal interrupts, so math-verify never runs in the caller's process. A
worker process parses answers and compares them; the parent gives each answer `timeout_s` for
its parse and its comparisons and kills the worker when that runs out (a warm spare takes over).
The slow answer, or the slow pair of answers, is then "not equivalent" and remembered, so it
never costs the limit twice.

The time bound of one `cluster` call over A answers (the gold counts as one) is A * timeout_s:
everything math-verify does for the call, re-parsing the representatives in a replacement
worker included, is charged to that budget, and when it runs out the remaining answers are left
as clusters of their own (not remembered as slow: they were not at fault). Only the first
start-up of the workers in a process is not charged. The equivalence is symmetric: math-verify
must accept each answer as the other's gold, and an explicit set `\\{1,2\\}` never equals the
ordered pair or open interval `(1,2)`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

import numpy as np

# The one default for the time limit per answer (`ttrl.answer_timeout_s`, `evaluate`, ...).
DEFAULT_TIMEOUT_S = 5.0
# Longer answers are compared as strings only (the longest MATH-500 answer is 53 characters).
MAX_SYMPY_CHARS = 300
MAX_SYMPY_NESTING = 12
# Extra address space a worker may allocate beyond its start-up size; an out-of-memory error
# in sympy or gmp then ends the comparison early instead of swapping the host.
WORKER_MEMORY_HEADROOM_BYTES = 2 << 30
WORKER_STARTUP_TIMEOUT_S = 120.0

# Cheap filters for inputs that would make sympy build astronomically large numbers. They save
# a worker restart; the worker's time and memory limits remain the guarantee.
_ABSURD_RE = re.compile(
    r"\d\^\{?\(?-?\d+\^"  # numeric power tower: 10^{10^{10}}, 9^{9^{9^9}}
    r"|\^\{?\(?-?\d{8,}"  # 8+ digit exponent
    r"|\d{6,}!"  # factorial of a million or more
    r"|!\)*!"  # factorial of a factorial (also double factorials)
    r"|\\underbrace|\\overbrace"
)


def _nesting_depth(text: str) -> int:
    depth = max_depth = 0
    for char in text:
        if char in "{(":
            depth += 1
            max_depth = max(max_depth, depth)
        elif char in "})":
            depth -= 1
    return max_depth


def sympy_eligible(answer: str) -> bool:
    """Whether an answer is reasonable to hand to sympy at all."""
    return (
        len(answer) <= MAX_SYMPY_CHARS
        and _nesting_depth(answer) <= MAX_SYMPY_NESTING
        and not _ABSURD_RE.search(answer)
    )


# ---------------------------------------------------------------------------------------------
# Worker side. The parent sends the cluster representatives so far and the items (answer,
# is_gold, representatives to skip) still to place. For each item the worker parses it, then
# compares it with each representative; it reports every slow comparison before starting it and
# the item's verdict when done, so on a time-out the parent knows which comparison was slow.

_MSG_REPS_PARSED = "reps_parsed"
_MSG_COMPARING = "comparing"
_MSG_DONE = "done"
_EXPLICIT_SET_RE = re.compile(r"(?:\\left)?\\\{.*(?:\\right)?\\\}", re.DOTALL)


class _Parsed(NamedTuple):
    exprs: list  # math-verify's parse: [sympy object, its normalised string], or []
    value: complex | None  # the value at fixed generic points, when it is a plain expression
    proper_interval: bool  # an interval (or union) of positive length with numeric ends
    ordered: bool  # an interval or tuple: `(1,2)`
    explicit_set: bool  # written as a set: `\\{1,2\\}`
    inequality: bool  # a relation other than equality: `-2 \\le x \\le 7`
    set_like: bool  # a set, or a variable's set: `[-2, 7]`, `x \\in [-2, 7]`


def _symbol_point(name: str) -> float:
    """A fixed, generic value for a free symbol (the same in every worker)."""
    return 0.6180339887 + (zlib.crc32(name.encode()) % 9973) / 13331.0


def _fingerprint(expr) -> complex | None:
    """An expression's value with its free symbols at fixed generic points, None if unsuitable."""
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
        value = complex(expr.subs({s: _symbol_point(s.name) for s in symbols}).evalf(20))
    except Exception:  # not a number after all (undefined functions, zoo, ...)
        return None
    return value if np.isfinite(value) else None


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
        margin = 1e-4 * (1.0 + max(abs(a.value), abs(b.value)))
        if abs(a.value - b.value) > margin:
            return False
    if (a.value is not None and b.proper_interval) or (a.proper_interval and b.value is not None):
        return False
    return None


class _WorkerEquivalence:
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
        """Whether math-verify accepts each of `a` and `b` as the other's gold.

        An inequality and a set are compared one way, the inequality as the gold: math-verify
        reads an inequality as its solution set only then (`-2 \\le x \\le 7` = `[-2, 7]`).
        """
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
            if rep not in skip and self.equal(rep, answer, lambda j=j: send((_MSG_COMPARING, j))):
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


def _serve(fd: int) -> None:
    """Worker process entry point: answer classification requests until the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which ends us
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    state = _WorkerEquivalence()
    state.classify("\\frac{1}{2}", frozenset(), ["0.5"], lambda _: None)  # warm up the parser
    _limit_memory(WORKER_MEMORY_HEADROOM_BYTES)
    conn = Connection(fd)
    try:
        conn.send("ready")
        while True:
            reps, items = conn.recv()
            for rep in reps:  # parsed before, by a worker that has since been replaced
                state.parse(rep)
            conn.send((_MSG_REPS_PARSED, None))
            for answer, is_gold, skip in items:
                try:
                    j = state.classify(answer, skip, reps, conn.send)
                except Exception:  # a sympy failure math-verify did not catch: "not equivalent"
                    j = -1
                if j < 0 and not is_gold:
                    reps.append(answer)
                conn.send((_MSG_DONE, j))
    except (EOFError, OSError):
        return  # the parent has gone


# ---------------------------------------------------------------------------------------------
# Parent side.

_WORKER_BOOT = "import sys; from ttrl_jax.verifier import _serve; _serve(int(sys.argv[1]))"
_SKIPPED = -3  # the call's time budget ran out before this item: it starts no cluster
_TIMED_OUT = -2  # this item's own time limit ran out


class _Worker:
    """One worker subprocess and our end of its socket."""

    def __init__(self):
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, str(child_sock.fileno())],
                pass_fds=[child_sock.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.started = time.monotonic()
        self.ready = False

    def wait_ready(self, deadline: float | None) -> bool:
        """Waits for start-up until `deadline` (None: as long as start-up may take)."""
        if self.ready:
            return True
        give_up = self.started + WORKER_STARTUP_TIMEOUT_S
        message = self.receive(give_up if deadline is None else min(deadline, give_up))
        if message == "ready":
            self.ready = True
            return True
        if message is None and self.alive() and time.monotonic() < give_up:
            return False  # still starting; the caller's budget ran out first
        self.kill()
        raise RuntimeError(
            "The math-verify worker process did not start. Check that `math-verify` is "
            "installed (`pip install math-verify`) and that `python -c 'import "
            "ttrl_jax.verifier'` works; its error output is above."
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def receive(self, deadline: float):
        """The next message, or None if none arrives by `deadline` or the worker died."""
        try:
            remaining = deadline - time.monotonic()
            return self.conn.recv() if remaining > 0 and self.conn.poll(remaining) else None
        except (EOFError, OSError):
            return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


class _Verifier:
    """Runs classifications in a worker, killing it when an item takes too long."""

    # A warm spare worker waits alongside the active one, so a kill costs no start-up time.

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._worker: _Worker | None = None
        self._spare: _Worker | None = None

    def _ready_worker(self, deadline: float | None) -> _Worker | None:
        """The active worker once it is ready, or None if `deadline` passes first."""
        if self._pid != os.getpid():
            # A forked child must not share its parent's workers (nor kill them).
            self._pid, self._worker, self._spare = os.getpid(), None, None
        if self._worker is None:
            # The spare starts now, alongside, so that the first time-out is as cheap as later ones.
            self._worker, self._spare = _Worker(), _Worker()
        elif not self._worker.alive():
            self._replace_worker()
        if not self._worker.ready and not self._worker.alive():  # a spare that died idle
            self._worker = _Worker()
        return self._worker if self._worker.wait_ready(deadline) else None

    def _replace_worker(self) -> None:
        """Kills the current worker and promotes the spare; starts a new spare meanwhile."""
        if self._worker is not None:
            self._worker.kill()
        self._worker, self._spare = self._spare or _Worker(), _Worker()

    def classify(self, items: list[tuple[str, bool, frozenset]], timeout_s: float):
        """Greedy clustering of (answer, is_gold, reps to skip) items, in order.

        Returns (results, culprits). results[k]: the index of the earlier item whose cluster
        item k joins, -1 if it starts a cluster (a gold item never does), _TIMED_OUT if its own
        limit ran out, _SKIPPED if the call's budget did. culprits[k]: after a time-out during a
        comparison, the representative compared with.
        """
        results = [_SKIPPED] * len(items)
        culprits: list[int | None] = [None] * len(items)
        reps_idx: list[int] = []
        start = 0
        with self._lock:
            self._ready_worker(None)  # the first start-up is not charged to the call
            budget_end = time.monotonic() + timeout_s * len(items)
            while start < len(items):
                worker = self._ready_worker(budget_end)
                if worker is None:
                    break
                try:
                    worker.conn.send(([items[i][0] for i in reps_idx], items[start:]))
                except OSError:
                    self._replace_worker()
                    continue
                if worker.receive(budget_end) is None:  # re-parsing the representatives
                    self._replace_worker()
                    if time.monotonic() >= budget_end:
                        break
                    reps_idx = []  # the worker died on them: they stop recruiting
                    continue
                start = self._run_items(
                    worker, items, start, timeout_s, budget_end, results, culprits, reps_idx
                )
        return results, culprits

    def _run_items(self, worker, items, start, timeout_s, budget_end, results, culprits, reps_idx):
        """Collects the worker's verdicts from item `start` on; returns where to resume."""
        for k in range(start, len(items)):
            own_end = time.monotonic() + timeout_s
            deadline = min(own_end, budget_end)
            comparing = None
            message = worker.receive(deadline)
            while message is not None and message[0] == _MSG_COMPARING:
                comparing = message[1]
                message = worker.receive(deadline)
            if message is None:
                now = time.monotonic()
                self._replace_worker()
                if now >= deadline and own_end > budget_end:
                    return len(items)  # the call's budget, not this item, ran out
                results[k] = _TIMED_OUT
                if comparing is not None:
                    # That representative may be the slow one: it stops recruiting.
                    culprits[k] = reps_idx.pop(comparing)
                return k + 1
            j = message[1]
            results[k] = reps_idx[j] if j >= 0 else -1
            if j < 0 and not items[k][1]:
                reps_idx.append(k)
        return len(items)

    def close(self) -> None:
        with self._lock:
            for worker in (self._worker, self._spare):
                if worker is not None:
                    worker.kill()
            self._worker = self._spare = None


_VERIFIER = _Verifier()
atexit.register(_VERIFIER.close)
# Answers whose own parsing hit the time limit: compared as strings only from then on.
_SLOW: set[str] = set()
# Pairs of answers whose comparison hit the time limit, and how often each answer was in one;
# an answer in two such pairs is treated as the culprit and added to _SLOW.
_SLOW_PAIRS: set[tuple[str, str]] = set()
_PAIR_STRIKES: dict[str, int] = {}
_MAX_REMEMBERED = 1 << 14


def _remember_time_out(answer: str, partner: str | None) -> None:
    if len(_SLOW) + len(_SLOW_PAIRS) >= _MAX_REMEMBERED:
        _SLOW.clear()
        _SLOW_PAIRS.clear()
        _PAIR_STRIKES.clear()
    if partner is None:
        _SLOW.add(answer)
        return
    _SLOW_PAIRS.update({(answer, partner), (partner, answer)})
    for each in (answer, partner):
        _PAIR_STRIKES[each] = _PAIR_STRIKES.get(each, 0) + 1
        if _PAIR_STRIKES[each] >= 2:
            _SLOW.add(each)


def usable(answer: str) -> bool:
    """Whether math-verify gets to see an answer (not absurd, not known to be slow)."""
    return answer not in _SLOW and sympy_eligible(answer)


def cluster(answers: Sequence[str], gold: str | None, timeout_s: float) -> tuple[list[int], int]:
    """Greedy clustering of distinct answers, in the given order, by math-verify equivalence.

    Each answer is compared with the representatives (first members) of the clusters before it
    and joins the first equivalent one; the gold joins none but is matched against them all.
    Takes at most `timeout_s` per answer and (len(answers) + 1) * timeout_s in all.

    Returns:
      (rep_A, gold_rep): rep_A[i] is the index of the representative of answer i's cluster
      (i itself when it starts one); gold_rep the representative equivalent to the gold, or -1.
    """
    skip_of = lambda a: frozenset(b for b in answers if (b, a) in _SLOW_PAIRS)  # noqa: E731
    items = [(a, False, skip_of(a)) for a in answers]
    if gold is not None:
        items.append((gold, True, skip_of(gold)))
    results, culprits = _VERIFIER.classify(items, timeout_s)
    rep_A = list(range(len(answers)))
    gold_rep = -1
    for k, ((answer, is_gold, _), result, culprit) in enumerate(zip(items, results, culprits)):
        if result == _TIMED_OUT:
            _remember_time_out(answer, None if culprit is None else items[culprit][0])
        elif result >= 0 and is_gold:
            gold_rep = result
        elif result >= 0:
            rep_A[k] = result
    return rep_A, gold_rep
