"""Run configuration: one frozen dataclass per section, YAML files and dotted overrides.

The dataclass defaults are the paper's settings (Qwen2.5-Math, arXiv 2504.16084, and the
upstream scripts); `configs/toy.yaml` holds the small built-in CPU run. A YAML file is a partial
`Config`; `key=value` overrides (`sample.n_vote=16`) are applied after it. OmegaConf does the
parsing and type checking; unknown keys, wrong types and inconsistent values raise `ConfigError`
naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ttrl_jax import data as data_lib
from ttrl_jax.answers import AnswerMode
from ttrl_jax.grpo import Reward
from ttrl_jax.model_config import Attention, Remat
from ttrl_jax.verifier import DEFAULT_TIMEOUT_S

TOY_MODEL = "toy"  # model.name_or_path for the tiny model shipped in ttrl_jax/toy/model
TOY_MODEL_DIR = Path(__file__).resolve().parent / "toy" / "model"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"

# Choices are types: each list of allowed values is written once (here, or beside the code that
# implements it: grpo.Reward, answers.AnswerMode) and OmegaConf checks values as it builds one.
Dtype = Literal["float32", "bfloat16"]
Select = Literal["random", "first"]
Schedule = Literal["cosine", "linear", "constant"]
LastBatch = Literal["drop", "wrap"]
_MESH_RE = re.compile(r"^(\d+)x(\d+)$")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


class _Problems(list):
    """Messages of a section's failed checks."""

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which checkpoint to load and the dtypes to run it in."""

    name_or_path: str = TOY_MODEL  # local HF folder, HF hub id, or "toy"
    revision: str | None = None  # hub revision (branch, tag or commit) when loading by id
    dtype: Dtype = "float32"  # compute dtype; "bfloat16" on TPU
    param_dtype: Dtype = "float32"  # master params and optimizer state
    # Recompute block activations in the backward pass, trading train-step compute for memory
    # (see `python -m ttrl_jax.plan` for whether a run needs it): false, true (= "block": keep
    # only each block's input) or what to keep: "attention", "dots_no_batch",
    # "dots_no_batch+attention", "dots" (model_config.REMAT_POLICIES).
    remat: bool | Remat = False
    # Attention maths: "auto" (the Pallas kernel on TPU, else plain or chunked by length),
    # "plain", "chunked" or "pallas" (see attention.py).
    attention: Attention = "auto"

    def problems(self) -> list[str]:
        out = _Problems()
        out.need(
            bool(self.name_or_path), "model.name_or_path is empty; give an HF id, a folder or 'toy'"
        )
        return out


@dataclasses.dataclass(frozen=True)
class SampleSection:
    """Rollout sampling for the vote and the update."""

    n_vote: int = 64  # responses per prompt for the majority vote
    n_train: int = 32  # of those, responses per prompt used in the update
    temperature: float = 1.0  # 1.0 for Qwen2.5-Math, 0.6 for instruct models
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    max_new_tokens: int = 3072
    # Padded prompt lengths; one compile per bucket used. The largest must hold
    # data.max_prompt_tokens.
    prompt_buckets: tuple[int, ...] = (128, 256, 512, 1024)
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end a response, besides the EOS ids

    def problems(self) -> list[str]:
        out = _Problems()
        out.need(self.n_vote >= 1, f"sample.n_vote={self.n_vote} must be at least 1")
        out.need(
            1 <= self.n_train <= self.n_vote,
            f"sample.n_train={self.n_train} must be between 1 and sample.n_vote={self.n_vote}",
        )
        out += _sampling_problems("sample", self)
        out.need(self.top_k >= 0, f"sample.top_k={self.top_k} must be >= 0 (0 = off)")
        out.need(0 <= self.min_p < 1, f"sample.min_p={self.min_p} must be in [0, 1)")
        buckets = list(self.prompt_buckets)
        out.need(
            len(buckets) > 0 and all(b >= 1 for b in buckets) and buckets == sorted(set(buckets)),
            f"sample.prompt_buckets={buckets} must be positive and strictly increasing",
        )
        out.need(all(i >= 0 for i in self.stop_token_ids), "sample.stop_token_ids must be >= 0")
        return out


def _sampling_problems(section: str, sec: SampleSection | EvalSection) -> list[str]:
    """Checks shared by the rollout and the evaluation sampling settings."""
    out = _Problems()
    out.need(sec.temperature >= 0, f"{section}.temperature={sec.temperature} must be >= 0")
    out.need(0 < sec.top_p <= 1, f"{section}.top_p={sec.top_p} must be in (0, 1]")
    out.need(sec.max_new_tokens >= 1, f"{section}.max_new_tokens must be at least 1")
    return out


@dataclasses.dataclass(frozen=True)
class TTRLSection:
    """How votes become rewards, and the follow-up variants (all off by default)."""

    # "majority" (TTRL) | "soft_frequency" (TTRV/SRT) | "self_certainty" | "evol_novelty"
    # (EVOL-RL: the majority anchor plus a novelty bonus within each side of the vote)
    reward: Reward = "majority"
    select: Select = "random"  # which n_train of the n_vote responses are trained on
    min_majority_ratio: float = 0.0  # SRT: skip prompts whose majority share is below this
    ettrl_alpha: float = 0.0  # ETTRL entropy-based advantage reshaping; 0 = off
    answer_mode: AnswerMode = "math"  # "math" (boxed expression) | "choice" (option letter)
    # "math" mode: a response with no \boxed{} and no "the answer is ..." answers with its last
    # number (instruct models that answer in free text: "9 + 8 equals 17.").
    last_number_fallback: bool = False
    answer_timeout_s: float = DEFAULT_TIMEOUT_S  # math-verify seconds per distinct answer

    def problems(self) -> list[str]:
        out = _Problems()
        out.need(
            0 <= self.min_majority_ratio <= 1,
            f"ttrl.min_majority_ratio={self.min_majority_ratio} must be in [0, 1]",
        )
        out.need(self.ettrl_alpha >= 0, f"ttrl.ettrl_alpha={self.ettrl_alpha} must be >= 0")
        out.need(
            self.answer_timeout_s > 0,
            f"ttrl.answer_timeout_s={self.answer_timeout_s} must be > 0",
        )
        return out


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """GRPO loss and AdamW; defaults are upstream TTRL's for 7B models."""

    lr: float = 5e-7
    warmup_ratio: float = 0.03  # fraction of the total steps
    schedule: Schedule = "cosine"  # after warmup
    min_lr_ratio: float = 0.0  # final lr / peak lr for cosine and linear
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0  # global-norm clip; None = off
    clip_low: float = 0.2  # PPO ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # > clip_low is "clip-higher" (DAPO)
    dual_clip: float | None = 3.0  # bound on the loss for negative advantages; None = off
    kl_coef: float = 0.001  # k3 KL to the initial policy; 0 = off (no reference pass)
    entropy_coef: float = 0.0  # entropy bonus
    # Prompts per optimizer update (each with its n_train responses); upstream: 1 prompt x 32
    # responses, so 8 updates per step of 8 prompts.
    mini_batch_prompts: int = 1
    micro_batch_size: int | None = None  # rows per gradient-accumulation pass; None = all

    def problems(self) -> list[str]:
        out = _Problems()
        out.need(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        out.need(
            0 <= self.warmup_ratio < 1, f"optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)"
        )
        out.need(
            0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"
        )
        out.need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
        out.need(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        out.need(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        out.need(
            self.grad_clip is None or self.grad_clip > 0,
            "optim.grad_clip must be > 0 or null (off)",
        )
        out.need(0 < self.clip_low < 1, f"optim.clip_low={self.clip_low} must be in (0, 1)")
        out.need(self.clip_high > 0, f"optim.clip_high={self.clip_high} must be > 0")
        out.need(
            self.dual_clip is None or self.dual_clip > 1,
            f"optim.dual_clip={self.dual_clip} must be > 1 or null (off)",
        )
        out.need(self.kl_coef >= 0, f"optim.kl_coef={self.kl_coef} must be >= 0")
        out.need(self.entropy_coef >= 0, f"optim.entropy_coef={self.entropy_coef} must be >= 0")
        out.need(self.mini_batch_prompts >= 1, "optim.mini_batch_prompts must be at least 1")
        return out


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh: axes (data, model)."""

    # "auto" = every device on the data axis; "DxM" e.g. "2x4" = data 2, model 4.
    shape: str = "auto"

    def data_size(self) -> int | None:
        """D of an explicit "DxM" shape; None for "auto" or a malformed shape."""
        match = _MESH_RE.match(self.shape)
        return int(match[1]) if match and int(match[1]) >= 1 and int(match[2]) >= 1 else None

    def size(self) -> int | None:
        """D x M of an explicit shape; None for "auto" or a malformed shape."""
        match = _MESH_RE.match(self.shape)
        return int(match[1]) * int(match[2]) if self.data_size() is not None else None

    def problems(self) -> list[str]:
        out = _Problems()
        out.need(
            self.shape == "auto" or self.data_size() is not None,
            f"mesh.shape={self.shape!r} must be 'auto' or DxM with D, M >= 1, e.g. 2x4",
        )
        return out


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The unlabeled prompts TTRL trains on, and the order they come in."""

    name: str = "toy"  # a benchmark name (data.BENCHMARK_NAMES)
    path: str | None = None  # local file or folder in the upstream TTRL format; wins over name
    split: str = "test"  # for a folder: which {split}.json/.jsonl/.parquet to read
    system_prompt: str | None = None  # None = the chat template's default system turn
    # The user turn: "{question}" is replaced by the question, e.g. "{question}\nLet's think
    # step by step and output the final answer within \boxed{}." (upstream's suffix for
    # instruct models).
    prompt_template: str = "{question}"
    enable_thinking: bool | None = None  # Qwen3 chat templates; None = template default
    max_prompt_tokens: int = 1024  # Qwen2.5-Math: 1024 + 3072 new tokens = its 4096 context
    skip_long_prompts: bool = False  # False: a longer prompt is an error
    batch_prompts: int = 8  # prompts per step; paper: 8 for AIME and AMC, 32 for MATH-500
    episodes: int = 10  # passes over the prompts; paper: AIME 80, AMC 30, MATH-500 10
    shuffle: bool = True  # a new order each episode
    # An episode's last partial batch: "drop" (upstream's drop_last; with shuffle a different
    # remainder sits out each episode) or "wrap" (it is completed from the next episode).
    last_batch: LastBatch = "drop"

    def problems(self) -> list[str]:
        out = _Problems()
        if self.path is None:
            out.need(
                self.name in data_lib.BENCHMARK_NAMES,
                f"data.name={self.name!r} is not a known benchmark "
                f"({', '.join(data_lib.BENCHMARK_NAMES)}); for a local file or folder set "
                "data.path",
            )
        out.need(bool(self.split), "data.split is empty")
        out.need(
            self.prompt_template.count("{question}") == 1,
            f"data.prompt_template={self.prompt_template!r} must hold '{{question}}' exactly once",
        )
        out.need(self.max_prompt_tokens >= 1, "data.max_prompt_tokens must be at least 1")
        out.need(
            self.batch_prompts >= 1, f"data.batch_prompts={self.batch_prompts} must be at least 1"
        )
        out.need(self.episodes >= 1, f"data.episodes={self.episodes} must be at least 1")
        return out


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Evaluation before training and every `every_steps` steps."""

    every_steps: int = 10  # 0 = only before training (if enabled) and at the end
    k: int = 16  # samples per prompt: avg@k (the paper's pass@1) and maj@k
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 3072
    greedy: bool = True  # also one greedy response per prompt
    before_training: bool = True
    benchmarks: tuple[str, ...] = ()  # extra benchmark names or paths evaluated alongside

    def problems(self) -> list[str]:
        out = _Problems()
        out += _sampling_problems("eval", self)
        out.need(
            self.every_steps >= 0, f"eval.every_steps={self.every_steps} must be >= 0 (0 = off)"
        )
        out.need(self.k >= 1, f"eval.k={self.k} must be at least 1")
        return out


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Output, seeding, checkpoints and logging."""

    out_dir: str = "runs/ttrl"
    seed: int = 0
    max_steps: int | None = None  # stop early; None = the whole schedule
    checkpoint_every: int = 50  # steps; 0 = only at the end (and by time, below)
    # Also checkpoint when this many minutes have passed since the last save; 0 = off. With it
    # a crash loses at most a few minutes, whatever checkpoint_every says.
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the latest intact checkpoint in out_dir
    # With resume: continue even though the config differs from the run's saved config.yaml
    # in a setting that alters the run.
    accept_config_change: bool = False
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "ttrl_jax"
    export_hf: bool = False  # write an HF folder (config.json + safetensors) at the end

    def problems(self) -> list[str]:
        out = _Problems()
        out.need(bool(self.out_dir), "run.out_dir is empty")
        out.need(self.seed >= 0, f"run.seed={self.seed} must be >= 0")
        out.need(
            self.max_steps is None or self.max_steps >= 1, "run.max_steps must be >= 1 or null"
        )
        out.need(
            self.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0 = only at the end)"
        )
        out.need(self.checkpoint_minutes >= 0, "run.checkpoint_minutes must be >= 0 (0 = off)")
        out.need(self.keep_checkpoints >= 1, "run.keep_checkpoints must be at least 1")
        return out


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    sample: SampleSection = dataclasses.field(default_factory=SampleSection)
    ttrl: TTRLSection = dataclasses.field(default_factory=TTRLSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)


# ----------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    device_count: int | None = None,
) -> Config:
    """Builds a Config from the defaults, an optional YAML file and `key=value` overrides.

    Args:
      path: a YAML file holding a partial Config (sections and keys as in the dataclasses);
        None = the dataclass defaults only (see `default_config_path` for the built-in run).
      overrides: dotted `section.key=value` strings applied in order after the file, values
        in YAML syntax (`sample.prompt_buckets=[128,256]`, `data.path=null`).
      device_count: the devices the run will have, to check an explicit mesh.shape against;
        None = unknown.

    Returns:
      The validated, frozen Config.

    Raises:
      ConfigError: missing or malformed file, unknown key, wrong type, or inconsistent values;
        the message names the key and the file or override it came from.
    """
    merged = OmegaConf.structured(Config)
    # A value outside its choices is recorded and the rest still merged, so that one error
    # lists every problem (as validation below does).
    bad_choices: list[str] = []
    if path is not None:
        merged = _merge(merged, _read_yaml(path), f"config file {os.fspath(path)}", bad_choices)
    for item in overrides:
        merged = _merge(merged, _parse_override(item), f"override '{item}'", bad_choices)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve '{e.full_key}': {_first_line(e.msg)}") from None
    problems = bad_choices + _problems(cfg, None, device_count)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def default_config_path() -> str:
    """The built-in CPU run's YAML (configs/toy.yaml in the source tree)."""
    if not DEFAULT_CONFIG.is_file():
        raise ConfigError(
            f"built-in config {DEFAULT_CONFIG} not found (an installation without the configs/ "
            "folder); pass --config with a YAML file."
        )
    return str(DEFAULT_CONFIG)


def resolve_model_path(name_or_path: str) -> str:
    """model.name_or_path as a loader argument: "toy" becomes the packaged folder."""
    return str(TOY_MODEL_DIR) if name_or_path == TOY_MODEL else name_or_path


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dicts and lists (no tuples), e.g. for logging hyperparameters."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML; `load_config(path)` gives it back."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _read_yaml(path: str | os.PathLike) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {os.fspath(path)} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"config file {os.fspath(path)} is not valid YAML: {e}") from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(
            f"config file {os.fspath(path)} must be a mapping of sections "
            f"({', '.join(_fields(Config))}), got a {type(loaded).__name__}"
        )
    return loaded


def _parse_override(item: str) -> Any:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override '{item}' is not of the form section.key=value (e.g. sample.n_vote=16)"
        )
    try:
        return OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        if _is_text_key(key.strip()):
            # Text such as "{question} Answer with a number." is not YAML; take it as written.
            return OmegaConf.create(_nested(key.strip(), value))
        raise ConfigError(f"override '{item}': cannot parse the value: {e}") from None


def _is_text_key(dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    cls = _section_class(parent)
    hint = typing.get_type_hints(cls).get(leaf) if cls is not None else None
    return hint in (str, str | None)


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(base: Any, update: Any, source: str, bad_choices: list[str]) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: {_unknown_key_message(e.full_key)}") from None
    except ValidationError as e:
        reason = _first_line(e.msg or e)
        if not e.full_key:
            scalars = [k for k, v in update.items() if not OmegaConf.is_dict(v)]
            if scalars:
                reason = (
                    f"'{scalars[0]}' is a section, not a value; set its keys instead, e.g. "
                    f"{scalars[0]}.{_fields(_section_class(str(scalars[0])) or Config)[0]}=..."
                )
            raise ConfigError(f"{source}: {reason}") from None
        allowed = _choices(e.full_key)
        if allowed:
            value = OmegaConf.select(update, e.full_key)
            bad_choices.append(f"{e.full_key}={value!r} is not one of {', '.join(allowed)}")
            parent, _, leaf = e.full_key.rpartition(".")
            del (OmegaConf.select(update, parent) if parent else update)[leaf]
            return _merge(base, update, source, bad_choices)
        if OmegaConf.is_dict(OmegaConf.select(update, e.full_key)):
            raise ConfigError(
                f"{source}: '{e.full_key}' is a value, not a section; set it directly"
            ) from None
        raise ConfigError(
            f"{source}: bad value for '{e.full_key}': {reason} "
            f"(expected {_expected_type(e.full_key)})"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_first_line(e.msg)}") from None


def _first_line(message: str) -> str:
    """OmegaConf appends full_key/object_type lines, which our messages already say better."""
    return str(message).split("\n", 1)[0].strip()


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section_class(dotted: str) -> type | None:
    """The dataclass at a dotted path ('' = Config), or None if it is a value or unknown."""
    cls: type = Config
    for part in filter(None, dotted.split(".")):
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return None
        cls = hints[part]
    return cls


def _unknown_key_message(full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    cls = _section_class(parent)
    if cls is None:
        return f"'{parent}' is a value, not a section, so '{full_key}' is not a valid key"
    valid = _fields(cls)
    close = difflib.get_close_matches(leaf, valid, n=1)
    if cls is Config:
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown section '{full_key}'.{hint} Valid sections: {', '.join(valid)}"
    hint = f" Did you mean '{parent}.{close[0]}'?" if close else ""
    return f"unknown key '{full_key}'.{hint} Valid keys of '{parent}': {', '.join(valid)}"


def _choices(full_key: str) -> tuple[str, ...]:
    """The allowed values of a Literal-typed key; () for any other key."""
    parent, _, leaf = full_key.rpartition(".")
    cls = _section_class(parent)
    hint = typing.get_type_hints(cls).get(leaf) if cls is not None else None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. bool | Literal[...]
        hint = next((h for h in typing.get_args(hint) if typing.get_origin(h) is Literal), None)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _expected_type(full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    cls = _section_class(parent)
    hint = typing.get_type_hints(cls).get(leaf) if cls is not None else None
    if hint is None:
        return "another type"
    return hint.__name__ if hint in (bool, int, float, str) else str(hint)


# ----------------------------------------------------------------------------- validation


def validate_config(cfg: Config, data_axis_size: int | None = None) -> None:
    """Checks values and cross-field constraints; raises one ConfigError listing every problem.

    Args:
      cfg: the config to check.
      data_axis_size: size of the mesh's data axis, for the divisibility checks; None = take it
        from an explicit `mesh.shape` (skipped for "auto" until the devices are known).
    """
    problems = _problems(cfg, data_axis_size)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def check_context_length(cfg: Config, max_position_embeddings: int) -> None:
    """Raises ConfigError if the longest prompt plus the longest response exceeds the context."""
    longest = cfg.data.max_prompt_tokens + max(cfg.sample.max_new_tokens, cfg.eval.max_new_tokens)
    if longest > max_position_embeddings:
        raise ConfigError(
            f"data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) + max_new_tokens "
            f"(sample {cfg.sample.max_new_tokens}, eval {cfg.eval.max_new_tokens}) = {longest} "
            f"exceeds the model's context of {max_position_embeddings} tokens; lower them"
        )


def _problems(
    cfg: Config, data_axis_size: int | None, device_count: int | None = None
) -> list[str]:
    """Every section's own checks, then the checks that span sections."""
    out = _Problems()
    size = cfg.mesh.size()
    if size is not None and device_count is not None and size != device_count:
        # Reported instead of the row divisibility checks, which assume this mesh.
        out.append(
            f"mesh.shape={cfg.mesh.shape!r} needs {size} devices but {device_count} are "
            f"available; choose D and M with D*M = {device_count} (or mesh.shape=auto)"
        )
        data_axis_size = -1
    for f in dataclasses.fields(cfg):
        out += getattr(cfg, f.name).problems()
    s, o, d = cfg.sample, cfg.optim, cfg.data
    if s.prompt_buckets:
        out.need(
            max(s.prompt_buckets) >= d.max_prompt_tokens,
            f"the largest of sample.prompt_buckets ({max(s.prompt_buckets)}) is smaller than "
            f"data.max_prompt_tokens ({d.max_prompt_tokens}); add a bucket >= "
            f"{d.max_prompt_tokens} or lower data.max_prompt_tokens",
        )
    if o.mini_batch_prompts >= 1 and d.batch_prompts >= 1:
        out.need(
            d.batch_prompts % o.mini_batch_prompts == 0,
            f"optim.mini_batch_prompts={o.mini_batch_prompts} must divide "
            f"data.batch_prompts={d.batch_prompts}",
        )
    mini_rows = o.mini_batch_prompts * s.n_train
    if o.micro_batch_size is not None:
        out.need(
            o.micro_batch_size >= 1 and mini_rows % o.micro_batch_size == 0,
            f"optim.micro_batch_size={o.micro_batch_size} must divide the rows of a mini-batch "
            f"(optim.mini_batch_prompts x sample.n_train = {mini_rows})",
        )
    if data_axis_size is None:
        data_axis_size = cfg.mesh.data_size()
    if d.batch_prompts >= 1 and data_axis_size is not None and data_axis_size > 0:
        _check_data_axis(out, cfg, data_axis_size)
    return out


def _check_data_axis(out: list[str], cfg: Config, size: int) -> None:
    """Batch dimensions are split evenly over the data axis."""
    rows = {
        "rollout rows (data.batch_prompts x sample.n_vote)": (
            cfg.data.batch_prompts * cfg.sample.n_vote
        ),
        "mini-batch rows (optim.mini_batch_prompts x sample.n_train)": (
            cfg.optim.mini_batch_prompts * cfg.sample.n_train
        ),
    }
    if cfg.optim.micro_batch_size is not None:
        rows["optim.micro_batch_size"] = cfg.optim.micro_batch_size
    for what, n in rows.items():
        if n % size:
            out.append(
                f"{what} = {n} is not divisible by the mesh's data axis ({size}); "
                "change the numbers or the mesh (mesh.shape / --mesh)"
            )
