"""The prompt order: which prompts each global step trains on, a pure function of the step.

A resumed run asks for the batches of the steps it has not done and gets exactly those of the
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator

import numpy as np

logger = logging.getLogger(__name__)

_ORDER_STREAM = 0x5EED  # keeps the data-order stream apart from other uses of the run seed


def episode_order(seed: int, n_items: int, episode: int, shuffle: bool = True) -> np.ndarray:
    """The order of prompt indices in one episode: a permutation fixed by (seed, episode)."""
    if not shuffle:
        return np.arange(n_items)
    return np.random.default_rng((seed, _ORDER_STREAM, episode)).permutation(n_items)


@dataclasses.dataclass(frozen=True)
class PromptSchedule:
    """Which prompts each global step trains on; a pure function of the step, so resume is exact.

    Every step gets exactly `batch_prompts` prompts (static shapes). When `batch_prompts` does
    not divide `n_items`, `last_batch` decides the remainder: "drop" leaves it out of that
    episode (upstream's drop_last; with shuffling a different remainder sits out each episode;
    the count is logged) and "wrap" completes the batch from the next episode's order, so the
    steps run through the concatenated episode orders.
    """

    n_items: int
    batch_prompts: int
    episodes: int
    seed: int
    shuffle: bool = True
    last_batch: str = "drop"

    def __post_init__(self):
        if self.n_items < 1 or self.batch_prompts < 1 or self.episodes < 1:
            raise ValueError(
                f"PromptSchedule needs n_items, batch_prompts and episodes >= 1, got "
                f"{self.n_items}, {self.batch_prompts}, {self.episodes}"
            )
        if self.last_batch not in ("drop", "wrap"):
            raise ValueError(f"last_batch={self.last_batch!r} must be 'drop' or 'wrap'")
        if self.last_batch == "drop" and self.n_items < self.batch_prompts:
            raise ValueError(
                f"{self.n_items} prompts cannot fill one batch of data.batch_prompts="
                f"{self.batch_prompts}; lower data.batch_prompts or set data.last_batch=wrap"
            )
        if self.n_dropped_per_episode:
            log = logger.info if self.shuffle else logger.warning
            log(
                "%d prompts, batches of %d: %d prompts sit out each episode (%s)",
                self.n_items,
                self.batch_prompts,
                self.n_dropped_per_episode,
                "a different random set each time"
                if self.shuffle
                else "the SAME ones every episode, as data.shuffle=false",
            )

    @property
    def n_dropped_per_episode(self) -> int:
        return self.n_items % self.batch_prompts if self.last_batch == "drop" else 0

    @property
    def total_steps(self) -> int:
        if self.last_batch == "drop":
            return self.episodes * (self.n_items // self.batch_prompts)
        return math.ceil(self.episodes * self.n_items / self.batch_prompts)

    def batch_indices(self, step: int) -> np.ndarray:
        """Indices into the items of the prompts of global step `step` (shape [batch_prompts])."""
        self._check_step(step)
        b, n = self.batch_prompts, self.n_items
        if self.last_batch == "drop":
            episode, k = divmod(step, n // b)
            return episode_order(self.seed, n, episode, self.shuffle)[k * b : (k + 1) * b]
        stream = np.arange(step * b, (step + 1) * b)
        episodes = stream // n
        orders = {e: episode_order(self.seed, n, int(e), self.shuffle) for e in set(episodes)}
        return np.array([orders[e][p % n] for e, p in zip(episodes, stream)])

    def position(self, step: int) -> tuple[int, int]:
        """(episode, step within that episode) of a global step; with "wrap", the episode in
        which the step's batch starts."""
        self._check_step(step)
        if self.last_batch == "drop":
            return divmod(step, self.n_items // self.batch_prompts)
        episode = step * self.batch_prompts // self.n_items
        return episode, step - self._first_step(episode)

    def step_of(self, episode: int, step_in_episode: int) -> int:
        """Inverse of `position`."""
        if self.last_batch == "drop":
            per_episode = self.n_items // self.batch_prompts
            if not 0 <= step_in_episode < per_episode:
                raise ValueError(f"step_in_episode must be in [0, {per_episode})")
            step = episode * per_episode + step_in_episode
        else:
            step = self._first_step(episode) + step_in_episode
            if step_in_episode < 0 or step * self.batch_prompts // self.n_items != episode:
                raise ValueError(f"episode {episode} has no step {step_in_episode}")
        self._check_step(step)
        return step

    def iter_steps(self, start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(step, batch_indices) from `start_step` to the end; resuming passes the next step."""
        for step in range(start_step, self.total_steps):
            yield step, self.batch_indices(step)

    def _first_step(self, episode: int) -> int:
        """With "wrap": the first step whose batch starts inside `episode`."""
        return -(-episode * self.n_items // self.batch_prompts)

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the schedule's [0, {self.total_steps})")
