"""run/checkpoint.py: checksums, damaged and non-finite checkpoints skipped, full disks, cadence,
LoRA checkpoints and the base's fingerprint."""

import os
import shutil
import subprocess
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttrl_jax import sharding
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model import lora
from ttrl_jax.model.config import LoraConfig, ModelConfig
from ttrl_jax.rl import train as train_lib
from ttrl_jax.run import checkpoint as checkpoint_lib


def flip_bytes(folder):
    """Flips 64 bytes in the middle of the largest file under `folder`."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


def truncate_file(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    path = max(files, key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 3)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [flip_bytes, truncate_file])
def test_damaged_newest_checkpoint_falls_back(
    toy_run, damage, full_run, tiny_hf_model, data_file, tmp_path
):
    full_out, _ = full_run
    out = tmp_path / "run"
    shutil.copytree(full_out, out)
    assert checkpoint_lib.Checkpointer(str(out / "checkpoints")).all_steps() == [4, 5]
    damage(out / "checkpoints" / "5")
    # A torn last metrics line (a kill mid-write) must not block the resume either.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train": tr')
    proc = toy_run.start(toy_run.args(tiny_hf_model, data_file, out, "run.resume=true"))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert "checkpoint step 5" in log and "falling back to step 4" in log
    assert "dropped a torn last line" in log
    assert f"resumed from {out} at step 4" in log
    assert toy_run.records(out) == toy_run.records(full_out)
    assert toy_run.same_weights(out, full_out)


def tiny_state(n=1000):
    params = {"w": jnp.arange(n, dtype=jnp.float32)}
    return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=())


def test_checkpoints_carry_checksums_and_damage_is_skipped(tmp_path):
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, tiny_state(), {"steps_done": step})
    ckpt.close()
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), keep=3)
    assert [ckpt.verify(s) for s in (1, 2, 3)] == [None, None, None]
    flip_bytes(tmp_path / "c" / "3")
    shutil.rmtree(tmp_path / "c" / "2" / "state")
    assert "fail their checksum" in ckpt.verify(3)
    assert "is missing" in ckpt.verify(2)
    abstract = checkpoint_lib.abstract_like(tiny_state())
    state, record, step = ckpt.restore_latest(abstract)
    assert step == 1 and record["steps_done"] == 1
    np.testing.assert_array_equal(state.params["w"], np.arange(1000, dtype=np.float32))


def test_non_finite_checkpoint_is_skipped(tmp_path):
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), keep=3)
    ckpt.save(1, tiny_state(), {"steps_done": 1})
    bad = tiny_state()
    ckpt.save(2, bad.replace(params={"w": bad.params["w"].at[3].set(jnp.inf)}), {"steps_done": 2})
    ckpt.close()
    found = checkpoint_lib.Checkpointer(str(tmp_path / "c")).restore_latest(
        checkpoint_lib.abstract_like(tiny_state())
    )
    assert found[2] == 1


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_is_reported_and_the_partial_save_removed(small_disk):
    ckpt = checkpoint_lib.Checkpointer(str(small_disk / "c"), keep=2)
    ckpt.save(1, tiny_state(1000), {"steps_done": 1})  # 4 kB of params: fits
    ckpt.wait()
    with pytest.raises(checkpoint_lib.CheckpointError, match="checkpoint step 2 failed"):
        ckpt.save(2, tiny_state(1 << 20), {"steps_done": 2})  # 4 MB: does not
        ckpt.wait()
    leftovers = [n for n in os.listdir(small_disk / "c") if n != "1"]
    assert leftovers == [], leftovers
    assert ckpt.verify(1) is None
    ckpt.close(quiet=True)


def test_cadence_by_steps_time_and_end():
    cadence = checkpoint_lib.Cadence(every_steps=3, minutes=0, total_steps=7)
    assert [d for d in range(1, 8) if cadence.due(d)] == [3, 6, 7]
    timed = checkpoint_lib.Cadence(every_steps=0, minutes=1e-9, total_steps=100)
    time.sleep(0.01)
    assert timed.due(1)
    timed.saved()
    assert not checkpoint_lib.Cadence(0, 0, 100).due(5)


# ----------------------------------------------------------------------------- LoRA


def lora_model():
    cfg = ModelConfig.tiny("qwen2", num_heads=8, num_kv_heads=4, lora=LoraConfig(rank=2))
    return cfg, model_lib.init_params(cfg, jax.random.key(0))


def test_base_fingerprint_names_the_base_whatever_its_dtype_or_layout():
    cfg, params = lora_model()
    fingerprint = checkpoint_lib.base_fingerprint(cfg, params)
    assert len(fingerprint) == 16
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert checkpoint_lib.base_fingerprint(cfg.replace(param_dtype="bfloat16"), bf16) == fingerprint
    mesh = sharding.make_mesh("2x4", jax.devices()[:8])
    placed = jax.device_put(params, model_lib.param_shardings(cfg, mesh, sharding.TRAIN_RULES))
    assert checkpoint_lib.base_fingerprint(cfg, placed) == fingerprint
    # One weight changed (above bfloat16's precision), or two swapped, or another architecture.
    q = params["params"]["layers"]["attn"]["q"]
    moved = {"params": {**params["params"], "layers": {**params["params"]["layers"]}}}
    moved["params"]["layers"]["attn"] = {
        **params["params"]["layers"]["attn"], "q": q.at[1, 3, 0, 0].add(0.01)
    }  # fmt: skip
    swapped = jax.tree.map(lambda x: x, params)
    swapped["params"]["layers"]["attn"]["q"] = q[:, ::-1]
    others = [
        checkpoint_lib.base_fingerprint(cfg, moved),
        checkpoint_lib.base_fingerprint(cfg, swapped),
        checkpoint_lib.base_fingerprint(cfg.replace(rope_theta=5e5), params),
    ]
    assert len({fingerprint, *others}) == 4


def test_lora_checkpoint_holds_the_adapters_and_refuses_another_base(tmp_path):
    cfg, params = lora_model()
    tx, _ = train_lib.make_optimizer(1e-3, total_updates=10)
    state = train_lib.init_state(lora.init_adapters(cfg, jax.random.key(1)), tx)
    fingerprint = checkpoint_lib.base_fingerprint(cfg, params)
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"))
    ckpt.save(3, state, {"steps_done": 3, "base_fingerprint": fingerprint})
    ckpt.close()
    # Only the adapters and their Adam moments were written, no copy of the base.
    saved = sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "c") for f in fs
    )
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert saved < base_bytes / 2, (saved, base_bytes)
    restored, record, step = checkpoint_lib.Checkpointer(str(tmp_path / "c")).restore_latest(
        checkpoint_lib.abstract_like(state)
    )
    chex.assert_trees_all_equal(restored.params, state.params)
    checkpoint_lib.check_base(record, fingerprint, step)  # the same base: accepted
    other = checkpoint_lib.base_fingerprint(cfg, jax.tree.map(lambda x: x * 1.5, params))
    with pytest.raises(checkpoint_lib.CheckpointError) as err:
        checkpoint_lib.check_base(record, other, step)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"checkpoint step 3 holds LoRA adapters trained on another base model (fingerprint "
        f"{fingerprint}; this run's base: {other})"
    )
    checkpoint_lib.check_base({"steps_done": 3}, None, 3)  # full fine-tuning: nothing to match
