"""Prompts in, scored responses out: bucket and pad, sample on device, decode text, answer ids.

The glue between data.py, sampler.py and rewards.py, shared by the TTRL loop and evaluation.

Multi-host: every process is given the whole batch of prompts, but owns only the prompt groups
whose rows the mesh places on its own devices (`process_rows`). It feeds those prompts into the
global prompt arrays, reads back, decodes and scores only their responses, and shares the small
answer-id arrays with the other processes (`answer_ids`, `gather_rows`), so the vote, the metrics
and the evaluation are the same on every process. `global_rows` turns process-local row blocks
into the global arrays a jitted step takes.
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
from ttrl_jax import rewards
from ttrl_jax import sampler as sampler_lib
from ttrl_jax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sampled batch, on the host: prompts, the rollout arrays and the decoded texts.

    With several processes it holds this process's prompts only: P is the local count, and
    `prompts` says which of the call's prompts they are.
    """

    prompt_PT: np.ndarray
    prompt_mask_PT: np.ndarray
    rollout: sampler_lib.Rollout  # numpy leaves
    texts_PN: list[list[str]]
    prompt_offset: int = 0  # index, in the call's prompt list, of the first prompt held here

    @property
    def prompts(self) -> slice:
        """The call's prompts held here (all of them on one process)."""
        return slice(self.prompt_offset, self.prompt_offset + len(self.texts_PN))


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
        # Every process pads the whole batch, so all pick the same bucket (static shapes agree).
        prompt_PT, prompt_mask_PT = data_lib.bucket_and_pad(prompt_ids, self.buckets, self.pad_id)
        mine = process_rows(self.mesh, len(prompt_ids))
        prompt_PT, prompt_mask_PT = prompt_PT[mine], prompt_mask_PT[mine]
        tokens, mask = prompt_PT, prompt_mask_PT
        if self.mesh is not None:
            tokens, mask = global_rows((tokens, mask), self.mesh, sharding_lib.SAMPLE_RULES)
        rollout = sampler_lib.sample(
            params, self.cfg, tokens, mask, key, sampling,
            n_samples=n_samples, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids,
            pad_id=self.pad_id, mesh=self.mesh,
        )  # fmt: skip
        rollout = local_rows(rollout)
        return Generation(prompt_PT, prompt_mask_PT, rollout, self.decode(rollout), mine.start)

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


# ----------------------------------------------------------------------------- multi-host


def process_rows(mesh: Mesh | None, n: int) -> slice:
    """The rows of an n-row batch split over the mesh's 'data' axis that this process holds.

    Whole prompt groups are owned by one process only if every process holds one contiguous
    block of rows, in process order (what `jax.make_mesh` gives when each data row of the mesh
    lies within one host). Raises ValueError naming the layout otherwise.
    """
    count = jax.process_count()
    if count == 1:
        return slice(0, n)
    if mesh is None:
        raise ValueError(
            f"{count} processes but no device mesh: a multi-host run must sample on a mesh"
        )
    d, m = mesh.shape["data"], mesh.shape["model"]
    if n % count or n % d:
        raise ValueError(
            f"a batch of {n} prompts does not split evenly over {count} processes and the mesh's "
            f"data axis ({d}); make the prompt batch (data.batch_prompts) a multiple of both"
        )
    block = n // count
    spans: dict[int, set[tuple[int, int]]] = {}
    rows = sharding_lib.batch_sharding(mesh, 1)
    for device, index in rows.devices_indices_map((n,)).items():
        spans.setdefault(device.process_index, set()).add(index[0].indices(n)[:2])
    for proc, held in sorted(spans.items()):
        covered = sorted(held)
        want = (proc * block, (proc + 1) * block)
        contiguous = all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        if not contiguous or (covered[0][0], covered[-1][1]) != want:
            raise ValueError(
                f"mesh {d}x{m} over {count} processes: process {proc} holds batch rows "
                f"{covered}, not the block {want} that owning whole prompt groups needs. Use a "
                "mesh whose model axis fits within one host's devices (model size dividing "
                f"{jax.local_device_count()}) and whose data axis is a multiple of {count}"
            )
    me = jax.process_index()
    return slice(me * block, (me + 1) * block)


def global_rows(tree: Any, mesh: Mesh | None, rules=sharding_lib.TRAIN_RULES) -> Any:
    """Process-local row blocks -> global arrays with rows split over the mesh's 'data' axis.

    On one process the host arrays are placed on the mesh (or returned as they are without
    one); with several, each process passes its own `process_rows` block.
    """
    if mesh is None:
        return tree
    count = jax.process_count()

    def put(x):
        x = np.asarray(x)
        sharding = sharding_lib.batch_sharding(mesh, x.ndim, rules)
        if count == 1:
            return jax.device_put(x, sharding)
        shape = (x.shape[0] * count,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, tree)


def local_rows(tree: Any) -> Any:
    """Global arrays split over 'data' -> this process's rows as numpy (all rows on one process).

    Shards that are copies of the same rows (replication over 'model') are read once.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def get(x):
        if x.ndim == 0 or x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        blocks = {}
        for shard in x.addressable_shards:
            blocks.setdefault(shard.index[0].indices(x.shape[0])[0], shard.data)
        return np.concatenate(jax.device_get([blocks[s] for s in sorted(blocks)]))

    return jax.tree.map(get, tree)


def gather_rows(x_local: np.ndarray) -> np.ndarray:
    """Every process's rows of a host array, concatenated in process order (collective)."""
    if jax.process_count() == 1:
        return np.asarray(x_local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x_local), tiled=True))


def answer_ids(
    gen: Generation,
    golds: Sequence[str | None],
    *,
    real: int | None = None,
    mode: str = "math",
    timeout_s: float = rewards.DEFAULT_TIMEOUT_S,
) -> tuple[np.ndarray, np.ndarray]:
    """Answer ids of the call's first `real` prompts, each process scoring only its own.

    Args:
      gen: this process's generation.
      golds: gold answers (or None) of the call's prompts, at least `real` of them.
      real: prompts that count (default: all of the call's); later ones are padding.
      mode, timeout_s: answer extraction settings (see `rewards.answer_ids`).

    Returns:
      (answer_id_PN int32 [real, N], gold_id_P int32 [real]), the same on every process.
    """
    held = gen.prompts
    if jax.process_count() == 1:
        real = held.stop if real is None else real
        return rewards.answer_ids(
            gen.texts_PN[:real], list(golds[:real]), mode=mode, timeout_s=timeout_s
        )
    P, N = len(gen.texts_PN), len(gen.texts_PN[0])
    real = P * jax.process_count() if real is None else real  # process_rows splits evenly
    n_real = max(0, min(real, held.stop) - held.start)
    answer_id_PN = np.full((P, N), -1, np.int32)
    gold_id_P = np.full((P,), -1, np.int32)
    if n_real:
        answer_id_PN[:n_real], gold_id_P[:n_real] = rewards.answer_ids(
            gen.texts_PN[:n_real], list(golds[held.start : held.start + n_real]),
            mode=mode, timeout_s=timeout_s,
        )  # fmt: skip
    return gather_rows(answer_id_PN)[:real], gather_rows(gold_id_P)[:real]
