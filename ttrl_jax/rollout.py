"""Prompts in, scored responses out: bucket and pad, sample on device, decode text, answer ids.

The glue between data.py, sampler.py and rewards.py, shared by the TTRL loop and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ttrl_jax import data as data_lib
from ttrl_jax import model as model_lib
from ttrl_jax import sampler as sampler_lib
from ttrl_jax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sampled batch, on the host: prompts, the rollout arrays and the decoded texts."""

    prompt_PT: np.ndarray
    prompt_mask_PT: np.ndarray
    rollout: sampler_lib.Rollout  # numpy leaves
    texts_PN: list[list[str]]


def stop_token_ids(
    tokenizer: Any, cfg: model_lib.ModelConfig, model_dir: str | None, extra: Sequence[int] = ()
) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS, the model's and generation config's."""
    ids: set[int] = set(int(i) for i in extra)
    for eos in (tokenizer.eos_token_id, cfg.eos_token_id):
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path and os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if not ids:
        raise ValueError(
            "no stop token: the tokenizer, config.json and generation_config.json name no EOS "
            "id; set sample.stop_token_ids"
        )
    return tuple(sorted(ids))


@dataclasses.dataclass
class Generator:
    """Samples and decodes responses for lists of prompt token ids (static settings fixed)."""

    cfg: model_lib.ModelConfig
    tokenizer: Any
    stop_ids: tuple[int, ...]
    pad_id: int
    buckets: tuple[int, ...]
    mesh: Mesh | None = None

    def __call__(
        self,
        params: Any,
        prompt_ids: Sequence[Sequence[int]],
        key: jax.Array,
        sampling: sampler_lib.SamplingParams,
        n_samples: int,
        max_new_tokens: int,
    ) -> Generation:
        prompt_PT, prompt_mask_PT = data_lib.bucket_and_pad(prompt_ids, self.buckets, self.pad_id)
        tokens, mask = prompt_PT, prompt_mask_PT
        if self.mesh is not None:
            rows = sharding_lib.batch_sharding(self.mesh, 2)
            tokens, mask = jax.device_put(tokens, rows), jax.device_put(mask, rows)
        rollout = sampler_lib.sample(
            params, self.cfg, tokens, mask, key, sampling,
            n_samples=n_samples, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids,
            pad_id=self.pad_id, mesh=self.mesh,
        )  # fmt: skip
        rollout = jax.device_get(rollout)
        return Generation(prompt_PT, prompt_mask_PT, rollout, self.decode(rollout))

    def decode(self, rollout: sampler_lib.Rollout) -> list[list[str]]:
        """Response texts; the stop token and padding are dropped, special tokens skipped."""
        tokens_PNT, length_PN = np.asarray(rollout.tokens_PNT), np.asarray(rollout.length_PN)
        finish_PN = np.asarray(rollout.finish_PN)
        P, N = length_PN.shape
        rows = []
        for p in range(P):
            for n in range(N):
                end = int(length_PN[p, n]) - int(finish_PN[p, n] == sampler_lib.FINISH_STOP)
                rows.append(tokens_PNT[p, n, :end].tolist())
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [texts[p * N : (p + 1) * N] for p in range(P)]

