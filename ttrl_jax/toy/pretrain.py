"""Pretrains the built-in toy model and writes it as an HF folder (config.json, safetensors).

    python -m ttrl_jax.toy.pretrain --out ttrl_jax/toy/model

or, keeping the clean model as its own folder (how the shipped one was made, same weights):

    python -m ttrl_jax.toy.pretrain --out /tmp/toy-clean --slip-steps 0
    python -m ttrl_jax.toy.pretrain --init /tmp/toy-clean --clean-steps 0 --out ttrl_jax/toy/model

Two phases of next-token cross-entropy on the responses of chat-formatted toy chains
(ttrl_jax.toy.task): first clean chains, where the model learns the arithmetic, then a short
fine-tune on chains of which a fraction carry one random slip. The slips are what make the
model useful for TTRL: a model trained only on clean chains makes the same mistake in every
sample, so its majority vote adds nothing; after the slip phase its wrong answers scatter and
the vote over many samples is right more often than one sample. The test split the default
run votes on (`data.TOY_TEST_SEED`) is excluded from both phases.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttrl_jax.data import benchmarks as data_lib
from ttrl_jax.data import prompts as prompts_lib
from ttrl_jax.data import toy_task as task
from ttrl_jax.hf import export as hf_export
from ttrl_jax.hf import layout as hf_layout
from ttrl_jax.hf import load as weights
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.run import evaluate as evaluate_lib
from ttrl_jax.run import rollout as rollout_lib
from ttrl_jax.toy import tokenizer as toy_tokenizer

# Shape suffixes: ttrl_jax/__init__.py (not in the docstring above, which is the --help).

# Every test-split question the default run could use (test_split(seed, n)[:k] equals
# test_split(seed, k)), so larger eval sets stay unseen too.
EXCLUDED_TEST_PROMPTS = 4096


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained model; the defaults made the shipped one."""

    seed: int = 0
    # Architecture (qwen2 type, vocabulary of the toy tokenizer).
    embed_dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_dim: int = 384
    max_position_embeddings: int = 256
    # Phase 1: clean chains.
    clean_steps: int = 2000
    clean_lr: float = 2e-3
    # Phase 2: chains with slips.
    slip_steps: int = 300
    slip_lr: float = 3e-4
    slip_prob: float = 0.6
    # Both phases.
    batch_size: int = 64
    min_chain: int = 1
    max_chain: int = 6
    warmup_steps: int = 50
    weight_decay: float = 0.01
    log_every: int = 50

    def model_config(self) -> ModelConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not a multiple of num_heads={self.num_heads}"
            )
        return ModelConfig(
            model_type="qwen2",
            vocab_size=toy_tokenizer.VOCAB_SIZE,
            num_layers=self.num_layers,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.embed_dim // self.num_heads,
            mlp_dim=self.mlp_dim,
            qkv_bias=True,
            tie_embeddings=True,
            max_position_embeddings=self.max_position_embeddings,
            eos_token_id=_token_id(toy_tokenizer.IM_END),
        )


def _token_id(token: str) -> int:
    return toy_tokenizer.build_tokenizer().convert_tokens_to_ids(token)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Batches:
    """One phase's examples, split into the prompt prefix they all share and the rest.

    Every chat prompt starts with the same system turn and "Start at ": that prefix (`prefix_T`)
    is run once per batch instead of once per row, which saves a third of the compute. Rows are
    grouped by chain length so a batch pads only to its own length (one compile per length).
    """

    prefix_T: np.ndarray  # int32
    rest_BR: list[np.ndarray]  # per batch: int32 tokens after the prefix, right-padded
    loss_mask_BR: list[np.ndarray]  # per batch: True where the *next* token is a response token


def excluded_prompts() -> set[str]:
    """The questions of the default run's unlabeled test split: never trained on."""
    rows = task.test_split(data_lib.TOY_TEST_SEED, EXCLUDED_TEST_PROMPTS)
    return {row["prompt"] for row in rows}


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for seq in seqs[1:]:
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return n


def make_batches(examples: Sequence[dict], tokenizer, batch_size: int, seed: int) -> Batches:
    """Tokenized batches of chat prompt + response + eos, in a seeded random order.

    Examples are bucketed by chain length; within a bucket they keep their order, and leftover
    rows (fewer than a batch) are dropped.
    """
    prompts = [prompts_lib.chat_prompt_text(ex["prompt"], tokenizer, None) for ex in examples]
    responses = [ex["response"] + toy_tokenizer.IM_END for ex in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    # Keep at least one prompt token in the rest: it predicts the first response token.
    n_prefix = min(_common_prefix_length(prompt_ids), min(len(p) for p in prompt_ids) - 1)
    buckets: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        buckets.setdefault(ex["response"].count("\n"), []).append(i)
    rest_BR, loss_mask_BR = [], []
    for rows in buckets.values():
        width = max(len(prompt_ids[i]) + len(response_ids[i]) for i in rows) - n_prefix
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            rest = np.full((batch_size, width), tokenizer.pad_token_id, np.int32)
            mask = np.zeros((batch_size, width), bool)
            for b, i in enumerate(rows[start : start + batch_size]):
                p, r = prompt_ids[i][n_prefix:], response_ids[i]
                rest[b, : len(p) + len(r)] = p + r
                mask[b, len(p) - 1 : len(p) + len(r) - 1] = True
            rest_BR.append(rest)
            loss_mask_BR.append(mask)
    order = np.random.default_rng(seed).permutation(len(rest_BR))
    return Batches(
        prefix_T=np.asarray(prompt_ids[0][:n_prefix], np.int32),
        rest_BR=[rest_BR[i] for i in order],
        loss_mask_BR=[loss_mask_BR[i] for i in order],
    )


def phase_batches(
    pc: PretrainConfig, tokenizer, steps: int, slip_prob: float, stream: int, exclude: set[str]
) -> Batches:
    """Fresh examples for every step of one phase (no example is seen twice)."""
    # Bucketing drops less than one batch per chain length; the margin keeps `steps` batches.
    n_lengths = pc.max_chain - pc.min_chain + 1
    examples = task.pretrain_examples(
        seed=pc.seed * 1000 + stream,
        n=(steps + n_lengths) * pc.batch_size,
        min_steps=pc.min_chain,
        max_steps=pc.max_chain,
        slip_prob=slip_prob,
        exclude=exclude,
    )
    batches = make_batches(examples, tokenizer, pc.batch_size, seed=pc.seed * 1000 + stream)
    return dataclasses.replace(
        batches, rest_BR=batches.rest_BR[:steps], loss_mask_BR=batches.loss_mask_BR[:steps]
    )


# ----------------------------------------------------------------------------- training


def next_token_loss(params, cfg, prefix_T, rest_BR, loss_mask_BR):
    """Mean cross-entropy of the masked next-token predictions of `prefix_T + rest_BR[b]`."""
    (T,), (B, R) = prefix_T.shape, rest_BR.shape
    # The shared prefix goes through the model once; its keys and values serve every row.
    cache = model_lib.init_cache(cfg, 1, T + R)
    _, cache = model_lib.forward(cfg, params, prefix_T[None], jnp.arange(T)[None], None, cache)
    cache = dataclasses.replace(
        cache,
        k_LBSKH=jnp.broadcast_to(
            cache.k_LBSKH, (cache.k_LBSKH.shape[0], B) + cache.k_LBSKH.shape[2:]
        ),
        v_LBSKH=jnp.broadcast_to(
            cache.v_LBSKH, (cache.v_LBSKH.shape[0], B) + cache.v_LBSKH.shape[2:]
        ),
        valid_BS=jnp.broadcast_to(cache.valid_BS, (B, T + R)),
    )
    positions_BR = jnp.broadcast_to(T + jnp.arange(R), (B, R))
    # Right padding: real tokens never attend to the padding after them (causality).
    logits_BRV, _ = model_lib.forward(cfg, params, rest_BR, positions_BR, None, cache)
    target_BR = jnp.roll(rest_BR, -1, axis=1)
    ce_BR = optax.softmax_cross_entropy_with_integer_labels(logits_BRV, target_BR)
    weight_BR = loss_mask_BR.astype(jnp.float32)
    return (ce_BR * weight_BR).sum() / jnp.maximum(weight_BR.sum(), 1.0)


def lr_schedule(lr: float, steps: int, warmup: int, decay: bool) -> optax.Schedule:
    """Linear warmup, then constant or (decay=True) cosine decay to 10 % at `steps`."""
    warmup = max(min(warmup, steps - 1), 1)
    if not decay:
        return optax.warmup_constant_schedule(0.0, lr, warmup)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.1 * lr)


def build_update(cfg: ModelConfig, weight_decay: float):
    """The jitted AdamW update; the learning rate is an argument, so phases share compiles."""
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(),
        optax.add_decayed_weights(weight_decay),
    )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, lr, prefix_T, rest_BR, loss_mask_BR):
        loss, grads = jax.value_and_grad(next_token_loss)(
            params, cfg, prefix_T, rest_BR, loss_mask_BR
        )
        direction, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, d: p - lr * d, params, direction)
        return params, opt_state, loss

    return tx, update


def run_phase(
    name: str, params, update, tx, batches: Batches, lr: float, decay: bool, pc: PretrainConfig
):
    """One AdamW update per batch, from a fresh optimizer state."""
    steps = len(batches.rest_BR)
    if steps == 0:
        return params
    schedule = lr_schedule(lr, steps, pc.warmup_steps, decay)
    opt_state = tx.init(params)
    prefix_T = jnp.asarray(batches.prefix_T)
    t0, losses = time.perf_counter(), []
    for step, (rest, mask) in enumerate(zip(batches.rest_BR, batches.loss_mask_BR)):
        lr_now = jnp.asarray(schedule(step), jnp.float32)
        params, opt_state, loss = update(params, opt_state, lr_now, prefix_T, rest, mask)
        losses.append(loss)
        if (step + 1) % pc.log_every == 0 or step + 1 == steps:
            mean = float(np.mean(jax.device_get(losses)))
            losses = []
            print(
                f"[{name}] step {step + 1}/{steps}  loss {mean:.4f}  "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    return params


def pretrain(pc: PretrainConfig, init: str | Path | None = None) -> tuple[ModelConfig, dict]:
    """Both phases, from a random init or from the weights of the HF folder `init`.

    Deterministic given `pc` and `init`. Each phase starts a fresh optimizer and draws its data
    from its own settings only, so a folder written with `--slip-steps 0` and continued with
    `--init` and `--clean-steps 0` has the same weights as one run of both phases.

    Returns:
      (model config, params).
    """
    cfg = pc.model_config()
    tokenizer = toy_tokenizer.build_tokenizer()
    exclude = excluded_prompts()
    if init is None:
        params = model_lib.init_params(cfg, jax.random.key(pc.seed))
    else:
        init_cfg, params = weights.load_hf(init)
        if init_cfg != cfg:
            raise ValueError(
                f"--init {init} holds a model of another shape than these settings ask for: "
                f"{init_cfg} vs {cfg}. Pass the same --embed-dim/--num-layers/... it was made with."
            )
    print(
        f"model: {model_lib.count_params(params):,} params, D {cfg.embed_dim}, "
        f"L {cfg.num_layers}, heads {cfg.num_heads}/{cfg.num_kv_heads}, F {cfg.mlp_dim}",
        flush=True,
    )
    tx, update = build_update(cfg, pc.weight_decay)
    clean = phase_batches(pc, tokenizer, pc.clean_steps, 0.0, stream=0, exclude=exclude)
    params = run_phase("clean", params, update, tx, clean, pc.clean_lr, False, pc)
    slipped = phase_batches(pc, tokenizer, pc.slip_steps, pc.slip_prob, stream=1, exclude=exclude)
    params = run_phase("slips", params, update, tx, slipped, pc.slip_lr, True, pc)
    return cfg, params


def save(
    cfg: ModelConfig,
    params,
    out_dir: str | Path,
    pc: PretrainConfig,
    init: str | Path | None = None,
) -> Path:
    """The HF folder: weights, config.json, tokenizer files, generation and pretrain settings."""
    tokenizer = toy_tokenizer.build_tokenizer()
    hf_layout.check_tokenizer(tokenizer, cfg)
    out = hf_export.save_hf(params, cfg, out_dir, overwrite=True)
    toy_tokenizer.save_tokenizer(out)
    hf_config = json.loads((out / "config.json").read_text())
    hf_config["pad_token_id"] = tokenizer.pad_token_id
    hf_config["eos_token_id"] = tokenizer.eos_token_id
    hf_config.pop("bos_token_id", None)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    record = dataclasses.asdict(pc)
    if init is not None:
        record["init"] = json.loads((Path(init) / "pretrain_config.json").read_text())
    (out / "pretrain_config.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- measuring


def measure(
    cfg: ModelConfig,
    params,
    n_prompts: int = data_lib.TOY_TEST_SIZE,
    k: int = 16,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    seed: int = 0,
) -> dict[str, float]:
    """avg@k (pass@1), maj@k, pass@k and greedy accuracy on the default run's test split."""
    tokenizer = toy_tokenizer.build_tokenizer()
    items = task.test_split(data_lib.TOY_TEST_SEED, n_prompts)
    prompt_ids, items, _ = prompts_lib.build_prompts(items, tokenizer, None, 128, skip_long=False)
    generator = rollout_lib.Generator(
        cfg, tokenizer, (tokenizer.eos_token_id,), tokenizer.pad_token_id, (128,)
    )
    return evaluate_lib.evaluate(
        generator, params, prompt_ids, [it["answer"] for it in items], jax.random.key(seed),
        k=k, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
        batch_prompts=min(16, len(prompt_ids)),
    )  # fmt: skip


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> tuple[PretrainConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        prog="python -m ttrl_jax.toy.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default="ttrl_jax/toy/model", help="output HF folder (replaced)")
    ap.add_argument(
        "--eval-prompts",
        type=int,
        default=data_lib.TOY_TEST_SIZE,
        help="test-split prompts to measure pass@1 / maj@k on after training; 0 = skip",
    )
    ap.add_argument("--eval-k", type=int, default=16, help="samples per prompt for avg@k, maj@k")
    ap.add_argument(
        "--init",
        default=None,
        help="HF folder to start from instead of a random init (e.g. a clean-phase-only model, "
        "continued with --clean-steps 0)",
    )
    for field in dataclasses.fields(PretrainConfig):
        ap.add_argument(
            "--" + field.name.replace("_", "-"), type=type(field.default), default=field.default
        )
    args = ap.parse_args(argv)
    names = [f.name for f in dataclasses.fields(PretrainConfig)]
    pc = PretrainConfig(**{name: getattr(args, name) for name in names})
    return pc, args


def main(argv: Sequence[str] | None = None) -> Path:
    """Pretrains, saves the folder, then measures the saved model on the test split."""
    pc, args = parse_args(argv)
    print(f"{pc}\nload average at start: {os.getloadavg()[0]:.1f}", flush=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    cfg, params = pretrain(pc, args.init)
    out = save(cfg, params, args.out, pc, args.init)
    print(
        f"wrote {out} after {time.perf_counter() - wall0:.0f} s "
        f"({time.process_time() - cpu0:.0f} CPU-s; load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    if args.eval_prompts:
        cfg, params = weights.load_hf(out)
        metrics = measure(cfg, params, args.eval_prompts, args.eval_k)
        print(
            f"test split ({args.eval_prompts} prompts, temperature 1.0): "
            + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
