"""Stopping on SIGTERM or SIGINT: the current step finishes, a checkpoint is saved, the run exits.

A spot or preemptible TPU VM is sent SIGTERM shortly before it goes; Ctrl-C sends SIGINT.
Either asks the run to stop after the step in flight (a jitted step cannot be interrupted), save
a checkpoint and exit with 128 + the signal number, so a launcher can tell "stopped" from
"finished" and resume. A second signal stops at once: the step in flight is abandoned and the
newest checkpoint is what `--resume` continues from.
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped on a signal after saving; `code` is the process exit status."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + signum


class StopRequests:
    """Context manager: records SIGTERM / SIGINT instead of dying on the first one."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: stopping now; the step in flight is abandoned", flush=True)
            raise Stopped(signum, f"stopped by a second {name}; the newest checkpoint is kept")
        self.signum = signum
        print(
            f"\n{name}: finishing this step, then saving a checkpoint (send it again to stop "
            "at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self) -> int | None:
        """The signal that asked to stop, agreed by every process (collective when several)."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        mine = np.asarray(self.signum or 0, np.int32)
        seen = np.asarray(multihost_utils.process_allgather(mine))
        return int(seen.max()) or None
