"""math-verify in a killable worker process, with a time limit per answer and per group.

Model output is adversarial (`10^{10^{10}}`, factorial towers, deep nesting) and sympy can hang
inside C code that no signal interrupts, so math-verify never runs in the caller's process. A
worker process (equivalence.py) parses answers and compares them; the parent gives each answer
`timeout_s` for its parse and its comparisons and kills the worker when that runs out. The slow
answer, or the slow pair of answers, is then "not equivalent" and remembered, so it never costs
the limit twice.

A warm spare worker waits alongside the active one, so a kill costs no start-up time; the spare
started after a kill parses the call's cluster representatives in the background, ready for the
next kill. Whatever re-parsing remains is charged: one `cluster` call over A answers and a gold
takes at most (A + 1) * timeout_s, beyond waiting for a worker still starting when the call
begins. Answers not reached in time start clusters of their own (and are not remembered as
slow: they were not at fault); the gold, usually short, is compared early, at its place in the
shortest-first order.
"""

from __future__ import annotations

import atexit
import bisect
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from multiprocessing.connection import Connection
from pathlib import Path

from ttrl_jax.grading import equivalence

# The one default for the time limit per answer (`ttrl.answer_timeout_s`, `evaluate`, ...).
DEFAULT_TIMEOUT_S = 5.0
# Longer answers are compared as strings only (the longest MATH-500 answer is 53 characters).
MAX_SYMPY_CHARS = 300
MAX_SYMPY_NESTING = 12
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


# The worker imports this very package: its folder goes first on the path, before the working
# directory that `python -c` puts there (which may hold another checkout).
_WORKER_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from ttrl_jax.grading.equivalence import serve; serve(int(sys.argv[1]))"
)
_SKIPPED = -3  # the call's time budget ran out before this item: it starts no cluster
_TIMED_OUT = -2  # this item's own time limit ran out


class _Worker:
    """One worker subprocess and our end of its socket."""

    def __init__(self):
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        package_root = str(Path(__file__).resolve().parents[2])
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, str(child_sock.fileno()), package_root],
                pass_fds=[child_sock.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.started = time.monotonic()
        self.ready = False
        self.warming = 0  # parse-only requests not yet answered

    def warm(self, answers: list[str]) -> None:
        """Has the worker parse `answers` in the background, ahead of needing them."""
        try:
            # Collect the answers to earlier requests, so neither socket buffer ever fills up.
            while self.warming and self.conn.poll(0):
                if self.conn.recv() == "ready":
                    self.ready = True
                else:
                    self.warming -= 1
            self.conn.send((answers, []))
            self.warming += 1
        except (EOFError, OSError):
            pass  # a dead worker is replaced when it is needed

    def wait_warm(self, deadline: float) -> bool:
        """Waits until the background parses are done; False if `deadline` passes first."""
        while self.warming:
            if self.receive(deadline) is None:
                return False
            self.warming -= 1
        return True

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
            "ttrl_jax.grading.verifier'` works; its error output is above."
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def receive(self, deadline: float):
        """The next message, or None if none arrives by `deadline` or the worker died."""
        try:
            # A deadline already past still takes a message that is waiting: a spare idle for
            # longer than the start-up limit has its "ready" queued and must not be called dead.
            remaining = max(deadline - time.monotonic(), 0.0)
            return self.conn.recv() if self.conn.poll(remaining) else None
        except (EOFError, OSError):
            return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


class _Call:
    """One classification: its items and what is known of them so far."""

    def __init__(self, items: list[tuple[str, bool, frozenset]], timeout_s: float):
        self.items, self.timeout_s = list(items), timeout_s
        # results[k]: the index of the earlier item whose cluster item k joins, -1 if it starts
        # a cluster (a gold item never does), _TIMED_OUT if its own limit ran out, _SKIPPED if
        # the budget did first. culprits[k]: after a time-out in a comparison, the
        # representative compared with.
        self.results = [_SKIPPED] * len(items)
        self.culprits: list[int | None] = [None] * len(items)
        self.reps: list[int] = []  # the items that represent clusters, in order
        self.strikes: dict[int, int] = {}  # slow comparisons per representative

    def rep_texts(self) -> list[str]:
        return [self.items[i][0] for i in self.reps]

    def add(self, item: tuple[str, bool, frozenset]) -> None:
        self.items.append(item)
        self.results.append(_SKIPPED)
        self.culprits.append(None)


class _Verifier:
    """Runs classifications in a worker, killing it when an item takes too long."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._worker: _Worker | None = None
        self._spare: _Worker | None = None

    def _ready_worker(self, deadline: float | None, reps: list[str]) -> _Worker | None:
        """The active worker once it is ready, or None if `deadline` passes first."""
        if self._pid != os.getpid():
            # A forked child must not share its parent's workers (nor kill them).
            self._pid, self._worker, self._spare = os.getpid(), None, None
        while True:
            if self._worker is None:
                # The spare starts now, alongside, so the first time-out is as cheap as later ones.
                self._worker, self._spare = _Worker(), _Worker()
            elif not self._worker.alive():
                self._replace_worker(reps)
            if not self._worker.ready and not self._worker.alive():  # a spare that died idle
                self._worker = _Worker()
            worker = self._worker
            if not worker.wait_ready(deadline):
                return None
            warm_end = time.monotonic() + WORKER_STARTUP_TIMEOUT_S if deadline is None else deadline
            if worker.wait_warm(warm_end):
                return worker
            if deadline is not None and worker.alive():
                return None
            self._replace_worker([])  # it died, or is stuck parsing ahead: a fresh one

    def _replace_worker(self, reps: list[str]) -> None:
        """Kills the current worker and promotes the spare; starts a new spare meanwhile."""
        # The new spare parses the representatives in the background, as the active worker
        # did, so that a replacement rarely has to parse them while a call waits.
        if self._worker is not None:
            self._worker.kill()
        self._worker, self._spare = self._spare or _Worker(), _Worker()
        if reps:
            self._spare.warm(reps)

    def classify(
        self, items: list[tuple[str, bool, frozenset]], gold_k: int | None, timeout_s: float
    ) -> _Call:
        """Greedy clustering of (answer, is_gold, reps to skip) items, in order, in the budget."""
        # The gold, items[gold_k], is compared at its place in the order and, if it matched
        # none, once more at the end with the clusters started after it: it is usually short
        # and simple, so it comes early and is compared before slow answers use up the budget.
        call = _Call(items, timeout_s)
        with self._lock:
            self._ready_worker(None, [])  # waiting for a worker to start is not charged
            budget_end = time.monotonic() + timeout_s * len(items)
            self._place(call, 0, len(items), budget_end)
            later = [k for k in call.reps if gold_k is not None and k > gold_k]
            if later and call.results[gold_k] == -1:
                gold, _, skip = items[gold_k]
                compared = {items[k][0] for k in call.reps if k < gold_k}
                call.add((gold, True, skip | compared))
                self._place(call, len(items), len(items) + 1, budget_end)
        return call

    def _place(self, call: _Call, start: int, stop: int, budget_end: float) -> None:
        """Places items[start:stop] by `budget_end`, restarting workers after time-outs."""
        while start < stop:
            worker = self._ready_worker(budget_end, call.rep_texts())
            if worker is None:
                return
            try:
                worker.conn.send((call.rep_texts(), call.items[start:stop]))
            except OSError:
                self._replace_worker(call.rep_texts())
                continue
            if worker.receive(budget_end) is None:  # parsing the representatives, if not yet
                self._replace_worker(call.rep_texts())
                if time.monotonic() >= budget_end:
                    return
                call.reps.clear()  # the worker died on them: they stop recruiting
                continue
            start = self._collect(worker, call, start, stop, budget_end)

    def _collect(self, worker: _Worker, call: _Call, start: int, stop: int, budget_end) -> int:
        """Records the worker's verdicts on items[start:stop]; returns where to resume."""
        for k in range(start, stop):
            own_end = time.monotonic() + call.timeout_s
            deadline = min(own_end, budget_end)
            comparing = None
            message = worker.receive(deadline)
            while message is not None and message[0] == equivalence.MSG_COMPARING:
                comparing = message[1]
                message = worker.receive(deadline)
            if message is None:
                now = time.monotonic()
                self._replace_worker(call.rep_texts())
                if now >= deadline and own_end > budget_end:
                    return stop  # the budget, not this item, ran out
                call.results[k] = _TIMED_OUT
                if comparing is not None:
                    call.culprits[k] = rep = call.reps[comparing]
                    # A representative in two slow comparisons is likely the slow one.
                    call.strikes[rep] = call.strikes.get(rep, 0) + 1
                    if call.strikes[rep] >= 2:
                        call.reps.remove(rep)
                return k + 1
            j = message[1]
            call.results[k] = call.reps[j] if j >= 0 else -1
            if j < 0 and not call.items[k][1]:
                call.reps.append(k)
        return stop

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


def _order_key(answer: str) -> tuple[int, str]:
    return len(answer), answer


def cluster(
    answers: Collection[str], gold: str | None, timeout_s: float
) -> tuple[dict[str, str], str | None]:
    """Clusters distinct answers by math-verify equivalence, independently of their order.

    The answers are taken shortest first (then alphabetically); each joins the first earlier
    cluster whose representative (its first member) is equivalent to it. The gold joins none but
    is matched against them all. Takes at most `timeout_s` per answer and (A + 1) * timeout_s
    in all for A answers; an answer not reached in time starts a cluster of its own, a gold not
    reached matches none. Absurd answers and answers known to be slow are compared as strings.

    Returns:
      (rep_of, gold_rep): the representative of each answer's cluster (itself when it starts
      one), and the representative equivalent to the gold, or None.
    """
    rep_of = {answer: answer for answer in answers}
    order = sorted((a for a in rep_of if usable(a)), key=_order_key)
    gold_k = None
    if gold is not None and usable(gold):
        gold_k = bisect.bisect([_order_key(a) for a in order], _order_key(gold))
        order.insert(gold_k, gold)
    if len(order) < 2:
        return rep_of, None
    items = [
        (a, k == gold_k, frozenset(b for b in order if (b, a) in _SLOW_PAIRS))
        for k, a in enumerate(order)
    ]
    call = _VERIFIER.classify(items, gold_k, timeout_s)
    gold_rep = None
    for (answer, is_gold, _), result, culprit in zip(call.items, call.results, call.culprits):
        if result == _TIMED_OUT:
            _remember_time_out(answer, None if culprit is None else call.items[culprit][0])
        elif result >= 0 and is_gold:
            gold_rep = call.items[result][0]
        elif result >= 0:
            rep_of[answer] = call.items[result][0]
    return rep_of, gold_rep
