"""Pacing of the training loop: throughput, checkpoints by time, and stopping cleanly on SIGINT or SIGTERM.

A signal does not stop a step half-way: the loop finishes the step it is in, writes a checkpoint and raises
``TrainingInterrupted``, whose ``exit_code`` is the shell's ``128 + signal`` (130 for Ctrl-C, 143 for
SIGTERM). A second Ctrl-C stops at once (``KeyboardInterrupt``); the last complete checkpoint stays.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

__all__ = ["CheckpointTimer", "StopSignals", "Throughput", "TrainingInterrupted", "agree_on_stop"]


class Throughput:
    """Crops per second of all processes together: ``crops_per_step / t``, with ``t`` an exponential moving
    average of the step times (``smoothing`` is the weight of the newest step)."""

    def __init__(self, crops_per_step: int, smoothing: float = 0.1):
        self.crops_per_step, self.smoothing = crops_per_step, smoothing
        self.step_seconds = 0.0
        self.steps = 0
        self._start = time.perf_counter()

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> float:
        """End the step started by ``start``; returns the smoothed crops per second."""
        seconds = time.perf_counter() - self._start
        self.steps += 1
        if self.steps <= 2:  # the first step also waits for loader workers to start: the second replaces it
            self.step_seconds = seconds
        else:
            self.step_seconds += self.smoothing * (seconds - self.step_seconds)
        return self.crops_per_step / max(self.step_seconds, 1e-9)


class CheckpointTimer:
    """``due()`` once ``minutes`` have passed since the last ``reset()`` (never for ``minutes = 0``)."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.reset()

    def reset(self) -> None:
        self._since = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self._since >= self.seconds


class TrainingInterrupted(Exception):
    """The run stopped on a signal after ``step`` steps, with a checkpoint of that step in ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint written to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Inside ``with``: SIGINT and SIGTERM set ``requested`` (the signal number) for the loop to act on at the
    end of its step; a second SIGINT raises ``KeyboardInterrupt``. The handlers before are restored on exit.
    Signal handlers can only be set from the main thread: elsewhere this changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def agree_on_stop(requested: int, device: torch.device) -> int:
    """The signal any process received (0: none), the same on every process: all stop after the same step.

    One all_reduce per step; it also keeps the processes in step as a barrier would.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return requested
    flag = torch.tensor([requested], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
