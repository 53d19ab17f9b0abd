"""The plan's reports (text, a README markdown table, JSON) and its command line.

python -m ttrl_jax.plan --config configs/qwen2.5-math-7b_aime24.yaml --tpu v5e-16 [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import ConfigError
from ttrl_jax.plan import search as plan_lib
from ttrl_jax.plan import tpu as tpu_lib

GIB = tpu_lib.GIB


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f}"


def overrides(settings: dict[str, Any]) -> str:
    """Config overrides as a run takes them: `model.remat=block optim.micro_batch_size=8`."""
    return " ".join(
        f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items()
    )


def _phase_verdict(name: str, total: int | None, refused: str, usable: int) -> str | None:
    """Why a phase does not fit, or None when it does."""
    if refused and total is None:
        return f"{name}: the compiler refuses it ({refused})"
    if total is None or total <= usable:
        return None
    return f"{name} needs {gib(total)} GiB per device, {gib(total - usable)} GiB over"


def shortfall(plan) -> str:
    """Why the plan does not fit, by how much, and what would (empty when it fits)."""
    usable = plan.usable_bytes
    reasons = [
        r
        for r in (
            _phase_verdict("sampling", plan.sample.total, plan.sample.memory.refused, usable),
            _phase_verdict("training", plan.train.total, plan.train.memory.refused, usable),
        )
        if r
    ]
    if not reasons:
        return ""
    s = plan.slice
    ratio = (plan.peak or 2 * usable) / usable
    larger = [
        name
        for name in tpu_lib.known_slices()
        if name.startswith(s.generation + "-") and tpu_lib.slice_spec(name).chips >= s.chips * ratio
    ]
    more = f"a slice with ~{ratio:.1f}x the chips ({larger[0]})" if larger else "more chips"
    return "; ".join(reasons) + f"; what would fit: {more}, or fewer prompts per rollout"


def _seconds(plan) -> str:
    t = plan.time
    if t is None:
        return "estimated seconds: not computed (--no-time)"
    merge = f"LoRA merge {t.merge_s:.2f} s + " if t.merge_s else ""
    return (
        f"estimated seconds per step, per device (XLA cost analysis at peak rates, a lower "
        f"bound): sampling {t.sample_s:.1f} s ({merge}prefill {t.prefill_s:.2f} s + {t.passes} "
        f"pass(es) x {t.decode_steps} decode steps x {t.decode_step_s * 1e3:.1f} ms), training "
        f"{t.train_s:.1f} s "
        f"({t.updates} updates x {t.update_s:.2f} s + {t.rows_per_device} rows per device x "
        f"{t.row_s:.2f} s)"
    )


def format_text(plan) -> str:
    """A plain-text report of one plan."""
    s, sh, (D, M) = plan.slice, plan.shapes, plan.mesh
    compiler = "XLA:TPU" if plan.compiler == "tpu" else "XLA:CPU (fallback)"
    out = [
        f"plan: {plan.config or plan.model}  model {plan.model} ({_count(plan.n_params)} params)"
        + _lora(plan),
        f"slice {s.name}: {s.chips} chips of {gib(s.hbm_bytes)} GiB HBM; mesh {D}x{M} "
        f"(data x model); compiled by {compiler}",
        *([f"note: {plan.compiler_note}"] if plan.compiler_note else []),
        f"batch: {sh.prompts} prompts x {sh.n_vote} samples, prompt {sh.prompt_len} + response "
        f"{sh.response_len} tokens; {sh.n_train} trained per prompt, mini-batch "
        f"{sh.mini_batch_rows} rows",
        f"planned with: {overrides(plan.settings)}"
        + (f"  (changed from the config: {overrides(plan.changed)})" if plan.changed else ""),
        "",
        f"{'per device (GiB)':<30}{'sampling':>10}{'training':>10}",
    ]
    names = list(dict.fromkeys([*plan.sample.parts, *plan.train.parts]))
    for name in names:
        a, b = (p.parts.get(name) for p in (plan.sample, plan.train))
        out.append(
            f"{name:<30}{'-' if a is None else gib(a):>10}{'-' if b is None else gib(b):>10}"
        )
    out += [
        f"{'total':<30}{gib(plan.sample.total):>10}{gib(plan.train.total):>10}",
        f"{f'usable (HBM less {plan.headroom:.0%})':<30}{gib(plan.usable_bytes):>10}",
        "",
        "verdict: "
        + (
            f"fits ({gib(plan.peak)} GiB of {gib(plan.usable_bytes)} usable)"
            if plan.fits
            else "does NOT fit: " + shortfall(plan)
        ),
        "micro-batch (optim.micro_batch_size rows -> train-phase GiB): "
        + (
            ", ".join(f"{r}: {gib(b)}" for r, b in sorted(plan.micro_batches.items(), reverse=True))
            or "-"
        ),
        f"largest micro-batch that fits: {plan.micro_batch if plan.micro_batch else 'none'}",
        _seconds(plan),
    ]
    return "\n".join(out)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**8 else f"{n / 1e6:.1f} M" if n >= 10**6 else f"{n:,}"


def _lora(plan) -> str:
    """ "; LoRA rank 16 (alpha 32) on q,k,v,...: 40.4 M trained (0.53 %)", or "" without LoRA."""
    lora = plan.lora
    if not lora:
        return ""
    share = plan.trained_params / plan.n_params
    return (
        f"; LoRA rank {lora['rank']} (alpha {lora['alpha']:g}) on {','.join(lora['targets'])}: "
        f"{_count(plan.trained_params)} trained ({share:.2%})"
    )


def to_json(plan) -> dict[str, Any]:
    """The plan as one JSON-ready object."""
    t = plan.time
    return {
        "config": plan.config,
        "model": plan.model,
        "n_params": plan.n_params,
        "trained_params": plan.trained_params,
        "lora": plan.lora,
        "tpu": plan.slice.name,
        "chips": plan.slice.chips,
        "mesh": f"{plan.mesh[0]}x{plan.mesh[1]}",
        "compiler": plan.compiler,
        "compiler_note": plan.compiler_note,
        "fits": plan.fits,
        "sample_gib": None if plan.sample.total is None else plan.sample.total / GIB,
        "train_gib": None if plan.train.total is None else plan.train.total / GIB,
        "sample_refused": plan.sample.memory.refused,
        "train_refused": plan.train.memory.refused,
        "hbm_gib": plan.slice.hbm_bytes / GIB,
        "usable_gib": plan.usable_bytes / GIB,
        "headroom": plan.headroom,
        "micro_batch": plan.micro_batch,
        "micro_batches_gib": {
            str(r): None if b is None else b / GIB for r, b in sorted(plan.micro_batches.items())
        },
        "settings": plan.settings,
        "changed": plan.changed,
        "shortfall": shortfall(plan),
        "est_sample_s": None if t is None else t.sample_s,
        "est_train_s": None if t is None else t.train_s,
        "est_detail": None if t is None else dataclasses.asdict(t),
    }


def summary_markdown(plans: Sequence[Any]) -> str:
    """One README table row per plan: the verdict, the settings it needs, memory and seconds."""
    out = [
        "| model | slice, mesh | fits | micro-batch | planned with | GiB per device: sample / "
        "train (usable) | est. seconds: sample / train |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for p in plans:
        t = p.time
        secs = "-" if t is None else f"{t.sample_s:.0f} / {t.train_s:.0f}"
        verdict = "yes" if p.fits else f"no: {shortfall(p)}"
        lora = p.lora
        name = p.model.split("/")[-1] + (f", LoRA rank {lora['rank']}" if lora else "")
        out.append(
            f"| {name} | {p.slice.name}, {p.mesh[0]}x{p.mesh[1]} | {verdict} | "
            f"{p.micro_batch or '-'} | {overrides(p.changed) or 'the config'} | "
            f"{gib(p.sample.total)} / {gib(p.train.total)} ({gib(p.usable_bytes)}) | {secs} |"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------- command line


def use_fake_cpu_devices(count: int) -> None:
    """Compile-only: JAX on the CPU (TPU programs compile for abstract devices), with `count`
    CPU devices for the XLA:CPU fallback; effective only before JAX starts its backend."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def main(argv: Sequence[str] | None = None) -> list[Any]:
    """Command line: plans configs on TPU slices and prints the reports."""
    ap = argparse.ArgumentParser(
        prog="python -m ttrl_jax.plan",
        description=plan_lib.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", action="append", required=True, help="YAML run config (repeatable)")
    ap.add_argument(
        "--tpu",
        action="append",
        required=True,
        help=f"TPU slice as rented (repeatable): {', '.join(tpu_lib.known_slices())}",
    )
    ap.add_argument("--mesh", default=None, help="DxM (data x model); default: chosen per model")
    ap.add_argument(
        "--headroom", type=float, default=plan_lib.DEFAULT_HEADROOM, help="HBM share left unplanned"
    )
    ap.add_argument("--no-search", action="store_true", help="plan the config as it is")
    ap.add_argument("--no-time", action="store_true", help="skip the seconds estimate")
    ap.add_argument("--json", action="store_true", help="print one JSON object per plan")
    ap.add_argument("--markdown", action="store_true", help="end with a README table")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. sample.n_vote=32")
    args = ap.parse_args(argv)

    try:
        slices = [tpu_lib.slice_spec(name) for name in args.tpu]
    except ValueError as err:
        ap.error(str(err))
    use_fake_cpu_devices(max(s.chips for s in slices))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    plans = []
    for path in args.config:
        try:
            cfg = config_lib.load_config(path, args.overrides)
        except ConfigError as err:
            raise SystemExit(str(err)) from None
        for s in slices:
            try:
                plan = plan_lib.make_plan(
                    cfg, s.name, args.mesh, headroom=args.headroom, search=not args.no_search,
                    estimate_time=not args.no_time, config_name=Path(path).name, log=log,
                )  # fmt: skip
            except ValueError as err:  # ConfigError too: messages that name the fix
                raise SystemExit(f"plan {Path(path).name} on {s.name}: {err}") from None
            plans.append(plan)
            print(json.dumps(to_json(plan)) if args.json else format_text(plan) + "\n", flush=True)
    if args.markdown:
        print(summary_markdown(plans))
    return plans
