"""Where the time goes, from profiles: XLA:CPU's per-op trace for ours, torch.profiler for theirs.

Both sides' ops are put in the same categories by where they come from:
- ours: a `jax.profiler` trace of one call records every executed HLO op (a "thunk" of XLA:CPU,
  each loop iteration's ops separately) with its duration; the compiled HLO names each op's
  opcode, what a fusion contains, and its source (`op_name`: the flax module path, the einsum,
  the named scopes `old_logp`, `ref_logp`, `unembed`, `accumulate`, `optimizer` and `attend`,
  and `transpose(...)` for the backward pass).
- theirs: `torch.profiler` self times of every op; the peer labels the same pieces with
  `record_function`, and a backward op takes the labels of the forward op that made it
  (autograd's sequence numbers link the two).
Both profiles run once, apart from the timed runs; their totals are printed beside the wall
time, so what the profiler adds is visible.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from ttrl_jax.bench import machine

OPTIMIZER = "optimizer (grad accumulation, clip, AdamW)"
UNEMBED = "unembedding + log-softmax (every pass)"
MOVES = "gathers and copies"
NO_GRAD = "old + reference log-prob passes (no grad)"
CATEGORIES = (
    "forward: dense matmuls",
    "forward: attention",
    "forward: other (norms, RoPE, SwiGLU, residuals)",
    "backward: dense matmuls",
    "backward: attention",
    "backward: other (norms, RoPE, SwiGLU, residuals)",
    NO_GRAD,
    UNEMBED,
    MOVES,
    OPTIMIZER,
    "other",
)


def category(scopes: str, backward: bool, kind: str, attention: bool) -> str:
    """The category of one op: its labels (`scopes`), pass, kind (matmul|move|other)."""
    has = lambda label: re.search(rf"\b{label}\b", scopes) is not None
    if has("optimizer") or has("accumulate") or "AccumulateGrad" in scopes:
        return OPTIMIZER
    if has("unembed"):
        return UNEMBED
    if kind == "move":
        return MOVES
    if has("old_logp") or has("ref_logp"):
        return NO_GRAD
    pass_ = "backward" if backward else "forward"
    if attention:
        return f"{pass_}: attention"
    if kind == "matmul":
        return f"{pass_}: dense matmuls"
    return f"{pass_}: other (norms, RoPE, SwiGLU, residuals)"


@dataclasses.dataclass
class Breakdown:
    """Seconds per category of one profiled call, and that call's wall time."""

    seconds: dict[str, float]
    wall: float
    source: str  # how it was measured
    top: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)  # (s, op, what)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


# ----------------------------------------------------------------------------- XLA


_MATMUL_OPS = frozenset({"dot", "convolution"})
_MOVE_OPS = frozenset({
    "copy", "transpose", "gather", "scatter", "dynamic-slice", "dynamic-update-slice",
    "concatenate", "pad", "slice", "broadcast", "reshape", "reverse", "copy-start", "copy-done",
})  # fmt: skip
_FREE_OPS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "iota"})
_CONTROL_OPS = frozenset({"while", "conditional", "call"})  # their bodies' ops are traced
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class HloOp:
    opcode: str
    op_name: str
    calls: tuple[str, ...]  # computations a fusion (or call) runs


def parse_hlo(text: str) -> tuple[str, dict[str, HloOp], dict[str, list[str]]]:
    """(module name, instruction name -> HloOp, computation -> its instructions' names)."""
    module = re.search(r"^HloModule\s+([\w.\-]+)", text, re.M)
    ops: dict[str, HloOp] = {}
    computations: dict[str, list[str]] = collections.defaultdict(list)
    current = ""
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head and " = " not in line:
            current = head.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, rest = m.groups()
        opcode = _OPCODE.search(rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.findall(r"(?:calls|to_apply|body)=%?([\w.\-]+)", rest)
        ops[name] = HloOp(
            opcode.group(1) if opcode else "", op_name.group(1) if op_name else "", tuple(calls)
        )
        computations[current].append(name)
    return (module.group(1) if module else ""), ops, computations


def _kind(op: HloOp, ops: dict[str, HloOp], computations: dict[str, list[str]]) -> str:
    """matmul (contains a dot), move (only data movement) or other."""
    opcodes, todo, seen = set(), [op], set()
    while todo:
        o = todo.pop()
        if o.calls and o.opcode in ("fusion", "call"):
            for c in o.calls:
                if c not in seen:
                    seen.add(c)
                    todo += [ops[n] for n in computations.get(c, ())]
        else:
            opcodes.add(o.opcode)
    opcodes -= _FREE_OPS
    if opcodes & _MATMUL_OPS:
        return "matmul"
    return "move" if opcodes and opcodes <= _MOVE_OPS else "other"


def xla_category(op: HloOp, ops: dict[str, HloOp], computations: dict[str, list[str]]) -> str:
    scopes = op.op_name
    attention = re.search(r"\battend\b|BKGTS", scopes) is not None
    return category(scopes, "transpose(" in scopes, _kind(op, ops, computations), attention)


def xla_breakdown(fn: Callable[[], Any], compiled_text: str) -> Breakdown:
    """Runs `fn` (which calls the compiled program of `compiled_text` and blocks) once under a
    `jax.profiler` trace and sums its ops' durations by category."""
    from jax.profiler import ProfileData

    module, ops, computations = parse_hlo(compiled_text)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        wall = machine.time_once(fn)
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(path)
    seconds: dict[str, float] = collections.Counter()
    per_op: dict[str, float] = collections.Counter()
    cache: dict[str, str] = {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                name = stats.get("hlo_op")
                if stats.get("hlo_module") != module or name not in ops:
                    continue
                op = ops[name]
                if op.opcode in _CONTROL_OPS:
                    continue
                if name not in cache:
                    cache[name] = xla_category(op, ops, computations)
                seconds[cache[name]] += event.duration_ns * 1e-9
                per_op[name] += event.duration_ns * 1e-9
    top = [
        (t, name, f"{ops[name].opcode} [{cache[name]}] {ops[name].op_name}")
        for name, t in per_op.most_common()
    ]
    return Breakdown(dict(seconds), wall, "XLA:CPU per-op trace (jax.profiler)", top)


# ----------------------------------------------------------------------------- torch

_TORCH_MATMUL = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv"})
_TORCH_MOVES = frozenset({
    "aten::copy_", "aten::cat", "aten::index_select", "aten::embedding_dense_backward",
    "aten::index_add_", "aten::index_put_", "aten::_index_put_impl_", "aten::scatter_add_",
    "aten::gather", "aten::embedding", "aten::index", "aten::clone", "aten::contiguous",
    "aten::fill_", "aten::zero_", "aten::zeros", "aten::repeat_interleave", "aten::expand",
    "aten::transpose", "aten::as_strided", "aten::slice", "aten::select", "aten::view",
    "aten::reshape", "aten::t", "aten::unsqueeze", "aten::squeeze",
})  # fmt: skip


def torch_breakdown(fn: Callable[[], Any]) -> Breakdown:
    """Runs `fn` once under `torch.profiler` and sums every op's self time by category."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall = machine.time_once(fn)
    events = list(prof.events())
    # The forward op of each autograd sequence number: the first (outermost) one recorded.
    forward_of: dict[int, Any] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and not _is_backward(e):
            forward_of.setdefault(e.sequence_nr, e)
    seconds: dict[str, float] = collections.Counter()
    per_op: dict[str, float] = collections.Counter()
    for e in events:
        chain = _ancestors(e)
        root = chain[-1]
        backward = root.name.startswith("autograd::engine::evaluate_function")
        labels = [x.name for x in chain]
        if backward and root.sequence_nr in forward_of:
            labels += [x.name for x in _ancestors(forward_of[root.sequence_nr])]
        scopes = "/".join(labels)
        attention = "scaled_dot_product" in scopes.lower() or "ScaledDotProduct" in scopes
        kind = (
            "matmul" if e.name in _TORCH_MATMUL else "move" if e.name in _TORCH_MOVES else "other"
        )
        what = category(scopes, backward, kind, attention)
        seconds[what] += e.self_cpu_time_total * 1e-6
        per_op[f"{e.name} [{what}]"] += e.self_cpu_time_total * 1e-6
    top = [(t, name, "") for name, t in per_op.most_common()]
    return Breakdown(dict(seconds), wall, "torch.profiler self times", top)


def _is_backward(event) -> bool:
    return any(x.name.startswith("autograd::engine") for x in _ancestors(event))


def _ancestors(event) -> list:
    chain = [event]
    while chain[-1].cpu_parent is not None:
        chain.append(chain[-1].cpu_parent)
    return chain


# ----------------------------------------------------------------------------- report


def format_breakdowns(
    ours: Breakdown, theirs: Breakdown, names=("ttrl_jax", "theirs"), top: int = 0
) -> str:
    """The two breakdowns side by side, with ours/theirs per category, then each side's `top`
    costliest ops."""
    width = max(len(c) for c in CATEGORIES) + 2
    lines = [
        f"    {'where the time goes (one profiled call each)':<{width}}"
        f"{names[0]:>18}{names[1]:>18}{'ours/theirs':>13}"
    ]
    for c in CATEGORIES:
        a, b = ours.seconds.get(c, 0.0), theirs.seconds.get(c, 0.0)
        if a == b == 0:
            continue
        ratio = f"{a / b:.2f}" if b > 0 else "-"
        lines.append(
            f"    {c:<{width}}{a:>9.3f} s {a / ours.total:>4.0%}"
            f"{b:>10.3f} s {b / theirs.total:>4.0%}{ratio:>11}"
        )
    lines += [
        f"    {'sum of the ops':<{width}}{ours.total:>9.3f} s{'':>5}{theirs.total:>10.3f} s"
        f"{'':>5}{ours.total / theirs.total:>11.2f}",
        f"    {'wall time of the profiled call':<{width}}{ours.wall:>9.3f} s{'':>5}"
        f"{theirs.wall:>10.3f} s",
        f"    ({names[0]}: {ours.source}; {names[1]}: {theirs.source})",
    ]
    for name, b in zip(names, (ours, theirs)):
        if b.top[:top]:
            lines.append(f"    {name}'s {top} costliest ops:")
            lines += [f"      {t:8.3f} s  {op}  {what}"[:220] for t, op, what in b.top[:top]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a race


@dataclasses.dataclass
class Race:
    """Best times of ours and theirs, measured in turn, and where each one's time goes."""

    seconds: dict[str, float]  # "ttrl_jax", "transformers"
    breakdowns: tuple[Breakdown, Breakdown] | None
    load: str
    top: int = 0  # costliest ops listed per side

    @property
    def ratio(self) -> float:
        """Speed of ours over theirs (their time / ours)."""
        return self.seconds["transformers"] / self.seconds["ttrl_jax"]

    def rate_lines(self, work: float, unit: str, flops: dict[str, float], peak: float, indent):
        """One line per side: best time, work/s, FLOP/s and the fraction of the peak."""
        lines = []
        for name, seconds in self.seconds.items():
            rate = flops[name] / seconds
            lines.append(
                f"{indent}{name:>12}: {seconds:.3f} s -> {work / seconds:,.1f} {unit}/s, "
                f"{machine.si(rate, 'FLOP/s')} ({rate / peak:.0%} of peak)"
            )
        return lines + [f"{indent}{unit}/s ratio ttrl_jax / transformers: {self.ratio:.2f}x"]

    def tail_lines(self, indent: str) -> list[str]:
        """The time breakdown (when profiled) and the load during the timed runs."""
        lines = []
        if self.breakdowns is not None:
            names = ("ttrl_jax", "transformers")
            lines.append(format_breakdowns(*self.breakdowns, names, self.top))
        return lines + [f"{indent}load: {self.load}"]


def race(ours: Callable[[], Any], theirs: Callable[[], Any], ours_hlo: str, args) -> Race:
    """Times ours and theirs in turn (best of args.repeats after args.warmup more runs of each),
    then profiles one call of each unless args.profile is off."""
    say = lambda line: print(f"    ... {line}", flush=True)  # a long race is never silent
    if args.warmup:
        say(f"{args.warmup} untimed run(s) of each side, then {args.repeats} timed, in turn")
    probe = machine.LoadProbe().start()
    best = machine.time_best_interleaved(
        {"ttrl_jax": ours, "transformers": theirs},
        warmup=args.warmup,
        repeats=args.repeats,
        say=say,
    )
    probe.stop()
    breakdowns = None
    if args.profile:
        say("profiling one call of each side (slower than the timed runs)")
        breakdowns = (xla_breakdown(ours, ours_hlo), torch_breakdown(theirs))
    return Race(best, breakdowns, probe.describe(), args.top_ops)


def add_race_args(p, *, repeats: int, warmup: int) -> None:
    """--warmup, --repeats and --no-profile."""
    p.add_argument(
        "--warmup", type=int, default=warmup, help="untimed runs of each side before the timed"
    )
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs; the best is kept")
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the profiled run of each side (the time breakdown)",
    )
    p.add_argument(
        "--top-ops", type=int, default=0, metavar="N", help="also list each side's N costliest ops"
    )
