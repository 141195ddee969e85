"""Failures that the fault-tolerance tests inject into real training runs.

A template loads these callbacks by class path from a config file (`trainer.callbacks`), with this folder on
PYTHONPATH, so the run under test is the template's own command line, unchanged.
"""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAfterEpoch(Callback):
    """kill -9 of this process right after the checkpoints of `epoch` (0-based) are written: when the next epoch
    starts (they are written in on_train_epoch_end, after every callback that does not monitor a metric)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch + 1:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(Callback):
    """Sends `signal_name` when `step` optimizer steps are done: to this process, or to its whole process group
    (every rank of a multi-process run; the test must start the run in a session of its own)."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1", process_group: bool = False):
        self.step, self.signal, self.process_group = step, getattr(signal, signal_name), process_group

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        if not self.process_group:
            os.kill(os.getpid(), self.signal)
        elif os.getpgrp() == os.getpid():  # this run leads its own group: the test is not in it
            os.killpg(os.getpgrp(), self.signal)
        else:
            raise RuntimeError("process_group=True needs a run started in its own session (start_new_session=True)")


class RaiseInTrainingStep(Callback):
    """Makes the LightningModule's training_step raise when `step` optimizer steps are done, in the batch numbered
    `micro_batch` (from 0) of that step's gradient-accumulation group."""

    def __init__(self, step: int, micro_batch: int = 0):
        self.step, self.micro_batch = step, micro_batch

    def setup(self, trainer, pl_module, stage):
        original, batches_of_step = pl_module.training_step, []

        def training_step(*args, **kwargs):
            if trainer.global_step == self.step:
                batches_of_step.append(1)
                if len(batches_of_step) > self.micro_batch:
                    raise RuntimeError(f"injected failure in training_step at step {self.step}")
            return original(*args, **kwargs)

        pl_module.training_step = training_step


class PrintRunFacts(Callback):
    """Not a failure: prints, on every rank, the metrics the run ends with and the float32 matmul precision in force,
    as one line `rank R: {json}` (one write, so the ranks' lines do not interleave)."""

    def on_train_end(self, trainer, pl_module):
        import json
        import sys

        import torch

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        facts = {"metrics": metrics, "matmul_precision": torch.get_float32_matmul_precision()}
        sys.stdout.write(f"rank {trainer.global_rank}: {json.dumps(facts)}\n")
        sys.stdout.flush()
