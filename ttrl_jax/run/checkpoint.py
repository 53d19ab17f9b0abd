"""Atomic, verified, resumable checkpoints through an orbax CheckpointManager.

A checkpoint holds the train state (params, optimizer state, update count) and a JSON record
(the TTRL steps done and the seed; the prompt order is a pure function of the step, see
schedule.py). Orbax writes each step into a temporary folder and renames it when complete, so a
crash mid-save leaves the previous checkpoint intact.

On top of orbax: once a step is final, a CRC-32 of each of its files is written beside it
(`checkpoints.crc/<step>.json`), and `restore_latest` checks them, so a flipped bit or a
truncated file is found before the run trains on it; a damaged step is skipped, with a warning
naming it, for the newest intact one. A background save that fails (a full disk) is reported at
the next `poll` and its partial folder removed, instead of surfacing at the following save.

With LoRA the train state is the adapters and their optimizer state alone, a small fraction of
the model; the record then names the frozen base they were trained on (`base_fingerprint`), and
a resume onto another base is refused (`check_base`) instead of training on a mismatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from ttrl_jax.model.config import ModelConfig

_CHUNK = 1 << 24  # bytes read at a time when checksumming
_NO_RECORD = "has no checksum record (the run stopped before writing it)"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the step and the cause."""


@dataclasses.dataclass
class _NewestAndKept:
    """Orbax preservation policy: the newest `n` steps, and the steps `kept()` names (the step a
    run keeps as its result, which may be older)."""

    n: int
    kept: Callable[[], Collection[int]]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        del context
        steps = [c.step for c in checkpoints]
        newest, kept = set(sorted(steps)[-self.n :]), set(self.kept())
        return [s in newest or s in kept for s in steps]


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`, and the steps `kept()`
    returns (the step chosen as the run's result: run.keep=best)."""

    def __init__(
        self,
        directory: str,
        keep: int = 2,
        async_save: bool = True,
        kept: Callable[[], Collection[int]] = tuple,
    ):
        self.directory = os.path.abspath(directory)
        self.sums_dir = self.directory + ".crc"
        self._pending: int | None = None  # the step being written in the background
        self._lock = threading.Lock()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=_NewestAndKept(keep, kept),
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # partial folders of a run that died mid-save
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        """Starts saving `state` and `record` as checkpoint `step` (collective on multi-host).

        Raises:
          CheckpointError: the previous background save failed (its partial folder is removed).
        """
        self.wait()  # the previous save is final (and its CRCs written) before this one starts
        with self._lock:
            self._pending = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
                ),
                force=True,
            )
        except Exception as e:  # a synchronous write error (e.g. no space for the metadata)
            self._discard_partial(step)
            raise CheckpointError(f"checkpoint step {step} failed: {_reason(e)}") from None
        self.poll()

    def poll(self) -> None:
        """Records the CRCs of a save that has become final; raises CheckpointError if a
        background save has failed since the last call."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            step = self._pending
            self._discard_partial(step)
            raise CheckpointError(
                f"checkpoint step {step} failed in the background: {_reason(e)}"
            ) from None
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self._record_sums()

    def wait(self) -> None:
        """Blocks until the background save is final; raises CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            step = self._pending
            self._discard_partial(step)
            raise CheckpointError(f"checkpoint step {step} failed: {_reason(e)}") from None
        self.poll()

    def close(self, quiet: bool = False) -> None:
        """Waits for the background save and closes; `quiet` swallows a failed save (another
        error is being reported)."""
        try:
            self.wait()
        except CheckpointError:
            if not quiet:
                raise
        finally:
            self.manager.close()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """The newest intact checkpoint, onto the shardings of `abstract_state`.

        A step whose files fail their checksums, that cannot be read, or whose params are not
        finite is skipped with a warning naming it. Returns (state, record, step), or None when
        no step is intact.
        """
        for step in reversed(self.all_steps()):
            problem = self.verify(step)
            if problem == _NO_RECORD:
                # Killed between the rename and the CRCs: readable and finite is accepted.
                print(f"warning: checkpoint step {step} {problem}; restoring it unverified")
                problem = None
            if problem is None:
                try:
                    state, record = self._restore(step, abstract_state)
                except Exception as e:
                    problem = f"cannot be read ({_reason(e)})"
                else:
                    if np.isfinite(float(optax.tree.norm(state.params))):
                        return state, record, step
                    problem = "holds non-finite params"
            older = [s for s in self.all_steps() if s < step]
            fallback = f"falling back to step {older[-1]}" if older else "no older checkpoint"
            print(f"warning: checkpoint step {step} {problem}; {fallback}", flush=True)
            # Unusable, and its step is about to be redone (and saved) again.
            self.manager.delete(step)
            self._drop_sums(step)
        return None

    def restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Checkpoint `step` (checksums verified) onto the shardings of `abstract_state`.

        Raises:
          CheckpointError: the step is missing, damaged or unreadable.
        """
        if step not in self.all_steps():
            raise CheckpointError(f"checkpoint step {step} is not in {self.directory}")
        problem = self.verify(step)
        if problem not in (None, _NO_RECORD):
            raise CheckpointError(f"checkpoint step {step} {problem}")
        try:
            return self._restore(step, abstract_state)
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} cannot be read ({_reason(e)})") from None

    def verify(self, step: int) -> str | None:
        """None if every file of checkpoint `step` matches its recorded CRC, else what is wrong."""
        path = os.path.join(self.sums_dir, f"{step}.json")
        try:
            with open(path) as f:
                recorded = json.load(f)
        except FileNotFoundError:
            return _NO_RECORD
        except (OSError, ValueError) as e:
            return f"has an unreadable checksum record ({_reason(e)})"
        found = _file_sums(os.path.join(self.directory, str(step)))
        missing = sorted(set(recorded) - set(found))
        changed = sorted(n for n in recorded if n in found and found[n] != recorded[n])
        if missing:
            return f"is missing {len(missing)} file(s), e.g. {missing[0]}"
        if changed:
            return f"is damaged: {len(changed)} file(s) fail their checksum, e.g. {changed[0]}"
        return None

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["record"]

    def _record_sums(self) -> None:
        """After a step is final: record its files' CRCs (process 0), drop stale records."""
        with self._lock:
            step, self._pending = self._pending, None
        if step is None or jax.process_index() != 0:
            return
        folder = os.path.join(self.directory, str(step))
        if not os.path.isdir(folder):
            return
        os.makedirs(self.sums_dir, exist_ok=True)
        tmp = os.path.join(self.sums_dir, f".{step}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(_file_sums(folder), f)
        os.replace(tmp, os.path.join(self.sums_dir, f"{step}.json"))
        kept = {f"{s}.json" for s in self.manager.all_steps()} | {f"{step}.json"}
        for name in os.listdir(self.sums_dir):
            if name.endswith(".json") and name not in kept:
                os.remove(os.path.join(self.sums_dir, name))

    def _drop_sums(self, step: int) -> None:
        if jax.process_index() == 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.sums_dir, f"{step}.json"))

    def _discard_partial(self, step: int | None) -> None:
        """Removes the temporary folder(s) of a failed save, which would keep the disk full."""
        with self._lock:
            self._pending = None
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if (step is not None and name.startswith(f"{step}.")) or "tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)


class Cadence:
    """When to checkpoint: every `every_steps` steps, every `minutes` minutes, and at the end."""

    def __init__(self, every_steps: int, minutes: float, total_steps: int):
        self.every_steps, self.seconds, self.total = every_steps, 60.0 * minutes, total_steps
        self.last = time.monotonic()

    def due(self, done: int) -> bool:
        by_steps = bool(self.every_steps) and done % self.every_steps == 0
        by_time = self.seconds > 0 and time.monotonic() - self.last >= self.seconds
        return done == self.total or by_steps or by_time

    def saved(self) -> None:
        self.last = time.monotonic()


def base_fingerprint(cfg: ModelConfig, params: Any) -> str:
    """A short hash naming a base model: its architecture and a checksum of every tensor.

    Each checksum is a position-weighted sum of the tensor's bfloat16 bit patterns modulo 2^32:
    the same whether the base was loaded in float32 or bfloat16, and exact on any mesh (integer
    sums do not depend on the order of a sharded reduction). One pass over the base, on device.
    """
    arch = {k: v for k, v in cfg.to_hf().items() if k not in ("torch_dtype", "dtype")}
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    sums = jax.device_get(jax.jit(lambda xs: [_checksum(x) for x in xs])([x for _, x in leaves]))
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for (path, x), total in zip(leaves, sums):
        h.update(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {int(total)};".encode())
    return h.hexdigest()[:16]


def _checksum(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    # The row-major position of each element (mod 2^32), built without reshaping a sharded array.
    index = jnp.zeros(x.shape, jnp.uint32)
    for axis, n in enumerate(x.shape):
        index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


def check_base(record: dict[str, Any], fingerprint: str | None, step: int) -> None:
    """Raises CheckpointError when checkpoint `step` was trained on another base model than the
    one `fingerprint` names (both None: no LoRA, nothing to match)."""
    saved = record.get("base_fingerprint")
    if saved != fingerprint:
        raise CheckpointError(
            f"checkpoint step {step} holds LoRA adapters trained on another base model "
            f"(fingerprint {saved}; this run's base: {fingerprint}); resume with the base model "
            "it was trained on"
        )


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a live pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _file_sums(folder: str) -> dict[str, int]:
    """CRC-32 of every file under `folder`, by path relative to it."""
    sums = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    crc = zlib.crc32(chunk, crc)
            sums[os.path.relpath(path, folder)] = crc
    return sums


def _reason(e: BaseException) -> str:
    """The first line of an exception, for one-line messages."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
