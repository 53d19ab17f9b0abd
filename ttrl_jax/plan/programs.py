"""The programs the plan compiles: a config's model and batch shapes, and the sampler and the
train step as a run builds them (run/from_config.py), jitted, with abstract (sharded,
data-free) arguments.

Everything here follows from shapes and shardings alone; nothing touches a device or the network.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import Config, ConfigError
from ttrl_jax.hf import gguf
from ttrl_jax.hf import load as weights
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model import lora as lora_lib
from ttrl_jax.model.config import PRESETS_HF, ModelConfig, preset
from ttrl_jax.rl import train as train_lib
from ttrl_jax.rl.batch import StepBatch
from ttrl_jax.run import from_config
from ttrl_jax.sampling import sampler as sampler_lib
from ttrl_jax.sampling import token_draw

# Hub ids whose config.json matches a preset in every field that sets a tensor shape (vocab,
# layers, widths, heads, biases, norms, tied embeddings); memory depends on nothing else.
SAME_SHAPES_AS = {
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",  # differs in eos ids only
    "Qwen/Qwen2.5-7B": "Qwen/Qwen2.5-Math-7B",  # differs in rope_theta and context length
}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The batch the plan compiles for."""

    prompts: int  # P = data.batch_prompts
    n_vote: int  # N
    n_train: int  # M
    prompt_len: int  # T: the bucket that holds data.max_prompt_tokens
    response_len: int  # R = sample.max_new_tokens
    mini_batch_rows: int
    pass_prompts: int  # prompts the sampler decodes at once (sample.prompt_chunk, or all)


def model_config(cfg: Config) -> ModelConfig:
    """The ModelConfig of `cfg.model` from a preset, a local folder's config.json or a GGUF
    file's metadata (no network).

    Raises:
      ValueError: the model is a hub id that is no known preset; plan then needs a local folder
        holding its config.json.
    """
    name = config_lib.resolve_model_path(cfg.model.name_or_path)
    computes = model_settings(cfg)
    preset_name = SAME_SHAPES_AS.get(name, name)
    if preset_name in PRESETS_HF:
        return preset(preset_name, **computes)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return ModelConfig.from_hf(weights.read_hf_config(folder), **computes)
    if folder.suffix == ".gguf":  # its metadata alone, no conversion
        return gguf.model_config(folder, **computes)
    known = sorted([*PRESETS_HF, *SAME_SHAPES_AS])
    raise ValueError(
        f"model.name_or_path={cfg.model.name_or_path!r} is neither a local folder nor a known "
        f"preset ({', '.join(known)}); plan reads no network: download its config.json "
        f"(`hf download {name} config.json --local-dir DIR`) and pass model.name_or_path=DIR"
    )


def model_settings(cfg: Config) -> dict[str, Any]:
    """The model section's keys that are ModelConfig fields too (dtypes, remat, attention...),
    and its LoRA settings."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"lora"}
    section = dataclasses.asdict(cfg.model)
    settings = {k: v for k, v in section.items() if k in fields}
    return {**settings, "lora": from_config.lora_config(cfg.model.lora)}


def prompt_length(cfg: Config) -> int:
    """The padded length of the longest allowed prompt: the smallest bucket that holds it."""
    fitting = [b for b in cfg.sample.prompt_buckets if b >= cfg.data.max_prompt_tokens]
    if not fitting:
        raise ConfigError(
            f"no sample.prompt_buckets entry holds data.max_prompt_tokens="
            f"{cfg.data.max_prompt_tokens}; add a bucket >= {cfg.data.max_prompt_tokens}"
        )
    return min(fitting)


def plan_shapes(cfg: Config) -> Shapes:
    """The batch a config's step runs on, at its largest prompt bucket."""
    return Shapes(
        prompts=cfg.data.batch_prompts,
        n_vote=cfg.sample.n_vote,
        n_train=cfg.sample.n_train,
        prompt_len=prompt_length(cfg),
        response_len=cfg.sample.max_new_tokens,
        mini_batch_rows=cfg.optim.mini_batch_prompts * cfg.sample.n_train,
        pass_prompts=min(cfg.sample.prompt_chunk or cfg.data.batch_prompts, cfg.data.batch_prompts),
    )


def with_settings(cfg: Config, settings: dict[str, Any]) -> Config:
    """`cfg` with dotted keys replaced, e.g. {"optim.micro_batch_size": 8}."""
    for key, value in settings.items():
        section, leaf = key.split(".")
        cfg = dataclasses.replace(
            cfg, **{section: dataclasses.replace(getattr(cfg, section), **{leaf: value})}
        )
    return cfg


def has_key(cfg: Config, key: str) -> bool:
    section, leaf = key.split(".")
    return leaf in {f.name for f in dataclasses.fields(getattr(cfg, section))}


def micro_batch_candidates(mini_batch_rows: int, data_axis: int) -> list[int]:
    """optim.micro_batch_size values the step accepts, descending: divisors of the mini-batch
    rows that split evenly over the data axis."""
    return [
        r for r in range(mini_batch_rows, 0, -1) if mini_batch_rows % r == 0 and r % data_axis == 0
    ]


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def abstract(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` placed as `shardings` (a pytree of the same structure)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _in_dtype(tree: Any, dtype: str) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding), tree
    )


def replicated_like(tree: Any, mesh: Mesh) -> Any:
    rep = sharding_lib.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)


def abstract_key(mesh: Mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding_lib.replicated(mesh))


def params_abstract(mcfg: ModelConfig, mesh: Mesh, rules: sharding_lib.Rules) -> Any:
    """The params as sharded ShapeDtypeStructs under one rules table."""
    shapes = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
    return abstract(shapes, model_lib.param_shardings(mcfg, mesh, rules))


def prompts_abstract(shapes: Shapes, mesh: Mesh) -> tuple[Any, Any]:
    """The left-padded prompt tokens and mask, rows over the data axis."""
    rows = sharding_lib.batch_sharding(mesh, 2, sharding_lib.SAMPLE_RULES)
    P, T = shapes.prompts, shapes.prompt_len
    return (
        jax.ShapeDtypeStruct((P, T), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((P, T), jnp.bool_, sharding=rows),
    )


def n_params(mcfg: ModelConfig) -> int:
    return model_lib.count_params(
        jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
    )


def n_trained(mcfg: ModelConfig) -> int:
    """Parameters the step trains: all, or with LoRA the adapters'."""
    return model_lib.count_params(train_lib.trained_shapes(mcfg))


def kv_cache_bytes(mcfg: ModelConfig, shapes: Shapes, mesh: Mesh) -> int:
    """Per-device bytes of the sampler's caches: the P prompts' keys and values (shared by their
    N samples) and the responses' own (R - 1 slots) of the prompts of one pass, in the compute
    dtype.

    Rows split over the data axis; kv heads over the model axis, except that a device keeps
    the K / gcd(K, M) kv heads its query heads read when they do not divide it (the sample
    rules replicate them, and the partitioner drops the ones a device never reads).
    """
    L, K, H = mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim
    D, M = sharding_lib.data_size(mesh), sharding_lib.model_size(mesh)
    P, T, B = shapes.prompts, shapes.prompt_len, shapes.pass_prompts * shapes.n_vote
    slots = -(-P // D) * T + -(-B // D) * max(shapes.response_len - 1, 1)
    return 2 * L * slots * (K // math.gcd(K, M)) * H * jnp.dtype(mcfg.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class TrainInputs:
    """The train step's arguments as sharded ShapeDtypeStructs."""

    state: train_lib.TrainState  # with LoRA: the adapters'
    ref_params: Any  # None without KL; with LoRA the frozen base
    batch: StepBatch


def train_inputs(cfg: Config, mcfg: ModelConfig, shapes: Shapes, mesh: Mesh, tx) -> TrainInputs:
    """The train step's state, reference params and rollout batch as sharded abstract values."""
    params = train_lib.trained_shapes(mcfg)
    state_shapes = jax.eval_shape(lambda p: train_lib.init_state(p, tx), params)
    state = abstract(state_shapes, train_lib.state_shardings(mcfg, tx, mesh))
    if mcfg.lora is not None:  # the frozen base in its storage dtype (job.build)
        base = params_abstract(mcfg, mesh, sharding_lib.TRAIN_RULES)
        ref = _in_dtype(base, from_config.base_dtype(cfg))
    elif cfg.optim.kl_coef > 0:  # the run keeps the reference in the compute dtype (job.build)
        ref = _in_dtype(state.params, mcfg.dtype)
    else:
        ref = None
    P, N, T, R = shapes.prompts, shapes.n_vote, shapes.prompt_len, shapes.response_len

    def rows(shape, dtype):
        sh = sharding_lib.batch_sharding(mesh, len(shape), sharding_lib.TRAIN_RULES)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    batch = StepBatch(
        prompt_PT=rows((P, T), jnp.int32),
        prompt_mask_PT=rows((P, T), jnp.bool_),
        response_PNR=rows((P, N, R), jnp.int32),
        response_mask_PNR=rows((P, N, R), jnp.bool_),
        logp_PNR=rows((P, N, R), jnp.float32),
        entropy_PNR=rows((P, N, R), jnp.float32),
        answer_id_PN=rows((P, N), jnp.int32),
        gold_id_P=rows((P,), jnp.int32),
    )
    return TrainInputs(state=state, ref_params=ref, batch=batch)


def resident_bytes(inputs: TrainInputs, lora: bool = False) -> dict[str, int]:
    """What stays on every device through both phases: params (or LoRA adapters), optimizer
    state, reference (or the frozen base, which is the reference too)."""
    return {
        "LoRA adapters" if lora else "params": shard_bytes(inputs.state.params),
        "optimizer state": shard_bytes(inputs.state.opt_state) + shard_bytes(inputs.state.step),
        "frozen base (KL reference)" if lora else "reference params (KL)": shard_bytes(
            inputs.ref_params
        ),
    }


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function and its abstract arguments, plus the argument bytes known by name."""

    jitted: Any
    args: tuple[Any, ...]
    known: dict[str, int]  # per-device argument bytes by category


def sample_program(
    cfg: Config,
    mcfg: ModelConfig,
    mesh: Mesh,
    max_new_tokens: int | None = None,
) -> Program:
    """The rollout sampler with the train state resident: arguments it never reads, as in a run,
    where the state waits on the devices while the sampler runs on a copy of the params in the
    sample layout and the compute dtype.

    Args:
      max_new_tokens: overrides sample.max_new_tokens (the time estimate's prefill: 1).
    """
    shapes = plan_shapes(cfg)
    inputs = train_inputs(cfg, mcfg, shapes, mesh, from_config.optimizer(cfg.optim, 1000)[0])
    # The run samples from a copy in the compute dtype and the sample layout (job.sample_params),
    # which is the state's own params when both already match.
    # With LoRA that copy is the base and the adapters merged (job.sample_params), always new.
    sample_params = _in_dtype(params_abstract(mcfg, mesh, sharding_lib.SAMPLE_RULES), mcfg.dtype)
    same_layout = mcfg.lora is None and all(
        a.sharding.is_equivalent_to(b.sharding, len(a.shape)) and a.dtype == b.dtype
        for a, b in zip(jax.tree.leaves(inputs.state.params), jax.tree.leaves(sample_params))
    )
    stop_ids = from_config.stop_ids(mcfg, cfg.sample.stop_token_ids)
    new_tokens = max_new_tokens or shapes.response_len
    sampler = sampler_lib.compiled_sampler(
        mcfg, shapes.n_vote, new_tokens, stop_ids, 0, mesh, cfg.sample.prompt_chunk,
        halvings=cfg.sample.halvings,
    )  # fmt: skip

    def phase(state, ref_params, params, prompt_PT, mask_PT, key, sampling):
        params = state.params if params is None else params
        return sampler(params, prompt_PT, mask_PT, key, sampling)

    args = (
        inputs.state,
        inputs.ref_params,
        None if same_layout else sample_params,
        *prompts_abstract(shapes, mesh),
        abstract_key(mesh),
        replicated_like(jax.eval_shape(token_draw.SamplingParams.make), mesh),
    )
    known = {
        **resident_bytes(inputs, mcfg.lora is not None),
        "sampler params": 0 if same_layout else shard_bytes(sample_params),
    }
    return Program(jax.jit(phase, keep_unused=True), args, known)


def train_program(
    cfg: Config, mcfg: ModelConfig, mesh: Mesh, logit_chunk: int | None = None
) -> Program:
    """The train step with its state donated, for cfg's micro-batch.

    Args:
      logit_chunk: overrides StepConfig.logit_chunk (the time estimate's: the whole response).
    """
    shapes = plan_shapes(cfg)
    # The schedule's length changes no shape: any step count compiles the same program.
    parts = from_config.train_parts(cfg, total_steps=1000)
    step_cfg = parts.step_cfg
    if logit_chunk is not None:
        step_cfg = dataclasses.replace(step_cfg, logit_chunk=logit_chunk)
    inputs = train_inputs(cfg, mcfg, shapes, mesh, parts.tx)
    state_sh = jax.tree.map(lambda x: x.sharding, inputs.state)
    ref_sh = (
        None if inputs.ref_params is None else jax.tree.map(lambda x: x.sharding, inputs.ref_params)
    )
    step = train_lib.build_train_step(mcfg, step_cfg, parts.tx, parts.lr_fn, mesh, state_sh, ref_sh)
    # The caller holds the whole rollout batch through the step: keep the arguments the step
    # never reads (the rollout log-probs it recomputes) in the program's accounting.
    jitted = jax.jit(lambda *a: step(*a), keep_unused=True, donate_argnums=0)
    hyper = replicated_like(jax.eval_shape(train_lib.StepHyper.make), mesh)
    args = (inputs.state, inputs.ref_params, inputs.batch, abstract_key(mesh), hyper)
    known = {
        **resident_bytes(inputs, mcfg.lora is not None),
        "rollout batch": shard_bytes(inputs.batch),
    }
    return Program(jitted, args, known)


def merge_program(cfg: Config, mcfg: ModelConfig, mesh: Mesh) -> tuple[Any, tuple]:
    """LoRA: the merge of the frozen base and the adapters into the sampler's params (in the
    sample layout and compute dtype), once per step (job.sample_params)."""
    inputs = train_inputs(cfg, mcfg, plan_shapes(cfg), mesh, from_config.optimizer(cfg.optim, 1)[0])
    out = model_lib.param_shardings(mcfg, mesh, sharding_lib.SAMPLE_RULES)
    merge = lambda base, adapters: lora_lib.merge(mcfg, base, adapters, mcfg.dtype)
    return jax.jit(merge, out_shardings=out), (inputs.ref_params, inputs.state.params)
