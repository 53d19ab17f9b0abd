"""Host-side answer extraction and clustering: response texts -> per-prompt answer ids.

One prompt's N responses become `answer_id_N`: equivalent final answers share an id, ids are
0, 1, 2, ... in order of first appearance, -1 means no answer. The device-side majority vote
turns these ids into rewards.

Equivalence is decided in two tiers. A cheap string canonicalisation (spaces, `\\left`, `\\dfrac`,
units, leading zeros, "142.0") settles identical forms without sympy. Only distinct canonical
forms go to math-verify, and always in a separate worker process: model output is adversarial
(`10^{10^{10}}`, factorial towers, deep nesting) and sympy can hang inside C code that no
signal interrupts. The parent waits at most `timeout_s` per answer and kills the worker when
the limit is hit (a warm spare takes over); the slow answer, or the slow pair of answers, is
then "not equivalent" and remembered, so it never costs the limit twice.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
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
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

DEFAULT_TIMEOUT_S = 2.0
# Longer extracted answers count as no answer: no benchmark answer is near this, garbage is.
MAX_ANSWER_CHARS = 1000
# Longer canonical forms are compared as strings only (the longest MATH-500 answer is 53).
MAX_SYMPY_CHARS = 300
MAX_SYMPY_NESTING = 12
# Extra address space a worker may allocate beyond its start-up size; an out-of-memory error
# in sympy or gmp then ends the comparison early instead of swapping the host.
WORKER_MEMORY_HEADROOM_BYTES = 2 << 30
WORKER_STARTUP_TIMEOUT_S = 120.0

# ---------------------------------------------------------------------------------------------
# Extraction. Every scan is a single linear pass (str.rfind, str.find, regexes without nested
# quantifiers), so megabyte responses and thousands of unmatched braces cost milliseconds.

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# `\\` (a LaTeX line break) and escaped braces are consumed whole so they never count as braces.
_BRACE_TOKEN_RE = re.compile(r"\\\\|\\[{}]|[{}]")
_ANSWER_PHRASE_RE = re.compile(r"answer\s{0,4}(?:is\b\s{0,4}:?|:)", re.IGNORECASE)
_SKIP_MARKUP_RE = re.compile(r"[\s*]*")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_CLOSING_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_MATH_DELIMITERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_CHOICE_PHRASE_RE = re.compile(
    r"(?i:answer|option|choice)\s{0,4}(?:(?i:is)\b)?\s{0,4}:?[\s*$({\[]{0,8}"
    r"(?:\\(?:text|textbf|mathrm|mathbf)\{)?\(?([A-D])\)?(?![A-Za-z])"
)
_CHOICE_LETTER_RE = re.compile(r"\W{0,8}(?:\\[a-z]{1,8}\{)?\W{0,8}([A-Da-d])(?![A-Za-z])")
_BOX_ARGUMENT_RE = re.compile(r"[ \t]*([^\s$]+)")
_NOT_FOUND = object()


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    return last


def _matching_brace(text: str, open_idx: int) -> int:
    """Index of the `}` closing the `{` at `open_idx`, or -1 when unclosed."""
    depth = 0
    for token in _BRACE_TOKEN_RE.finditer(text, open_idx):
        char = token.group()
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return token.start()
    return -1


def _last_boxed(text: str) -> str | None | object:
    """Content of the last `\\boxed{..}` / `\\fbox{..}` / `\\boxed x`; None if it is unclosed."""
    start, command = max((text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return _NOT_FOUND
    pos = start + len(command)
    if text.startswith("{", pos):
        close = _matching_brace(text, pos)
        # An unclosed last box is a truncated response: it has no final answer.
        return text[pos + 1 : close].strip() or None if close >= 0 else None
    if pos < len(text) and text[pos] in " \t":
        match = _BOX_ARGUMENT_RE.match(text, pos)
        return match.group(1) if match else None
    return None


def _delimited_answer(text: str, pos: int) -> str | None:
    """The answer at `pos` after an answer phrase: a `$..$` span or the rest of the sentence."""
    pos = _SKIP_MARKUP_RE.match(text, pos).end()
    for open_, close in _MATH_DELIMITERS:
        if text.startswith(open_, pos):
            if close == "$":  # skip escaped dollars: `$\$36$`
                match = _CLOSING_DOLLAR_RE.search(text, pos + 1)
                end = match.start() if match else -1
            else:
                end = text.find(close, pos + len(open_))
            return text[pos + len(open_) : end].strip() or None if end >= 0 else None
    line_end = text.find("\n", pos)
    line = text[pos : line_end if line_end >= 0 else len(text)]
    sentence_end = _SENTENCE_END_RE.search(line)
    if sentence_end:
        line = line[: sentence_end.start()]
    return line.strip().strip("*").strip().rstrip(".").strip() or None


def _phrase_answer(text: str) -> str | None:
    """Answer after the last "the answer is" / "final answer:" / "answer:"."""
    last = _last_match(_ANSWER_PHRASE_RE, text)
    return None if last is None else _delimited_answer(text, last.end())


def _last_number(text: str) -> str | None:
    last = _last_match(_NUMBER_RE, text)
    return None if last is None else last.group()


def _choice_letter(answer: str) -> str | None:
    """`C`, `(C)`, `\\text{(C)}`, `C: 4.2 m/s` -> "C"; anything else -> None."""
    match = _CHOICE_LETTER_RE.match(answer[:64])
    return match.group(1).upper() if match else None


def _extract_choice(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not _NOT_FOUND:
        return None if boxed is None else _choice_letter(boxed)
    last = _last_match(_CHOICE_PHRASE_RE, text)
    if last is not None:
        return last.group(1)
    stripped = text.strip()
    # A bare "C" or "(C)." response.
    return _choice_letter(stripped) if 0 < len(stripped) <= 8 else None


def extract_answer(text: str, mode: str = "math", last_number_fallback: bool = False) -> str | None:
    """Extracts a response's final answer.

    Args:
      text: the decoded response.
      mode: "math": the content of the last `\\boxed{...}` / `\\fbox{...}` (brace-matched;
        `\\boxed 5` also works); without a box, the text after the last "the answer is" /
        "final answer:" / "answer:" (a `$...$` span or the rest of the sentence). "choice": a
        multiple-choice letter A-D from a box, "answer is (C)", "Answer: C" or a bare "C".
      last_number_fallback: in "math" mode, fall back to the last number in the text.

    Returns:
      The answer string (an uppercase letter in "choice" mode), or None when there is none.
      An unclosed last box (a truncated response) is no answer.
    """
    if mode == "choice":
        return _extract_choice(text)
    if mode != "math":
        raise ValueError(f"extract_answer: unknown mode {mode!r}; use 'math' or 'choice'.")
    boxed = _last_boxed(text)
    if boxed is not _NOT_FOUND:
        return boxed
    answer = _phrase_answer(text)
    if answer is None and last_number_fallback:
        answer = _last_number(text)
    return answer


# ---------------------------------------------------------------------------------------------
# Canonical strings: equal canonical strings are equivalent answers, no sympy needed.

_SURROUNDING_DELIMITERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# `\\` (a matrix row break) is matched first and kept, so `\\ ` is not read as `\ `.
_DROP_RE = re.compile(
    r"(\\\\)|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\displaystyle(?![a-zA-Z])"
    r"|\\[!,;: ]|\\q?quad(?![a-zA-Z])|~|\\\$|\\?%|\^\{?\\circ\}?|°"
)
_WHOLE_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_TRAILING_UNIT_RE = re.compile(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?$")
_FRAC_RE = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_FRAC_ARGS_RE = re.compile(r"\\frac([0-9a-zA-Z])")
_FRAC_SECOND_RE = re.compile(r"\\frac(\{[^{}]*\})([0-9a-zA-Z])")
_SQRT_RE = re.compile(r"\\sqrt([0-9a-zA-Z])")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?")
_ASSIGNMENT_RE = re.compile(r"[a-zA-Z]=([^=<>,;]+)")
_PAREN_LETTER_RE = re.compile(r"\(([A-Za-z])\)")
_INTEGER_RE = re.compile(r"-?\d+")
_WHITESPACE_RE = re.compile(r"\s+")


def _drop_space(match: re.Match) -> str:
    """Deletes whitespace, except between two digits: "137 1/2" must not become "1371/2"."""
    text, start, end = match.string, match.start(), match.end()
    between_digits = start > 0 and end < len(text) and text[start - 1].isdigit()
    return " " if between_digits and text[end].isdigit() else ""


def _strip_surrounding(text: str) -> str:
    changed = True
    while changed:
        changed = False
        text = text.strip()
        for open_, close in _SURROUNDING_DELIMITERS:
            long_enough = len(text) >= len(open_) + len(close)
            if long_enough and text.startswith(open_) and text.endswith(close):
                text, changed = text[len(open_) : len(text) - len(close)], True
    return text


def _canonical_number(text: str) -> str:
    """Canonical decimals ("025" -> "25", "142.0" -> "142", ".5" -> "0.5"); other text as is."""
    match = _DECIMAL_RE.fullmatch(text)
    if not match or not (match.group(2) or match.group(3)):
        return text
    sign, whole, frac = match.group(1), match.group(2).lstrip("0") or "0", (match.group(3) or "")
    frac = frac.rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    return number if sign != "-" or number == "0" else "-" + number


@functools.lru_cache(maxsize=1 << 14)
def _canonical_math(answer: str) -> str | None:
    text = _strip_surrounding(answer)
    text = _TRAILING_UNIT_RE.sub("", text)
    text = _WHOLE_TEXT_RE.sub(r"\1", text)
    text = _DROP_RE.sub(lambda m: m.group(1) or "", text)
    text = _WHITESPACE_RE.sub(_drop_space, text).replace("{,}", ",").rstrip(".")
    text = _FRAC_ARGS_RE.sub(r"\\frac{\1}", _FRAC_RE.sub(r"\\frac", text))
    text = _SQRT_RE.sub(r"\\sqrt{\1}", _FRAC_SECOND_RE.sub(r"\\frac\1{\2}", text))
    if _THOUSANDS_RE.fullmatch(text):
        text = text.replace(",", "")
    assignment = _ASSIGNMENT_RE.fullmatch(text)
    if assignment:
        text = assignment.group(1)
    letter = _PAREN_LETTER_RE.fullmatch(text)
    if letter:
        text = letter.group(1)
    return _canonical_number(text) or None


def canonical_answer(answer: str | None, mode: str = "math") -> str | None:
    """Cheap canonical form of an extracted answer; None for no answer or an over-long one."""
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    if mode == "choice":
        return _choice_letter(answer)
    if mode != "math":
        raise ValueError(f"canonical_answer: unknown mode {mode!r}; use 'math' or 'choice'.")
    return _canonical_math(answer)


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


def _sympy_eligible(canon: str) -> bool:
    """Whether a canonical answer is reasonable to hand to sympy at all."""
    return (
        len(canon) <= MAX_SYMPY_CHARS
        and _nesting_depth(canon) <= MAX_SYMPY_NESTING
        and not _ABSURD_RE.search(canon)
    )


# ---------------------------------------------------------------------------------------------
# The math-verify worker process. The parent sends the cluster representatives so far and the
# items (canonical answer, is_gold, representatives to skip) still to place. For each item the
# worker parses it, then compares it with each representative; it reports every slow
# comparison before starting it and the item's verdict when done. The parent gives each item
# `timeout_s` and, on a time-out, knows whether the item itself or one comparison was at fault.

_MSG_REPS_PARSED = "reps_parsed"
_MSG_COMPARING = "comparing"
_MSG_DONE = "done"


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
    """Whether expr is an interval (or union of intervals) of positive length with numeric ends."""
    import sympy

    parts = expr.args if isinstance(expr, sympy.Union) else (expr,)
    if not all(isinstance(part, sympy.Interval) for part in parts):
        return False
    try:
        return all(bool(part.start < part.end) for part in parts)
    except Exception:  # symbolic endpoints have no truth value
        return False


class _WorkerEquivalence:
    """Worker-side state: parse and comparison caches."""

    _MAX_CACHE = 4096

    def __init__(self):
        from math_verify import parse, verify

        self._parse_fn, self._verify_fn = parse, verify
        self._parsed: dict[str, tuple[list, complex | None, bool]] = {}
        self._equal: dict[tuple[str, str], bool] = {}

    def parse(self, canon: str) -> tuple[list, complex | None, bool]:
        """(math-verify parse, its fingerprint, whether it is a proper interval or union)."""
        if canon not in self._parsed:
            if len(self._parsed) >= self._MAX_CACHE:
                self._parsed.clear()
            # Timeouts are the parent's job (signals cannot stop C code), so math-verify's are off.
            parsed = self._parse_fn("\\boxed{" + canon + "}", parsing_timeout=None)
            first = parsed[0] if parsed else None
            if hasattr(first, "doit"):
                # Evaluate now what math-verify's comparisons would evaluate later ((10^{10})!),
                # so that an expensive answer exhausts its own time, not a later comparison's.
                with contextlib.suppress(Exception):  # math-verify's own doit() calls do the same
                    first.doit()
            self._parsed[canon] = (
                parsed,
                _fingerprint(first),
                first is not None and _is_proper_interval_union(first),
            )
        return self._parsed[canon]

    def equal(self, gold: str, pred: str, before_slow_check) -> bool:
        """math-verify's verdict with `gold` as the reference (it is not symmetric)."""
        key = (gold, pred)
        if key not in self._equal:
            if len(self._equal) >= self._MAX_CACHE:
                self._equal.clear()
            gold_parse, pred_parse = self.parse(gold), self.parse(pred)
            verdict = _quick_verdict(gold_parse, pred_parse)
            if verdict is None:
                before_slow_check()
                verdict = self._verify_fn(gold_parse[0], pred_parse[0], timeout_seconds=None)
            self._equal[key] = verdict
        return self._equal[key]

    def classify(self, canon, is_gold, skip, reps, send) -> int:
        """Index of the first representative equivalent to `canon`, or -1."""
        if not self.parse(canon)[0]:
            return -1
        for j, rep in enumerate(reps):
            if rep in skip:
                continue
            gold, pred = (canon, rep) if is_gold else (rep, canon)
            if self.equal(gold, pred, lambda j=j: send((_MSG_COMPARING, j))):
                return j
        return -1


def _quick_verdict(gold, pred) -> bool | None:
    """Verdicts math-verify would reach slowly; None when it has to decide."""
    (gold_parsed, gold_value, gold_interval), (pred_parsed, pred_value, pred_interval) = gold, pred
    if not gold_parsed or not pred_parsed:
        return False
    if gold_parsed[0] == pred_parsed[0]:
        return True
    # Two expressions whose values at the same point differ are not equal (math-verify rounds to
    # 1e-6, far inside this margin); a closed-form value never equals a proper interval.
    if gold_value is not None and pred_value is not None:
        margin = 1e-4 * (1.0 + max(abs(gold_value), abs(pred_value)))
        if abs(gold_value - pred_value) > margin:
            return False
    if (gold_value is not None and pred_interval) or (gold_interval and pred_value is not None):
        return False
    return None


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
    state.classify("\\frac{1}{2}", False, (), ["0.5"], lambda _: None)  # warm up the parser
    _limit_memory(WORKER_MEMORY_HEADROOM_BYTES)
    conn = Connection(fd)
    try:
        conn.send("ready")
        while True:
            reps, items = conn.recv()
            for rep in reps:  # parsed before, by a worker that has since been replaced
                state.parse(rep)
            conn.send((_MSG_REPS_PARSED, None))
            for canon, is_gold, skip in items:
                try:
                    j = state.classify(canon, is_gold, skip, reps, conn.send)
                except Exception:  # a sympy failure math-verify did not catch: "not equivalent"
                    j = -1
                if j < 0 and not is_gold:
                    reps.append(canon)
                conn.send((_MSG_DONE, j))
    except (EOFError, OSError):
        return  # the parent has gone


_WORKER_BOOT = "import sys; from ttrl_jax.rewards import _serve; _serve(int(sys.argv[1]))"


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
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            ok = self.conn.poll(WORKER_STARTUP_TIMEOUT_S) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ok = False
        if not ok:
            self.kill()
            raise RuntimeError(
                "The math-verify worker process did not start. Check that `math-verify` is "
                "installed (`pip install math-verify`) and that `python -c 'import "
                "ttrl_jax.rewards'` works; its error output is above."
            )
        self.ready = True

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
    """Parent side: runs classifications in a worker, killing it when an item takes too long."""

    # A warm spare worker waits alongside the active one, so a kill costs no start-up time.

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._worker: _Worker | None = None
        self._spare: _Worker | None = None

    def _ensure_worker(self) -> _Worker:
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
        self._worker.wait_ready()
        return self._worker

    def _replace_worker(self) -> None:
        """Kills the current worker and promotes the spare; starts a new spare meanwhile."""
        if self._worker is not None:
            self._worker.kill()
        self._worker, self._spare = self._spare or _Worker(), _Worker()

    def classify(
        self, items: list[tuple[str, bool, frozenset]], timeout_s: float
    ) -> tuple[list[int | None], list[int | None]]:
        """Greedy clustering of (canonical, is_gold, reps to skip) items, each one time-limited."""
        # results[k]: the index of the earlier item whose cluster item k joins, -1 if it starts a
        # cluster (a gold item never does), None if it hit the time limit (it then starts none).
        # culprits[k]: after a time-out during a comparison, the representative compared with.
        results: list[int | None] = [None] * len(items)
        culprits: list[int | None] = [None] * len(items)
        reps_idx: list[int] = []
        start = 0
        with self._lock:
            while start < len(items):
                worker = self._ensure_worker()
                try:
                    worker.conn.send(([items[i][0] for i in reps_idx], items[start:]))
                except OSError:
                    self._replace_worker()
                    continue
                # Re-parsing representatives after a restart is not any item's fault.
                reps_deadline = time.monotonic() + timeout_s * (1 + len(reps_idx))
                if worker.receive(reps_deadline) is None:
                    self._replace_worker()
                    reps_idx = []  # representatives that no longer parse in time stop recruiting
                    continue
                start = self._run_items(
                    worker, items, start, timeout_s, results, culprits, reps_idx
                )
        return results, culprits

    def _run_items(self, worker, items, start, timeout_s, results, culprits, reps_idx) -> int:
        """Collects the worker's verdicts from item `start` on; returns where to resume."""
        for k in range(start, len(items)):
            deadline = time.monotonic() + timeout_s
            comparing = None
            message = worker.receive(deadline)
            while message is not None and message[0] == _MSG_COMPARING:
                comparing = message[1]
                message = worker.receive(deadline)
            if message is None:
                self._replace_worker()
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
_TIMED_OUT: set[str] = set()
# Pairs of answers whose comparison hit the time limit, and how often each answer was in one;
# an answer in two such pairs is treated as the culprit and added to _TIMED_OUT.
_TIMED_OUT_PAIRS: set[tuple[str, str]] = set()
_PAIR_STRIKES: dict[str, int] = {}
_MAX_REMEMBERED = 1 << 14


def _remember_time_out(canon: str, partner: str | None) -> None:
    if len(_TIMED_OUT) + len(_TIMED_OUT_PAIRS) >= _MAX_REMEMBERED:
        _TIMED_OUT.clear()
        _TIMED_OUT_PAIRS.clear()
        _PAIR_STRIKES.clear()
    if partner is None:
        _TIMED_OUT.add(canon)
        return
    _TIMED_OUT_PAIRS.update({(canon, partner), (partner, canon)})
    for answer in (canon, partner):
        _PAIR_STRIKES[answer] = _PAIR_STRIKES.get(answer, 0) + 1
        if _PAIR_STRIKES[answer] >= 2:
            _TIMED_OUT.add(answer)


def _merge_equivalent(
    distinct: list[str], gold: str | None, timeout_s: float
) -> tuple[dict[str, str], str | None]:
    """Representative of each distinct canonical answer, and the gold's (None if unmatched)."""
    rep_of = {canon: canon for canon in distinct}
    gold_match = gold if gold in rep_of else None
    candidates = [c for c in distinct if c not in _TIMED_OUT and _sympy_eligible(c)]
    gold_needs_check = (
        gold is not None and gold_match is None and gold not in _TIMED_OUT and _sympy_eligible(gold)
    )
    canons = candidates + ([gold] if gold_needs_check else [])
    # Distinct integers are never equivalent: the common AIME/AMC case needs no sympy at all.
    if len(canons) < 2 or all(_INTEGER_RE.fullmatch(canon) for canon in canons):
        return rep_of, None if gold_match is None else rep_of[gold_match]
    skips = [frozenset(c for c in canons if (c, canon) in _TIMED_OUT_PAIRS) for canon in canons]
    items = [(canon, k == len(candidates), skips[k]) for k, canon in enumerate(canons)]
    results, culprits = _VERIFIER.classify(items, timeout_s)
    for (canon, is_gold, _), result, culprit in zip(items, results, culprits):
        if result is None:
            _remember_time_out(canon, None if culprit is None else items[culprit][0])
        elif result >= 0 and is_gold:
            gold_match = items[result][0]
        elif result >= 0:
            rep_of[canon] = items[result][0]
    return rep_of, None if gold_match is None else rep_of[gold_match]


def cluster_answers(
    answers: Sequence[str | None],
    gold: str | None = None,
    *,
    mode: str = "math",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[list[int], int]:
    """Clusters one prompt's extracted answers into ids.

    Args:
      answers: the N extracted answers of one prompt; None is no answer.
      gold: the reference answer, for metrics only (never for training); None if unknown.
      mode: "math" (string canonicalisation, then math-verify for distinct forms) or "choice"
        (letters compared as strings).
      timeout_s: wall-clock limit on math-verify work per distinct answer (parse plus
        comparisons with the clusters before it). An answer that hits it is equivalent only to
        identical canonical strings, in this call and later ones.

    Returns:
      (ids, gold_id): ids[i] is the cluster of answers[i], numbered 0, 1, 2, ... in order of
      first appearance, -1 for no answer (None, empty, or longer than MAX_ANSWER_CHARS).
      gold_id is the id of the cluster equivalent to the gold, else an id no answer uses
      (the number of clusters), or -1 when gold is None.
    """
    if mode not in ("math", "choice"):
        raise ValueError(f"cluster_answers: unknown mode {mode!r}; use 'math' or 'choice'.")
    if not timeout_s > 0:
        raise ValueError(f"cluster_answers: timeout_s must be positive seconds, got {timeout_s}.")
    canons = [canonical_answer(a, mode) for a in answers]
    gold_canon = None if gold is None else canonical_answer(gold, mode)
    distinct = list(dict.fromkeys(c for c in canons if c is not None))
    if mode == "math":
        rep_of, gold_rep = _merge_equivalent(distinct, gold_canon, timeout_s)
    else:
        rep_of = {c: c for c in distinct}
        gold_rep = gold_canon if gold_canon in rep_of else None
    id_of: dict[str, int] = {}
    ids = [-1 if c is None else id_of.setdefault(rep_of[c], len(id_of)) for c in canons]
    if gold is None:
        return ids, -1
    return ids, len(id_of) if gold_rep is None else id_of[gold_rep]


def answer_ids(
    responses_PN: Sequence[Sequence[str]],
    golds_P: Sequence[str | None] | None = None,
    *,
    mode: str = "math",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    last_number_fallback: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Extracts and clusters the answers of P prompts x N responses.

    Args:
      responses_PN: decoded response texts, N per prompt.
      golds_P: reference answers for metrics (None entries, or None for all, when unknown).
      mode: "math" or "choice", see `extract_answer`.
      timeout_s: per-answer math-verify time limit, see `cluster_answers`.
      last_number_fallback: see `extract_answer`.

    Returns:
      answer_id_PN: int32 [P, N] cluster ids per prompt, -1 = no answer.
      gold_id_P: int32 [P] the gold's id in its prompt's numbering, -1 when unknown.
    """
    num_prompts = len(responses_PN)
    num_samples = len(responses_PN[0]) if num_prompts else 0
    if golds_P is None:
        golds_P = [None] * num_prompts
    if len(golds_P) != num_prompts:
        raise ValueError(
            f"answer_ids: {num_prompts} prompts of responses but {len(golds_P)} gold answers; "
            "pass one gold (or None) per prompt."
        )
    answer_id_PN = np.full((num_prompts, num_samples), -1, np.int32)
    gold_id_P = np.full((num_prompts,), -1, np.int32)
    for p, (responses_N, gold) in enumerate(zip(responses_PN, golds_P)):
        if len(responses_N) != num_samples:
            raise ValueError(
                f"answer_ids: prompt {p} has {len(responses_N)} responses, prompt 0 has "
                f"{num_samples}; every prompt needs the same number of samples N."
            )
        answers = [extract_answer(r, mode, last_number_fallback) for r in responses_N]
        ids, gold_id_P[p] = cluster_answers(answers, gold, mode=mode, timeout_s=timeout_s)
        answer_id_PN[p] = ids
    return answer_id_PN, gold_id_P
