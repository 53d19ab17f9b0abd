"""data/schedule.py: which prompts each step takes, by episode, drop or wrap; resumable."""

import numpy as np
import pytest

from ttrl_jax.data import schedule


def test_episode_order_is_a_deterministic_permutation():
    a = schedule.episode_order(3, 30, 0)
    np.testing.assert_array_equal(np.sort(a), np.arange(30))
    np.testing.assert_array_equal(a, schedule.episode_order(3, 30, 0))
    assert not np.array_equal(a, schedule.episode_order(3, 30, 1))
    assert not np.array_equal(a, schedule.episode_order(4, 30, 0))
    np.testing.assert_array_equal(schedule.episode_order(3, 30, 5, shuffle=False), np.arange(30))


def test_drop_schedule_like_aime():
    s = schedule.PromptSchedule(n_items=30, batch_prompts=8, episodes=80, seed=1)
    assert s.total_steps == 240 and s.n_dropped_per_episode == 6
    for episode in (0, 79):
        batches = [s.batch_indices(s.step_of(episode, k)) for k in range(3)]
        flat = np.concatenate(batches)
        assert all(b.shape == (8,) for b in batches)
        assert len(set(flat.tolist())) == 24  # no prompt twice within an episode
        np.testing.assert_array_equal(flat, schedule.episode_order(1, 30, episode)[:24])
    sat_out = [
        set(range(30))
        - set(np.concatenate([s.batch_indices(s.step_of(e, k)) for k in range(3)]).tolist())
        for e in range(3)
    ]
    assert all(len(x) == 6 for x in sat_out)
    assert len({frozenset(x) for x in sat_out}) > 1  # a different remainder sits out


def test_wrap_schedule_fills_batches_from_the_next_episode():
    s = schedule.PromptSchedule(n_items=30, batch_prompts=8, episodes=4, seed=2, last_batch="wrap")
    assert s.total_steps == 15 and s.n_dropped_per_episode == 0
    stream = np.concatenate([schedule.episode_order(2, 30, e) for e in range(5)])
    got = np.concatenate([s.batch_indices(t) for t in range(s.total_steps)])
    np.testing.assert_array_equal(got, stream[: 15 * 8])
    assert s.position(3) == (0, 3)  # positions 24..31 start in episode 0
    assert s.position(4) == (1, 0)  # 32..39: episode 1's first batch


def test_wrap_with_fewer_items_than_a_batch():
    s = schedule.PromptSchedule(n_items=3, batch_prompts=8, episodes=4, seed=0, last_batch="wrap")
    assert s.total_steps == 2  # ceil(4 episodes x 3 prompts / 8); the last batch runs on
    stream = np.concatenate([schedule.episode_order(0, 3, e) for e in range(6)])
    got = np.concatenate([s.batch_indices(t) for t in range(2)])
    np.testing.assert_array_equal(got, stream[:16])


def test_drop_with_fewer_items_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match=r"3 prompts cannot fill one batch.*data.last_batch=wrap"):
        schedule.PromptSchedule(n_items=3, batch_prompts=8, episodes=1, seed=0)


@pytest.mark.parametrize("last_batch", ["drop", "wrap"])
@pytest.mark.parametrize("n_items, batch", [(30, 8), (83, 8), (500, 32), (16, 8)])
def test_position_and_step_of_round_trip(last_batch, n_items, batch):
    s = schedule.PromptSchedule(n_items, batch, episodes=5, seed=0, last_batch=last_batch)
    seen = set()
    for step in range(s.total_steps):
        episode, k = s.position(step)
        assert s.step_of(episode, k) == step
        seen.add((episode, k))
    assert len(seen) == s.total_steps


def test_resume_continues_with_the_same_batches():
    s = schedule.PromptSchedule(n_items=83, batch_prompts=8, episodes=3, seed=7)
    full = list(s.iter_steps())
    resumed = list(s.iter_steps(start_step=13))
    assert [t for t, _ in resumed] == list(range(13, s.total_steps))
    for (t1, b1), (t2, b2) in zip(full[13:], resumed):
        assert t1 == t2
        np.testing.assert_array_equal(b1, b2)


def test_steps_outside_the_schedule():
    s = schedule.PromptSchedule(n_items=30, batch_prompts=8, episodes=2, seed=0)
    with pytest.raises(ValueError, match=r"step 6 is outside the schedule's \[0, 6\)"):
        s.batch_indices(6)
    with pytest.raises(ValueError, match=r"step_in_episode must be in \[0, 3\)"):
        s.step_of(0, 3)
