"""Prompts in, scored responses out: bucket and pad, sample on device, decode text, answer ids.

The seam between the sampler and the train step, shared by the TTRL loop and evaluation:
`Generator` samples a batch and decodes its texts, `grade` turns them into answer ids on the
host (grading/clustering.py's `answer_ids`, each process its own prompts), and
`Generation.train_batch` turns the rollout and its answer ids into the train step's input.
`Generator.vote_in_rounds` does the first two in rounds for an adaptive vote (vote_budget.py):
it returns groups of varying size, `vote.NOT_DRAWN` marking the slots it did not draw.

Multi-host: every process is given the whole batch of prompts, but owns only the prompt groups
whose rows the mesh places on its own devices (`sharding.process_rows`). It feeds those prompts
into the global prompt arrays, reads back, decodes and scores only their responses, and shares
the small arrays (answer ids, lengths) with the other processes, so the vote, the metrics and
the evaluation are the same on every process.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.data import prompts as prompts_lib
from ttrl_jax.grading import clustering, verifier
from ttrl_jax.grading.answers import extract_answer
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.rl import vote
from ttrl_jax.rl import vote_budget as vote_budget_lib
from ttrl_jax.rl.batch import StepBatch
from ttrl_jax.run import signals as signals_lib
from ttrl_jax.sampling import rounds as rounds_lib
from ttrl_jax.sampling import sampler as sampler_lib
from ttrl_jax.sampling import token_draw


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
    ) -> StepBatch:
        """The train step's input: this process's rows, trimmed to the response bucket.

        Args:
          answer_id_PN, gold_id_P: every prompt's ids (from `grade`).
          max_new_tokens: the rollout's response slots (sets the trimming buckets).
          mesh: with several processes, rows become global arrays over its 'data' axis.
        """
        R = response_bucket(int(self.length_PN.max()), max_new_tokens)
        r, mine = self.rollout, self.prompts
        batch = StepBatch(
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

    cfg: ModelConfig
    tokenizer: Any
    stop_ids: tuple[int, ...]
    pad_id: int
    buckets: tuple[int, ...]
    mesh: Mesh | None = None
    prompt_chunk: int = 0  # prompts per sampling pass (0 = all)
    halvings: int = sampler_lib.HALVINGS  # rows leave the decode loop as they stop

    def __call__(
        self,
        params: Any,
        prompt_ids: Sequence[Sequence[int]],
        key: jax.Array,
        sampling: token_draw.SamplingParams,
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
            halvings=self.halvings,
        )  # fmt: skip
        rollout = sharding_lib.local_rows(rollout)
        return Generation(
            prompt_PT,
            prompt_mask_PT,
            rollout,
            self.decode(rollout),
            mine.start,
            length_PN=sharding_lib.gather_rows(rollout.length_PN),
            finish_PN=sharding_lib.gather_rows(rollout.finish_PN),
        )

    def decode(self, rollout: sampler_lib.Rollout) -> list[list[str]]:
        """Response texts; the stop token and padding are dropped, special tokens skipped."""
        length_PN = np.asarray(rollout.length_PN)
        P, N = length_PN.shape
        texts = self._texts(
            np.asarray(rollout.tokens_PNR).reshape(P * N, -1),
            length_PN.reshape(-1),
            np.asarray(rollout.finish_PN).reshape(-1),
        )
        return [texts[p * N : (p + 1) * N] for p in range(P)]

    def _texts(self, tokens_BR, length_B, finish_B) -> list[str]:
        rows = []
        for tokens, length, finish in zip(tokens_BR, length_B, finish_B):
            end = int(length) - int(finish == sampler_lib.FINISH_STOP)
            rows.append(tokens[:end].tolist())
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def vote_in_rounds(
        self,
        params: Any,
        prompt_ids: Sequence[Sequence[int]],
        key: jax.Array,
        sampling: token_draw.SamplingParams,
        budget: vote_budget_lib.VoteBudget,
        max_new_tokens: int,
        golds: Sequence[str | None],
        *,
        mode: str = "math",
        timeout_s: float = verifier.DEFAULT_TIMEOUT_S,
        last_number_fallback: bool = False,
        order_PN: np.ndarray | None = None,
    ) -> Voted:
        """Samples in rounds until every prompt's vote is settled (vote_budget.py).

        The prompts are prefilled once; a first round draws the first n_min slots of each
        prompt's draw order `order_PN` (`vote_budget.draw_order`; default slot order), and every
        later round gives its groups of n_step rows to the prompts not yet settled, next in
        their order. Each round's responses are decoded and scored as they come
        (`RoundScorer`; golds and the answer settings as for `grade`), every prompt's drawn
        answers clustered together. Slot n of a prompt holds its sample n: the same response
        one call of `__call__` with n_samples = n_max gives there.
        """
        prompt_PT, prompt_mask_PT = prompts_lib.bucket_and_pad(
            prompt_ids, self.buckets, self.pad_id
        )
        P, N, R = len(prompt_ids), budget.n_max, max_new_tokens
        mine = sharding_lib.process_rows(self.mesh, P)
        prompt_PT, prompt_mask_PT = prompt_PT[mine], prompt_mask_PT[mine]
        tokens, mask = prompt_PT, prompt_mask_PT
        if self.mesh is not None:
            tokens, mask = sharding_lib.global_rows(
                (tokens, mask), self.mesh, sharding_lib.SAMPLE_RULES
            )
        prefilled = rounds_lib.prefill(params, self.cfg, tokens, mask, mesh=self.mesh)
        scorer = RoundScorer(list(golds[mine]), mode, timeout_s, last_number_fallback)
        out = _Slots(mine.stop - mine.start, N, R, self.pad_id)
        shards = sharding_lib.data_size(self.mesh)
        if order_PN is None:
            order_PN = vote_budget_lib.slot_order(P, N)
        plan = vote_budget_lib.first_round(order_PN, budget.n_min)
        time_score, sizes = 0.0, []
        while plan is not None:
            # This process's groups: they draw for its own prompts (vote_budget.next_round).
            held = sharding_lib.process_rows(self.mesh, len(plan.group_prompt_U))
            block = [x[held] for x in (plan.group_prompt_U, plan.sample_index_UN, plan.live_UN)]
            args = (
                block
                if jax.process_count() == 1
                else sharding_lib.global_rows(tuple(block), self.mesh, sharding_lib.SAMPLE_RULES)
            )
            got = rounds_lib.sample_groups(
                params, self.cfg, prefilled, key, sampling, *args, max_new_tokens=R,
                stop_ids=self.stop_ids, pad_id=self.pad_id, mesh=self.mesh,
                group_chunk=_round_chunk(len(plan.group_prompt_U), self.prompt_chunk, shards),
                halvings=self.halvings,
            )  # fmt: skip
            got = sharding_lib.local_rows(got)
            sizes.append(len(plan.group_prompt_U))
            g, j = np.nonzero(block[2])
            p, n = block[0][g] - mine.start, block[1][g, j]
            out.put(p, n, got, g, j)
            texts = self._texts(
                np.asarray(got.tokens_PNR)[g, j],
                np.asarray(got.length_PN)[g, j],
                np.asarray(got.finish_PN)[g, j],
            )
            t0 = time.perf_counter()
            scorer.add(p, n, texts)
            answer_id_PN, gold_id_P = scorer.ids(N)
            time_score += time.perf_counter() - t0
            answer_id_PN = sharding_lib.gather_rows(answer_id_PN)
            gold_id_P = sharding_lib.gather_rows(gold_id_P)
            plan = vote_budget_lib.next_round(
                vote_budget_lib.votes_drawn(answer_id_PN),
                vote_budget_lib.settled(answer_id_PN, budget),
                N,
                budget.n_step,
                shards,
                order_PN,
            )
        rollout = out.rollout()
        gen = Generation(
            prompt_PT,
            prompt_mask_PT,
            rollout,
            out.texts,
            mine.start,
            length_PN=sharding_lib.gather_rows(rollout.length_PN),
            finish_PN=sharding_lib.gather_rows(rollout.finish_PN),
        )
        return Voted(gen, answer_id_PN, gold_id_P, sizes, time_score)


def _round_chunk(groups: int, prompt_chunk: int, shards: int) -> int:
    """Groups per decode pass of a round: the largest divisor of `groups` that is at most
    sample.prompt_chunk and splits over the data axis (0 = all in one pass)."""
    if not prompt_chunk or prompt_chunk >= groups:
        return 0
    return max(c for c in range(shards, prompt_chunk + 1, shards) if groups % c == 0)


@dataclasses.dataclass(frozen=True)
class Voted:
    """An adaptive vote on the host: ragged groups and their answer ids (every prompt's)."""

    gen: Generation  # [P, n_max] slots; those not drawn are empty
    answer_id_PN: np.ndarray  # int32, vote.NOT_DRAWN on the empty slots
    gold_id_P: np.ndarray
    round_groups: list[int]  # each round's group count U (a round is U x n_min or n_step rows)
    time_reward: float  # seconds of it spent scoring answers


class _Slots:
    """Host buffers of one process's prompts x n_max response slots, filled round by round."""

    def __init__(self, P: int, N: int, R: int, pad_id: int):
        self.tokens_PNR = np.full((P, N, R), pad_id, np.int32)
        self.mask_PNR = np.zeros((P, N, R), bool)
        self.logp_PNR = np.zeros((P, N, R), np.float32)
        self.entropy_PNR = np.zeros((P, N, R), np.float32)
        self.length_PN = np.zeros((P, N), np.int32)
        self.finish_PN = np.full((P, N), sampler_lib.FINISH_STOP, np.int32)
        self.texts = [[""] * N for _ in range(P)]
        self.steps = 0
        self.row_steps = 0

    def put(self, p, n, got: sampler_lib.Rollout, g, j) -> None:
        for name in ("tokens_PNR", "mask_PNR", "logp_PNR", "entropy_PNR", "length_PN"):
            getattr(self, name)[p, n] = np.asarray(getattr(got, name))[g, j]
        self.finish_PN[p, n] = np.asarray(got.finish_PN)[g, j]
        self.steps += int(got.num_steps)
        self.row_steps += int(got.row_steps)

    def rollout(self) -> sampler_lib.Rollout:
        return sampler_lib.Rollout(
            self.tokens_PNR, self.mask_PNR, self.logp_PNR, self.entropy_PNR, self.length_PN,
            self.finish_PN, np.int32(self.steps), np.int32(self.row_steps),
        )  # fmt: skip


@dataclasses.dataclass
class RoundScorer:
    """Answer ids of prompts whose responses arrive in rounds, by slot.

    Each response's final answer is extracted once; a prompt's ids are those of clustering all
    its drawn answers together in slot order (redone when it grows), so they are numbered by
    first appearance in slot order, as for the same responses drawn in one call.
    """

    golds: Sequence[str | None]  # this process's prompts'
    mode: str = "math"
    timeout_s: float = verifier.DEFAULT_TIMEOUT_S
    last_number_fallback: bool = False

    def __post_init__(self):
        self._answers: list[dict[int, str | None]] = [{} for _ in self.golds]
        self._ids: list[tuple[list[int], int] | None] = [None] * len(self.golds)

    def add(self, p_B: np.ndarray, n_B: np.ndarray, texts_B: Sequence[str]) -> None:
        for p, n, text in zip(p_B, n_B, texts_B):
            if int(n) in self._answers[int(p)]:
                raise ValueError(f"prompt {int(p)}: sample {int(n)} was drawn twice")
            answer = extract_answer(text, self.mode, self.last_number_fallback)
            self._answers[int(p)][int(n)] = answer
            self._ids[int(p)] = None

    def ids(self, n_max: int) -> tuple[np.ndarray, np.ndarray]:
        """(answer_id_PN with vote.NOT_DRAWN on the slots not drawn, gold_id_P)."""
        answer_id_PN = np.full((len(self.golds), n_max), vote.NOT_DRAWN, np.int32)
        gold_id_P = np.full((len(self.golds),), -1, np.int32)
        for p, (answers, gold) in enumerate(zip(self._answers, self.golds)):
            slots = sorted(answers)
            if self._ids[p] is None:
                self._ids[p] = clustering.cluster_answers(
                    [answers[n] for n in slots], gold, mode=self.mode, timeout_s=self.timeout_s
                )
            ids, gold_id_P[p] = self._ids[p]
            answer_id_PN[p, slots] = ids
        return answer_id_PN, gold_id_P


def grade(
    gen: Generation,
    golds: Sequence[str | None],
    *,
    real: int | None = None,
    mode: str = "math",
    timeout_s: float = verifier.DEFAULT_TIMEOUT_S,
    last_number_fallback: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Answer ids of the call's first `real` prompts, each process scoring only its own.

    Args:
      gen: this process's generation.
      golds: gold answers (or None) of the call's prompts, at least `real` of them.
      real: prompts that count (default: all of the call's); later ones are padding.
      mode, timeout_s, last_number_fallback: answer extraction settings (see
        `clustering.answer_ids`).

    Returns:
      (answer_id_PN int32 [real, N], gold_id_P int32 [real]), the same on every process.
    """
    held = gen.prompts
    if jax.process_count() == 1:
        real = held.stop if real is None else real
        return clustering.answer_ids(
            gen.texts_PN[:real],
            list(golds[:real]),
            mode=mode,
            timeout_s=timeout_s,
            last_number_fallback=last_number_fallback,
        )
    P, N = len(gen.texts_PN), len(gen.texts_PN[0])
    real = P * jax.process_count() if real is None else real  # process_rows splits evenly
    n_real = max(0, min(real, held.stop) - held.start)
    answer_id_PN = np.full((P, N), -1, np.int32)
    gold_id_P = np.full((P,), -1, np.int32)
    if n_real:
        answer_id_PN[:n_real], gold_id_P[:n_real] = clustering.answer_ids(
            gen.texts_PN[:n_real],
            list(golds[held.start : held.start + n_real]),
            mode=mode,
            timeout_s=timeout_s,
            last_number_fallback=last_number_fallback,
        )
    gather = sharding_lib.gather_rows
    return gather(answer_id_PN)[:real], gather(gold_id_P)[:real]


def votes(
    gen: Generation,
    answer_id_PN: np.ndarray,
    prompt_index: Sequence[int],
    *,
    mode: str = "math",
    last_number_fallback: bool = False,
) -> signals_lib.Votes:
    """The vote of the call's first len(prompt_index) prompts, as the label-free signals read it.

    Args:
      gen: this process's generation.
      answer_id_PN: every prompt's ids (from `grade` or a round vote), at least
        len(prompt_index) rows.
      prompt_index: the prompts' indices in their task.
      mode, last_number_fallback: the answer extraction settings the ids were made with.
    """
    real, held = len(prompt_index), gen.prompts
    all_ids_PN = np.full((len(gen.texts_PN) * jax.process_count(), answer_id_PN.shape[1]), -1)
    all_ids_PN[: len(answer_id_PN)] = answer_id_PN
    labels = []
    for ids, texts in zip(all_ids_PN[held], gen.texts_PN):  # this process's prompts, padding too
        answers = [extract_answer(t, mode, last_number_fallback) if t else None for t in texts]
        labels.append(json.dumps(clustering.cluster_labels(answers, ids, mode)))
    rollout = gen.rollout
    mask_PNR = np.asarray(rollout.mask_PNR)
    entropy_PN = (np.asarray(rollout.entropy_PNR) * mask_PNR).sum(-1) / np.maximum(
        mask_PNR.sum(-1), 1
    )
    return signals_lib.Votes(
        prompt_index_P=np.asarray(prompt_index),
        answer_id_PN=np.asarray(answer_id_PN)[:real],
        labels_P=[json.loads(s) for s in sharding_lib.gather_strings(labels)[:real]],
        length_PN=np.asarray(gen.length_PN)[:real],
        entropy_PN=sharding_lib.gather_rows(entropy_PN)[:real],
    )
