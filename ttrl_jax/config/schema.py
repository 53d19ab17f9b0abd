"""The run configuration's schema: one frozen dataclass per section, and each section's checks.

The defaults are the paper's settings (Qwen2.5-Math, arXiv 2504.16084, and the upstream
scripts). Each section checks its own ranges in `problems()`; checks that span sections, and
reading YAML files and overrides, are load.py's.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

from ttrl_jax.data import benchmarks as data_lib
from ttrl_jax.grading.answers import AnswerMode
from ttrl_jax.grading.verifier import DEFAULT_TIMEOUT_S
from ttrl_jax.model.config import LORA_TARGETS, Attention, Remat
from ttrl_jax.rl import losses
from ttrl_jax.rl.rewards import Reward
from ttrl_jax.rl.vote_budget import VoteRule

TOY_MODEL = "toy"  # model.name_or_path for the tiny model shipped in ttrl_jax/toy/model
TOY_MODEL_DIR = Path(__file__).resolve().parents[1] / "toy" / "model"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"

# Choices are types: each list of allowed values is written once (here, or beside the code that
# implements it: rewards.Reward, answers.AnswerMode) and OmegaConf checks values as it builds one.
Dtype = Literal["float32", "bfloat16"]
BaseDtype = Literal["compute", "bfloat16"]
Select = Literal["random", "first"]
Schedule = Literal["cosine", "linear", "constant"]
LastBatch = Literal["drop", "wrap"]
# The label-free judgement's (run/judge.py, which sits above the config and reads them here).
KeepRule = Literal["last", "best"]
StopRule = Literal["off", "plateau"]
GuardAction = Literal["off", "lr", "rollback"]
OldLogp = Literal["auto", "recompute", "sampler"]
_MESH_RE = re.compile(r"^(\d+)x(\d+)$")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


class Problems(list):
    """Messages of a section's failed checks."""

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)

    def at_least(self, key: str, value: float, low: float, note: str = "") -> None:
        """`key` (e.g. "data.episodes") must be at least `low`; `note` says what the bound means."""
        self.need(value >= low, f"{key}={value} must be at least {low}{note}")


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """LoRA: train low-rank adapters on a frozen base instead of every weight (model/lora.py).

    Gradients and AdamW state exist for the adapters only (float32); the base is held once, in
    model.dtype or base_dtype, and serves as the KL reference with the adapters off. Checkpoints
    hold the adapters and a fingerprint of the base; run.export_hf writes the merged model and
    run.export_peft a PEFT adapter folder.
    """

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input, in the loss's forward only
    targets: tuple[str, ...] = LORA_TARGETS  # of q, k, v, o, gate, up, down
    # The frozen base's storage: "compute" = model.dtype; "bfloat16" also under float32 compute.
    base_dtype: BaseDtype = "compute"

    def problems(self) -> list[str]:
        out = Problems()
        out.at_least("model.lora.rank", self.rank, 0, " (0 = off)")
        out.need(self.alpha > 0, f"model.lora.alpha={self.alpha} must be > 0")
        out.need(0 <= self.dropout < 1, f"model.lora.dropout={self.dropout} must be in [0, 1)")
        targets = list(self.targets)
        out.need(
            bool(targets)
            and set(targets) <= set(LORA_TARGETS)
            and len(set(targets)) == len(targets),
            f"model.lora.targets={targets} must be distinct names from "
            f"{', '.join(LORA_TARGETS)} (at least one)",
        )
        return out


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which checkpoint to load and the dtypes to run it in."""

    name_or_path: str = TOY_MODEL  # local HF folder, HF hub id, .gguf file, or "toy"
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
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)

    def problems(self) -> list[str]:
        out = Problems()
        out.need(
            bool(self.name_or_path), "model.name_or_path is empty; give an HF id, a folder or 'toy'"
        )
        out += self.lora.problems()
        return out


@dataclasses.dataclass(frozen=True)
class SampleSection:
    """Rollout sampling for the vote and the update."""

    n_vote: int = 64  # responses per prompt for the majority vote
    n_train: int = 32  # of those, responses per prompt used in the update
    # An adaptive vote (ttrl.vote_rule lead | posterior) draws n_vote_min responses per prompt
    # first (null = n_train, the fewest the update can use: the ones it trains on, those the
    # fixed budget would), then rounds of groups of n_vote_step more (null = half of n_vote_min)
    # for the prompts whose vote is not settled, up to n_vote. Ignored by the fixed rule.
    n_vote_min: int | None = None
    n_vote_step: int | None = None
    temperature: float = 1.0  # 1.0 for Qwen2.5-Math, 0.6 for instruct models
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    max_new_tokens: int = 3072
    # Padded prompt lengths; one compile per bucket used. The largest must hold
    # data.max_prompt_tokens.
    prompt_buckets: tuple[int, ...] = (128, 256, 512, 1024)
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end a response, besides the EOS ids
    # Prompts per sampling pass (0 = all at once): fewer rows' caches live at a time, the same
    # responses. It must divide data.batch_prompts and split over the mesh's data axis.
    prompt_chunk: int = 0
    # Rows leave the decode loop as they stop: once no prompt has more than half of its rows
    # still running, the loop goes on with half as many rows per prompt, at most this many
    # times (3: 64 -> 8 rows per prompt). The same responses up to float rounding; 0 = every
    # row runs to the last. Each halving compiles one more loop body; also used by evaluation.
    halvings: int = 3

    def problems(self) -> list[str]:
        out = Problems()
        out.at_least("sample.n_vote", self.n_vote, 1)
        out.need(
            1 <= self.n_train <= self.n_vote,
            f"sample.n_train={self.n_train} must be between 1 and sample.n_vote={self.n_vote}",
        )
        if self.n_vote_min is not None:
            out.need(
                self.n_train <= self.n_vote_min <= self.n_vote,
                f"sample.n_vote_min={self.n_vote_min} must be between sample.n_train="
                f"{self.n_train} (the update trains on that many per prompt) and sample.n_vote="
                f"{self.n_vote}",
            )
        out.need(
            self.n_vote_step is None or self.n_vote_step >= 1,
            f"sample.n_vote_step={self.n_vote_step} must be at least 1 (or null)",
        )
        out += _sampling_problems("sample", self)
        out.at_least("sample.top_k", self.top_k, 0, " (0 = off)")
        out.need(0 <= self.min_p < 1, f"sample.min_p={self.min_p} must be in [0, 1)")
        buckets = list(self.prompt_buckets)
        out.need(
            len(buckets) > 0 and all(b >= 1 for b in buckets) and buckets == sorted(set(buckets)),
            f"sample.prompt_buckets={buckets} must be positive and strictly increasing",
        )
        out.need(all(i >= 0 for i in self.stop_token_ids), "sample.stop_token_ids must be >= 0")
        out.at_least("sample.prompt_chunk", self.prompt_chunk, 0, " (0 = all)")
        out.at_least("sample.halvings", self.halvings, 0, " (0 = rows never leave the loop)")
        return out


def _sampling_problems(section: str, sec: SampleSection | EvalSection) -> list[str]:
    """Checks shared by the rollout and the evaluation sampling settings."""
    out = Problems()
    out.at_least(f"{section}.temperature", sec.temperature, 0)
    out.need(0 < sec.top_p <= 1, f"{section}.top_p={sec.top_p} must be in (0, 1]")
    out.at_least(f"{section}.max_new_tokens", sec.max_new_tokens, 1)
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
    # The vote's budget (vote_budget.py): "fixed" draws sample.n_vote per prompt in one call;
    # "lead" stops a prompt once the remaining draws cannot change its winner; "posterior" once
    # the chance that they change it is below vote_error (0.02: no label differed from the
    # fixed budget's on the SmolLM2 tasks' draws; 0.05 let 0.3 % through). See
    # sample.n_vote_min / n_vote_step.
    vote_rule: VoteRule = "fixed"
    vote_error: float = 0.02
    # Also draw the full sample.n_vote per prompt (not trained on) and log how the adaptive
    # vote's pseudo-labels compare with the fixed budget's on the same responses (audit/...).
    vote_audit: bool = False

    def problems(self) -> list[str]:
        out = Problems()
        out.need(0 < self.vote_error < 1, f"ttrl.vote_error={self.vote_error} must be in (0, 1)")
        out.need(
            0 <= self.min_majority_ratio <= 1,
            f"ttrl.min_majority_ratio={self.min_majority_ratio} must be in [0, 1]",
        )
        out.at_least("ttrl.ettrl_alpha", self.ettrl_alpha, 0)
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
    # The rollout policy's log-probs in the PPO ratio: "recompute" runs the policy over the
    # rows once more before the updates (as verl does); "sampler" takes the sampler's, which
    # are the same quantity (log softmax(logits / temperature), unfiltered) from the same model
    # code; "auto": the sampler's in float32, where the two agree to float rounding, recomputed
    # in bfloat16, where the cached decode and the full forward round differently.
    old_logp: OldLogp = "auto"
    # Each prompt read once for its n_train responses in the log-prob passes (one row holds
    # the prompt and its responses, each response attending to the prompt and itself), while
    # that row fits one attention chunk (512 positions); false: a row per response (verl).
    share_prompts: bool = True
    # Each shared row packed at real lengths: the prompt's tokens without its padding, then the
    # trained responses each to its own stop, the row rounded up to a multiple of this many
    # positions (each new length compiles the step once; at most T + n_train * R). 0 = off.
    pack_multiple: int = 32

    def problems(self) -> list[str]:
        out = Problems()
        out.need(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        out.at_least("optim.pack_multiple", self.pack_multiple, 0, " (0 = off)")
        out.need(
            0 <= self.warmup_ratio < 1, f"optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)"
        )
        out.need(
            0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"
        )
        out.need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
        out.need(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        out.at_least("optim.weight_decay", self.weight_decay, 0)
        out.need(
            self.grad_clip is None or self.grad_clip > 0,
            "optim.grad_clip must be > 0 or null (off)",
        )
        out.need(0 < self.clip_low < 1, f"optim.clip_low={self.clip_low} must be in (0, 1)")
        out.need(self.clip_high > 0, f"optim.clip_high={self.clip_high} must be > 0")
        out.need(
            losses.valid_dual_clip(self.dual_clip),
            f"optim.dual_clip={self.dual_clip} must be > 1 or null (off)",
        )
        out.at_least("optim.kl_coef", self.kl_coef, 0)
        out.at_least("optim.entropy_coef", self.entropy_coef, 0)
        out.at_least("optim.mini_batch_prompts", self.mini_batch_prompts, 1)
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
        out = Problems()
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
        out = Problems()
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
        out.at_least("data.max_prompt_tokens", self.max_prompt_tokens, 1)
        out.at_least("data.batch_prompts", self.batch_prompts, 1)
        out.at_least("data.episodes", self.episodes, 1)
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
        out = Problems()
        out += _sampling_problems("eval", self)
        out.at_least("eval.every_steps", self.every_steps, 0, " (0 = off)")
        out.at_least("eval.k", self.k, 1)
        return out


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Output, seeding, checkpoints and logging."""

    out_dir: str = "runs/ttrl"
    seed: int = 0
    # A shorter run: the first max_steps steps of the data schedule, with the learning-rate
    # schedule (warmup, decay) fitted to them, so it is not a prefix of the full run. None: all.
    max_steps: int | None = None
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
    # With LoRA: also write the adapters as a PEFT folder (adapter_config.json and
    # adapter_model.safetensors) that PEFT loads onto the base model, in out_dir/peft.
    export_peft: bool = False
    # Which policy the run ends with (the kept checkpoint, the HF export): "last", or "best":
    # the evaluated step, the base model's evaluation included, with the highest label-free
    # score (judge.py; no gold label is read).
    keep: KeepRule = "last"
    # "off", or "plateau": end the run once the label-free score has not improved for
    # stop_patience evaluations (judge.py); a run that never beats the base model's score ends
    # early and, with keep=best, keeps the base model.
    stop_rule: StopRule = "off"
    stop_patience: int = 2
    # A later evaluation must beat the best score by more than this to count as better, for
    # the stop rule and for keep=best (within it, the earlier step is kept).
    min_score_gain: float = 0.0
    # An evaluation whose answers repeat a number of the question more often than the base
    # model's did by more than this (the `echo` signal, a share) is never kept and never counts
    # as an improvement: the vote rewarding a copy-the-question shortcut (judge.py). null: off.
    max_echo_rise: float | None = 0.1
    # When an evaluation's answers collapse (mean per-prompt answer entropy below
    # collapse_entropy x the base model's): "off"; "lr" halves the learning rate; "rollback"
    # also returns to the kept checkpoint (needs keep=best). See judge.CollapseGuard.
    collapse_guard: GuardAction = "off"
    collapse_entropy: float = 0.1
    # After training, the base model's majority vote with as many sampled tokens as the run
    # spent (training and evaluation): maj@N in summary.md next to TTRL's (baseline.py).
    baseline: bool = True

    def problems(self) -> list[str]:
        out = Problems()
        out.need(bool(self.out_dir), "run.out_dir is empty")
        out.at_least("run.seed", self.seed, 0)
        out.need(
            self.max_steps is None or self.max_steps >= 1, "run.max_steps must be >= 1 or null"
        )
        out.at_least("run.checkpoint_every", self.checkpoint_every, 0, " (0 = only at the end)")
        out.at_least("run.checkpoint_minutes", self.checkpoint_minutes, 0, " (0 = off)")
        out.at_least("run.keep_checkpoints", self.keep_checkpoints, 1)
        out.at_least("run.stop_patience", self.stop_patience, 1)
        out.need(
            self.max_echo_rise is None or 0 <= self.max_echo_rise <= 1,
            f"run.max_echo_rise={self.max_echo_rise} must be in [0, 1] or null (off)",
        )
        out.need(
            0 < self.collapse_entropy < 1,
            f"run.collapse_entropy={self.collapse_entropy} must be in (0, 1)",
        )
        out.need(
            self.collapse_guard != "rollback" or self.keep == "best",
            "run.collapse_guard=rollback returns to the kept checkpoint: it needs run.keep=best",
        )
        out.need(
            0 <= self.min_score_gain < 1,
            f"run.min_score_gain={self.min_score_gain} must be in [0, 1)",
        )
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
