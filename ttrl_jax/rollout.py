"""Prompts in, scored responses out: bucket and pad, sample on device, decode text, answer ids.

The seam between the sampler and the train step, shared by the TTRL loop and evaluation:
`Generator` samples a batch and decodes its texts, `answer_ids` scores them on the host, and
`Generation.train_batch` turns the rollout and its answer ids into the train step's input.

Multi-host: every process is given the whole batch of prompts, but owns only the prompt groups
whose rows the mesh places on its own devices (`sharding.process_rows`). It feeds those prompts
into the global prompt arrays, reads back, decodes and scores only their responses, and shares
the small arrays (answer ids, lengths) with the other processes, so the vote, the metrics and
the evaluation are the same on every process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ttrl_jax import model as model_lib
from ttrl_jax import prompts as prompts_lib
from ttrl_jax import rewards
from ttrl_jax import sampler as sampler_lib
from ttrl_jax import sharding as sharding_lib
from ttrl_jax import train as train_lib


def response_bucket(longest: int, max_new_tokens: int) -> int:
    """Train-step response length: the smallest quarter of max_new_tokens that holds `longest`.

    Rollouts are trimmed to it so short responses do not pay for the full budget, at the cost
    of at most four compiled train steps.
    """
    quarter = -(-max_new_tokens // 4)
    return min(max_new_tokens, max(1, -(-longest // quarter)) * quarter)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sampled batch, on the host: prompts, the rollout arrays and the decoded texts.

    With several processes it holds this process's prompts only: P is the local count, and
    `prompts` says which of the call's prompts they are; `length_PN` and `finish_PN` are those
    of every prompt of the call (gathered from all processes).
    """

    prompt_PT: np.ndarray
    prompt_mask_PT: np.ndarray
    rollout: sampler_lib.Rollout  # numpy leaves
    texts_PN: list[list[str]]
    prompt_offset: int = 0  # index, in the call's prompt list, of the first prompt held here
    length_PN: np.ndarray | None = None  # all prompts' response lengths (None = this rollout's)
    finish_PN: np.ndarray | None = None

    def __post_init__(self):
        if self.length_PN is None:
            object.__setattr__(self, "length_PN", np.asarray(self.rollout.length_PN))
        if self.finish_PN is None:
            object.__setattr__(self, "finish_PN", np.asarray(self.rollout.finish_PN))

    @property
    def prompts(self) -> slice:
        """The call's prompts held here (all of them on one process)."""
        return slice(self.prompt_offset, self.prompt_offset + len(self.texts_PN))

    def train_batch(
        self,
        answer_id_PN: np.ndarray,
        gold_id_P: np.ndarray,
        max_new_tokens: int,
        mesh: Mesh | None = None,
    ) -> train_lib.StepBatch:
        """The train step's input: this process's rows, trimmed to the response bucket.

        Args:
          answer_id_PN, gold_id_P: every prompt's ids (from `answer_ids`).
          max_new_tokens: the rollout's response slots (sets the trimming buckets).
          mesh: with several processes, rows become global arrays over its 'data' axis.
        """
        R = response_bucket(int(self.length_PN.max()), max_new_tokens)
        r, mine = self.rollout, self.prompts
        batch = train_lib.StepBatch(
            prompt_PT=self.prompt_PT,
            prompt_mask_PT=self.prompt_mask_PT,
            response_PNR=np.asarray(r.tokens_PNR)[..., :R],
            response_mask_PNR=np.asarray(r.mask_PNR)[..., :R],
            logp_PNR=np.asarray(r.logp_PNR)[..., :R],
            entropy_PNR=np.asarray(r.entropy_PNR)[..., :R],
            answer_id_PN=np.asarray(answer_id_PN)[mine].astype(np.int32),
            gold_id_P=np.asarray(gold_id_P)[mine].astype(np.int32),
        )
        if jax.process_count() > 1:
            batch = sharding_lib.global_rows(batch, mesh)
        return batch


@dataclasses.dataclass
class Generator:
    """Samples and decodes responses for lists of prompt token ids (static settings fixed)."""

    cfg: model_lib.ModelConfig
    tokenizer: Any
    stop_ids: tuple[int, ...]
    pad_id: int
    buckets: tuple[int, ...]
    mesh: Mesh | None = None
    prompt_chunk: int = 0  # prompts per sampling pass (0 = all)

    def __call__(
        self,
        params: Any,
        prompt_ids: Sequence[Sequence[int]],
        key: jax.Array,
        sampling: sampler_lib.SamplingParams,
        n_samples: int,
        max_new_tokens: int,
    ) -> Generation:
        # Every process pads the whole batch, so all pick the same bucket (static shapes agree).
        prompt_PT, prompt_mask_PT = prompts_lib.bucket_and_pad(
            prompt_ids, self.buckets, self.pad_id
        )
        mine = sharding_lib.process_rows(self.mesh, len(prompt_ids))
        prompt_PT, prompt_mask_PT = prompt_PT[mine], prompt_mask_PT[mine]
        tokens, mask = prompt_PT, prompt_mask_PT
        if self.mesh is not None:
            tokens, mask = sharding_lib.global_rows(
                (tokens, mask), self.mesh, sharding_lib.SAMPLE_RULES
            )
        rollout = sampler_lib.sample(
            params, self.cfg, tokens, mask, key, sampling,
            n_samples=n_samples, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids,
            pad_id=self.pad_id, mesh=self.mesh, prompt_chunk=self.prompt_chunk,
        )  # fmt: skip
        rollout = sharding_lib.local_rows(rollout)
        return Generation(
            prompt_PT, prompt_mask_PT, rollout, self.decode(rollout), mine.start,
            length_PN=sharding_lib.gather_rows(rollout.length_PN),
            finish_PN=sharding_lib.gather_rows(rollout.finish_PN),
        )  # fmt: skip

    def decode(self, rollout: sampler_lib.Rollout) -> list[list[str]]:
        """Response texts; the stop token and padding are dropped, special tokens skipped."""
        tokens_PNR, length_PN = np.asarray(rollout.tokens_PNR), np.asarray(rollout.length_PN)
        finish_PN = np.asarray(rollout.finish_PN)
        P, N = length_PN.shape
        rows = []
        for p in range(P):
            for n in range(N):
                end = int(length_PN[p, n]) - int(finish_PN[p, n] == sampler_lib.FINISH_STOP)
                rows.append(tokens_PNR[p, n, :end].tolist())
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [texts[p * N : (p + 1) * N] for p in range(P)]


def answer_ids(
    gen: Generation,
    golds: Sequence[str | None],
    *,
    real: int | None = None,
    mode: str = "math",
    timeout_s: float = rewards.DEFAULT_TIMEOUT_S,
    last_number_fallback: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Answer ids of the call's first `real` prompts, each process scoring only its own.

    Args:
      gen: this process's generation.
      golds: gold answers (or None) of the call's prompts, at least `real` of them.
      real: prompts that count (default: all of the call's); later ones are padding.
      mode, timeout_s, last_number_fallback: answer extraction settings (see
        `rewards.answer_ids`).

    Returns:
      (answer_id_PN int32 [real, N], gold_id_P int32 [real]), the same on every process.
    """
    held = gen.prompts
    if jax.process_count() == 1:
        real = held.stop if real is None else real
        return rewards.answer_ids(
            gen.texts_PN[:real], list(golds[:real]), mode=mode, timeout_s=timeout_s,
            last_number_fallback=last_number_fallback,
        )  # fmt: skip
    P, N = len(gen.texts_PN), len(gen.texts_PN[0])
    real = P * jax.process_count() if real is None else real  # process_rows splits evenly
    n_real = max(0, min(real, held.stop) - held.start)
    answer_id_PN = np.full((P, N), -1, np.int32)
    gold_id_P = np.full((P,), -1, np.int32)
    if n_real:
        answer_id_PN[:n_real], gold_id_P[:n_real] = rewards.answer_ids(
            gen.texts_PN[:n_real], list(golds[held.start : held.start + n_real]),
            mode=mode, timeout_s=timeout_s, last_number_fallback=last_number_fallback,
        )  # fmt: skip
    gather = sharding_lib.gather_rows
    return gather(answer_id_PN)[:real], gather(gold_id_P)[:real]
