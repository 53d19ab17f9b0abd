"""The run directory: one writer at a time, the run's saved config, and what a resume continues.

- A lock (`flock` on `run.out_dir/.lock`, held by process 0 while the run lives) refuses a
  second run on the same folder; the kernel drops it when the holder dies, so a crashed run
  never leaves it stale.
- `--resume` compares the config with the one the run saved (`config.yaml`) and refuses a change
  that alters the run (the model, data, sampling, rewards, optimizer, schedule, seed) unless
  `run.accept_config_change=true`; settings that only change logging, checkpointing or the mesh
  may differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
import time
from collections.abc import Iterator

import jax

from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import Config, ConfigError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
# Keys whose change does not alter what a resumed run computes.
HARMLESS_KEYS = frozenset(
    {
        "mesh.shape",
        "run.out_dir",  # a run folder may be moved or copied
        "run.resume",
        "run.accept_config_change",
        "run.checkpoint_every",
        "run.checkpoint_minutes",
        "run.keep_checkpoints",
        "run.tensorboard",
        "run.wandb",
        "run.wandb_project",
        "run.export_hf",
        "run.baseline",
        "eval.every_steps",
        "eval.benchmarks",
        "eval.before_training",
    }
)


class RunDirBusy(RuntimeError):
    """Another live run holds the run directory."""


@contextlib.contextmanager
def lock(out_dir: str) -> Iterator[None]:
    """Holds the run directory's lock (process 0) for the duration of the block."""
    if jax.process_index() != 0:
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise RunDirBusy(
                f"run.out_dir {out_dir} is in use by a run that is still going ({holder}); "
                "wait for it to finish, or choose another run.out_dir"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def saved_config_path(cfg: Config) -> str:
    return os.path.join(cfg.run.out_dir, CONFIG_FILE)


def config_changes(old: Config, new: Config) -> list[str]:
    """`key: old -> new` for every key that differs and would alter the run."""
    a, b = config_lib.config_to_dict(old), config_lib.config_to_dict(new)
    changes = []
    for section in a:
        for key in a[section]:
            dotted = f"{section}.{key}"
            if dotted not in HARMLESS_KEYS and a[section][key] != b[section][key]:
                changes.append(f"{dotted}: {a[section][key]!r} -> {b[section][key]!r}")
    return changes


def check_resume_config(cfg: Config) -> None:
    """Raises ConfigError if `cfg` changes what the saved run computes (unless accepted)."""
    path = saved_config_path(cfg)
    if not os.path.isfile(path) or cfg.run.accept_config_change:
        return
    try:
        saved = config_lib.load_config(path)
    except ConfigError as e:
        raise ConfigError(
            f"--resume: the run's saved {path} no longer loads ({e}); pass "
            "run.accept_config_change=true to continue with the given config"
        ) from None
    changes = config_changes(saved, cfg)
    if changes:
        raise ConfigError(
            f"--resume: the config differs from the run's saved {path} in "
            f"{'; '.join(changes)}. Resume with the saved settings (e.g. --config {path} "
            "--resume), or pass run.accept_config_change=true to continue with the new ones"
        )


def save_config(cfg: Config) -> None:
    """Writes the resolved config into the run directory (process 0), atomically."""
    if jax.process_index() != 0:
        return
    path = saved_config_path(cfg)
    tmp = path + ".tmp"
    # The saved config records the run, not how this invocation was started.
    config_lib.save_config(
        dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, resume=False, accept_config_change=False)
        ),
        tmp,
    )
    os.replace(tmp, path)
