"""Support module of the pytorch-lightning skill's templates: the run machinery they share. Not a template.

scaffold.py copies this file next to the template it scaffolds; the template imports it. It holds what makes a run
resumable and its errors readable, once, so that a template holds only its model, its data and a short command line:

- errors and exit codes: run_cli() turns bad input into one line and exit code 2, a NaN loss into exit code 1,
  SIGTERM into 143;
- callbacks every run gets: NaN stop, checkpoint on an exception, random state and an unfinished batch saved in every
  checkpoint (exact resume), the validation history behind fit's last line, tokens/s and MFU, the prediction writer;
- TemplateCLI: LightningCLI plus best/last checkpoints in a fixed folder, early stopping, a learning-rate monitor,
  the float32 matmul precision, nearest-key errors, checks of --ckpt_path before anything is built, and the line fit
  ends with (the kept checkpoint and the `next:` command that evaluates it);
- helpers for models: AdamW with weight-decay groups, gradient clipping under every strategy, sharding the repeated
  blocks under FSDP and FSDP2, Hugging Face loading with one-line errors, LoRA adapters (peft);
- helpers for data: conversations as tokens with the answers' labels (chat templates, packing), a sampler that
  resumes mid-epoch where the run stopped;
- commands on a trained checkpoint beside LightningCLI's (`export`, `generate`): run_tool() and save_hf_folder().

Checkpoints name callback state by class name (StopOnNonFiniteLoss, ResumableRandomState, ...): keep the names, and
checkpoints written by earlier runs keep loading. references/checkpointing.md, "What survives what", lists the tests.
"""

import argparse
import ast
import contextlib
import csv
import difflib
import errno
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
import zipfile
from argparse import ArgumentError
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (BasePredictionWriter, Callback, EarlyStopping, LearningRateFinder,
                                         LearningRateMonitor, ModelCheckpoint, ThroughputMonitor)
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import Dataset, DistributedSampler


class ConfigError(ValueError):
    """Bad data, model or configuration input: reported as one line, exit code 2."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf: reported as one line, exit code 1."""


# ----------------------------------------------------------------------------------------------------------------
# Callbacks every run gets (references/checkpointing.md, "What survives what")
# ----------------------------------------------------------------------------------------------------------------
class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN/inf training loss and names its step. The flag stays on the device (no GPU
    sync per step): it is read every step on CPU, and on GPUs on logging steps, before validation, at epoch end and
    before every checkpoint save, so no checkpoint holds weights trained on a NaN. With several processes the ranks
    decide together (one rank stopping alone would leave the others waiting)."""

    def __init__(self):
        self.first_bad_step = None
        self.step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step  # the step this batch belongs to, numbered as in the logs (from 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not torch.is_tensor(loss):
            return
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, device=loss.device)
        new = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(new, self.step, self.first_bad_step)
        if loss.device.type == "cpu" or trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self.check(trainer)

    def on_validation_start(self, trainer, pl_module):
        self.check(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.check(trainer)

    def check(self, trainer) -> None:
        if self.first_bad_step is None:
            return
        step = int(trainer.strategy.reduce(self.first_bad_step.clone(), reduce_op="max"))  # any rank's bad step
        if step >= 0:
            raise NonFiniteLossError(
                f"the training loss is NaN or inf at step {step}: training stopped. Likely causes: a learning rate"
                " too high, float16 overflow (use bf16-mixed or 32-true), NaN/inf in the data, or a log/division of"
                " zero in the loss. Run scripts/smoke_test.py to name the first bad operation; after fixing it,"
                " --ckpt_path last continues from the last good checkpoint (with its learning rate and schedule), or"
                " start a new run with a lower learning rate")


def monitor_missing(err: BaseException) -> bool:
    """A checkpoint or early-stopping monitor naming a metric that is not logged: found at the first validation."""
    text = str(err)
    return (isinstance(err, MisconfigurationException) and "could not find the monitored key" in text
            or isinstance(err, RuntimeError) and "Early stopping conditioned on metric" in text)


def schedule_exhausted(err: BaseException) -> bool:
    """A schedule built for a fixed number of steps (OneCycleLR's total_steps) stepped past its end: a run resumed
    with a larger max_epochs. Resuming again would fail again."""
    return isinstance(err, ValueError) and re.match(r"Tried to step \d+ times\. The specified number of total steps",
                                                    str(err)) is not None


class CheckpointOnException(Callback):
    """On an exception or Ctrl-C during training, saves <dirpath>/last-on-exception.ckpt, so --ckpt_path last (the
    newest whole checkpoint) continues from that step. Unlike Lightning's OnExceptionCheckpoint it does not turn every
    fit without --ckpt_path into a resume, and it saves nothing after a NaN/inf loss (poisoned weights), when no step
    ran, or with several processes (a rank failing alone would wait forever in the collective save)."""

    def __init__(self, dirpath: Optional[str] = None):
        self.dirpath = dirpath
        self.start_step = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception):
        if (self.dirpath is None or self.start_step is None or trainer.global_step <= self.start_step
                or trainer.world_size > 1 or trainer.fast_dev_run or isinstance(exception, NonFiniteLossError)
                or monitor_missing(exception) or schedule_exhausted(exception)  # nothing to continue from
                or isinstance(exception, OSError)):  # a full or failing disk: no place for another save
            return
        path = Path(self.dirpath) / "last-on-exception.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint, to resume from
        print(f"{type(exception).__name__} at step {trainer.global_step}: saved {path}; continue with"
              " --ckpt_path last", file=sys.stderr)


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # write errors the user fixes outside the run


def sync_folder(folder: Path) -> None:
    """Makes a rename in `folder` survive a power cut (POSIX; Windows has no folder handles)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written whole or not at all: to .NAME.partial beside the final name, synced to disk, then
    renamed over it. Lightning's own save writes to the system temp folder and copies the file across, which a kill
    or a full disk can leave cut short under the checkpoint's name."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or re.match(r"\w+://", str(path)):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        buffer = io.BytesIO()  # as Lightning does; torch.save straight to a file hides a full disk's OSError
        torch.save(checkpoint, buffer)
        try:
            with open(partial, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except OSError as err:  # a full disk: name the file the message is about
            raise OSError(err.errno, err.strerror, str(path)) from None
        finally:
            partial.unlink(missing_ok=True)  # a failed save leaves nothing behind
        sync_folder(path.parent)


class AtomicSaveConfig(SaveConfigCallback):
    """LightningCLI's config.yaml of the run, written to a staging name and renamed: never half-written; beside it
    run.json, what else made the run (run_record)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir:
            return super().setup(trainer, pl_module, stage)
        log_dir = self.log_dir = Path(trainer.log_dir)  # a broadcast: every rank must ask, not only rank 0
        final, self.config_filename = self.config_filename, f".{self.config_filename}.partial"
        try:
            super().setup(trainer, pl_module, stage)
            if trainer.is_global_zero:
                with open(log_dir / self.config_filename, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(log_dir / self.config_filename, log_dir / final)
        except BaseException:
            if trainer.is_global_zero:
                (log_dir / self.config_filename).unlink(missing_ok=True)
            raise
        finally:
            self.config_filename = final

    def save_config(self, trainer, pl_module, stage: str) -> None:  # rank 0, after config.yaml
        staged = self.log_dir / ".run.json.partial"
        staged.write_text(json.dumps(run_record(self.config, trainer.datamodule), indent=2, default=str))
        os.replace(staged, self.log_dir / "run.json")


def run_record(config, datamodule=None) -> dict:
    """What made a run besides its config.yaml: the command, Python and package versions, the project's git commit
    and a fingerprint of every data.*_path, to tell two runs apart (summarize_run.py --compare)."""
    from importlib import metadata

    versions = {}
    for name in ("torch", "lightning", "torchmetrics", "transformers", "peft", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    data = config.get("data") or {}
    paths = {k: data[k] for k in (data.keys() if hasattr(data, "keys") else ()) if k.endswith("_path") and "." not in k}
    paths["data_path"] = paths.get("data_path") or getattr(datamodule, "path", None)  # the template's default data
    paths = {k: v for k, v in paths.items() if isinstance(v, (str, Path)) and Path(v).exists()}
    return {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], "python": sys.version.split()[0],
            "packages": versions, "git_commit": git_commit(Path(sys.argv[0]).resolve().parent),
            "seed": config.get("seed_everything"), "data": {k: fingerprint(Path(v)) for k, v in paths.items()}}


def fingerprint(path: Path) -> dict:
    """sha256 of a file (of its first and last 64 MB and its size above 1 GB), or of a folder's file names and sizes."""
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        for f in files:
            digest.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\n".encode())
        return {"path": str(path), "files": len(files), "sha256_of_names_and_sizes": digest.hexdigest()}
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size > 2**30:
            digest.update(f.read(2**26) + f.seek(-2**26, 2).to_bytes(8, "little") + f.read())
        else:
            for block in iter(lambda: f.read(2**24), b""):
                digest.update(block)
    return {"path": str(path), "bytes": size, "sha256" if size <= 2**30 else "sha256_of_ends": digest.hexdigest()}


def git_commit(folder: Path) -> Optional[str]:
    """The commit checked out in the git repository holding `folder`, read from .git (no git process)."""
    for root in (folder, *folder.parents):
        head = root / ".git" / "HEAD"
        if head.is_file():
            ref = head.read_text().strip()
            if not ref.startswith("ref: "):
                return ref  # a detached HEAD is the commit itself
            loose = root / ".git" / ref[5:]
            if loose.is_file():
                return loose.read_text().strip()
            packed = root / ".git" / "packed-refs"
            lines = packed.read_text().splitlines() if packed.is_file() else []
            return next((line.split()[0] for line in lines if line.endswith(" " + ref[5:])), None)
    return None


class ResumableRandomState(Callback):
    """Stores the torch random state in every checkpoint and restores it on resume, so data order and dropout go
    on as in an uninterrupted run (Lightning saves no random state)."""

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"].cpu())


def unfinished_batches(trainer) -> int:
    """Batches of this epoch whose gradients the weights do not hold yet: those of an unfinished accumulation group
    (Lightning steps every accumulate_grad_batches batches of an epoch, and at its last batch; DeepSpeed keeps its
    own count, left as it is)."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if done >= trainer.num_training_batches or trainer.strategy.handles_gradient_accumulation:
        return 0
    return done % trainer.accumulate_grad_batches


class ResumeAtUnfinishedBatch(Callback):
    """Writes every checkpoint so that a resumed run redoes the batches its weights do not hold: one that had started
    (an exception, SLURM's requeue signal) and those of an unfinished gradient-accumulation group, whose gradients
    are not saved. Lightning 2.6 goes on after the last finished batch, so such a group stepped with part of its
    gradients, and its restart logic expects saves between batches: from one inside a batch it resumed with the
    run's batch count one ahead (validation came one batch early with check_val_every_n_epoch=None) and the logged
    step numbers one ahead. Such checkpoints are written as Lightning writes one at the end of the batch before."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        progress = loop.get("epoch_loop.batch_progress")
        redo = unfinished_batches(trainer)
        in_batch = progress is not None and progress["current"]["processed"] < progress["current"]["ready"]
        if progress is None or not (in_batch or redo):
            return
        for counts in (progress["total"], progress["current"]):
            done = counts["processed"] - redo  # on_train_batch_end's state: all counted but completed
            counts.update(ready=done, started=done, processed=done, completed=done - 1)
        progress["is_last_batch"] = False
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1  # that restart adds the step it assumes uncounted


class RecordSteps(Callback):
    """Writes each training batch's loss and learning rate to a CSV, `step,loss,lr` (--record_steps FILE), exactly
    (Python's repr of the float32 values): scripts/compare_runs.py compares it with the same file written by a plain
    loop (references/migration.md). step counts batches from 0 across epochs; the loss is the one backward saw
    (divided by accumulate_grad_batches); lr is the first parameter group's at the batch's start. A new run starts
    the file over; a resumed one (append=True) adds to it, and compare_runs.py keeps the last row of a step. Rank
    0's batches only; one device sync per batch."""

    def __init__(self, path: str, append: bool = False):
        self.path = Path(path)
        self.append = append
        self.lr = float("nan")

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.append or not self.path.is_file() or self.path.stat().st_size == 0:
                self.path.write_text("step,loss,lr\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if trainer.is_global_zero and torch.is_tensor(loss):
            step = trainer.fit_loop.epoch_loop.batch_progress.total.processed - 1
            with open(self.path, "a") as f:
                f.write(f"{step},{float(loss)!r},{float(self.lr)!r}\n")


class ScheduleAtResume(Callback):
    """Sets each learning rate from its LambdaLR schedule where the run starts. A resumed run restores the optimizer's
    learning rates as the old schedule left them: a run resumed with a larger max_epochs (the templates' schedules
    read it at each step) would train its first epoch at the old schedule's end, 0 for a cosine. A fresh run, or a
    resume under the same schedule, is unchanged."""

    def on_train_start(self, trainer, pl_module):
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # not e.g. the Tuner's lr_find sweep
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                               scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)


class ValidationHistory(Callback):
    """The validation metrics of each validation in this process, by global step: fit's last line reports those of
    the kept checkpoint (accuracy, say, next to the loss it was ranked by)."""

    def __init__(self):
        self.by_step: dict = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.by_step[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                                 if k.startswith("val_") and v.numel() == 1}


# Dense bf16/fp16 peak FLOP/s of GPUs that Lightning's table lacks (it has no "H200", bare "H100" or "B200" entry).
PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "b200": 2250.0, "gb200": 2500.0}


def missing_peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOP/s for GPUs Lightning's table lacks; a bare "H100" is taken as the SXM part."""
    words = device_name.lower().split()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in words), None)
    if peak is not None and precision.startswith(("32", "64")):  # TF32 tensor cores: half the bf16 rate
        peak /= 2
    return peak


class Throughput(ThroughputMonitor):
    """ThroughputMonitor (samples/s, items/s = tokens/s, and MFU from the LightningModule's flops_per_batch) that (1)
    supplies the peak FLOP/s Lightning lacks for some GPUs (or the one you pass) and (2) times training only at
    logging steps and when validation starts (on CPUs as on GPUs): the stock callback calls torch.cuda.synchronize()
    after every batch. window_size counts these timings, not batches. A batch is a tuple whose first item is the input
    tensor [batch, items]."""

    def __init__(self, peak_tflops: Optional[float] = None, window_size: int = 5):
        super().__init__(batch_size_fn=lambda batch: batch[0].size(0), length_fn=lambda batch: batch[0].numel(),
                         window_size=window_size)
        self.peak_tflops = peak_tflops
        self._timed: dict = {}  # per stage: batches counted at the last timing

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        peak = self.peak_tflops
        if peak is None and self.available_flops is None and device.type == "cuda":
            peak = missing_peak_tflops(torch.cuda.get_device_name(device), str(trainer.precision))
        if peak is not None:
            self.available_flops = int(peak * 1e12)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops

    def _start(self, trainer) -> None:
        super()._start(trainer)
        self._timed[trainer.state.stage] = self._batches[trainer.state.stage]

    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        stage = trainer.state.stage
        self._lengths[stage] += self.length_fn(batch)
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
        if stage != RunningStage.TRAINING or (trainer._logger_connector.should_update_logs
                                              and not trainer.fit_loop._should_accumulate()):
            self._time(trainer, pl_module, stage)  # else counted now, timed at the next logging step

    def _time(self, trainer, pl_module, stage) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the queued steps finish: the clock then covers them
        new = self._batches[stage] - self._timed[stage]
        self._timed[stage] = self._batches[stage]
        flops = getattr(pl_module, "flops_per_batch", None)
        self._throughputs[stage].update(time=time.perf_counter() - self._t0s[stage], batches=self._batches[stage],
                                        samples=self._samples[stage], lengths=self._lengths[stage],
                                        flops=None if flops is None else flops * new)  # FLOPs of the new batches

    @rank_zero_only
    def on_validation_start(self, trainer, pl_module) -> None:
        stage = RunningStage.TRAINING
        if not trainer.sanity_checking and self._batches.get(stage, 0) > self._timed.get(stage, 0):
            self._time(trainer, pl_module, stage)  # end the training interval here: validation time is not in it
        super().on_validation_start(trainer, pl_module)


class PredictionWriter(BasePredictionWriter):
    """Writes `predict`'s outputs to <default_root_dir>/predictions/<checkpoint name>.csv, one file however many
    processes predicted (each writes its rows, rank 0 joins them in dataset order) and however many runs came before,
    and prints it. predict_step returns a dict of columns (tensors or lists, one value per row); the first column
    names each row's input: the datamodule's predict_sources = (column name, one value per item of the predict
    dataset), else the item's index; its predict_columns = {name: one value per item} follow (the text itself)."""

    def __init__(self, checkpoint: Optional[str]):
        super().__init__(write_interval="epoch")
        self.name = Path(checkpoint).stem if checkpoint else "untrained"

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        folder = Path(trainer.default_root_dir) / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        column, sources = getattr(trainer.datamodule, "predict_sources", ("index", None))
        extra = getattr(trainer.datamodule, "predict_columns", {})
        with open(folder / f".{self.name}.rank{trainer.global_rank}.part", "w", newline="") as f:
            writer = csv.writer(f)  # this process's rows, each after its index in the dataset
            for n, (batch, indices) in enumerate(zip(predictions, batch_indices[0])):
                columns = {key: value.tolist() if torch.is_tensor(value) else list(value)
                           for key, value in batch.items()}
                if n == 0:
                    writer.writerow(["", column, *extra, *columns])
                for row, index in enumerate(indices):
                    values = [f"{v[row]:.4f}" if isinstance(v[row], float) else v[row] for v in columns.values()]
                    writer.writerow([index, sources[index] if sources is not None else index,
                                     *(v[index] for v in extra.values()), *values])
        trainer.strategy.barrier()  # every process has written its rows
        if not trainer.is_global_zero:
            return
        header, rows = None, {}
        for rank in range(trainer.world_size):
            part = folder / f".{self.name}.rank{rank}.part"
            with open(part, newline="") as f:
                lines = list(csv.reader(f))
            header = header or (lines[0][1:] if lines else None)
            rows.update((int(line[0]), line[1:]) for line in lines[1:])  # a row predicted twice is kept once
            part.unlink()
        path, staged = folder / f"{self.name}.csv", folder / f".{self.name}.csv.part"
        with open(staged, "w", newline="") as f:
            csv.writer(f).writerows([header or [column], *(rows[i] for i in sorted(rows))])
        staged.replace(path)  # a run stopped while writing leaves no half-written predictions file
        print(f"predictions written to {path.resolve()}")


# ----------------------------------------------------------------------------------------------------------------
# Helpers for models
# ----------------------------------------------------------------------------------------------------------------
def adamw(module, lr: float, weight_decay: float, betas: tuple = (0.9, 0.999),
          lr_scale: Optional[dict] = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, no weight decay on biases and norms (1-D parameters), fused into one
    kernel where PyTorch can (CUDA and CPU), but not under 16-mixed, whose gradient scaler must unscale first.
    lr_scale {name prefix: factor}: those parameters train at lr x factor (a pretrained backbone's lower rate).
    Under DeepSpeed with an offloaded optimizer, DeepSpeedCPUAdam, which offloading requires."""
    groups: dict = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            scale = next((f for prefix, f in (lr_scale or {}).items() if name.startswith(prefix)), 1.0)
            decay = weight_decay if p.ndim >= 2 else 0.0
            group = groups.setdefault((scale, decay), {"params": [], "weight_decay": decay, "lr": lr * scale})
            group["params"].append(p)
    groups = list(groups.values())
    strategy = module.trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) and strategy.config.get("zero_optimization", {}).get(
            "offload_optimizer"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas)
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    fused = module.device.type in ("cuda", "cpu") and scaler is None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def log_train_loss(module, loss: torch.Tensor, batch_size: int) -> None:
    """Logs train_loss on the steps the logger writes (every log_every_n_steps) and train_loss_epoch, the epoch's mean
    weighted by batch size as self.log's is, at its last batch: the same values as two self.log calls a step, which
    cost about 0.3 ms of Python each (Lightning moves its result holder to the device on every call): a tabular CPU
    step went from 2.6 to 2.0 ms. No device sync."""
    trainer, loss = module.trainer, loss.detach()
    total = module.__dict__.get("_train_loss_total")
    if total is None or trainer.fit_loop.epoch_loop.batch_progress.current.processed == 0:  # a new epoch
        total = module.__dict__["_train_loss_total"] = [torch.zeros((), device=loss.device), 0]
    total[0] += loss.float() * batch_size
    total[1] += batch_size
    every = trainer.log_every_n_steps  # the logger's own test: it writes when step + 1 is a multiple
    if every and (trainer.global_step + 1) % every == 0 or trainer.should_stop or trainer.fast_dev_run:
        module.log("train_loss", loss)
    if trainer.is_last_batch:
        module.log("train_loss_epoch", total[0] / total[1], on_step=False, on_epoch=True, sync_dist=True)


def cosine_by_epoch(module, optimizer: torch.optim.Optimizer):
    """configure_optimizers' return: the learning rate from its value down a cosine to 0 at max_epochs, stepped each
    epoch. max_epochs is read at each step, so a resumed run with a larger one follows the longer schedule from where
    it is (CosineAnnealingLR would keep the old length, reach 0 and climb back up); ScheduleAtResume sets the rate
    where it resumes. max_epochs -1 (until stopped): a constant learning rate."""
    if not module.trainer.max_epochs or module.trainer.max_epochs < 1:
        return optimizer

    def cosine(epoch: int) -> float:
        total = max(1, module.trainer.max_epochs)
        return 0.5 * (1 + math.cos(math.pi * min(epoch, total) / total))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def clip_gradients(module, gradient_clip_val, gradient_clip_algorithm) -> None:
    """A LightningModule's configure_gradient_clipping for every strategy: Lightning 2.6 refuses to clip for a fused
    optimizer under bf16-mixed (no gradient scaler is involved; Lightning #21435) and refuses norm clipping under
    FSDP. Gradients are unscaled by the time it runs; DeepSpeed clips inside its engine."""
    strategy = module.trainer.strategy
    if not gradient_clip_val or isinstance(strategy, DeepSpeedStrategy):
        return
    if gradient_clip_algorithm == "value":
        torch.nn.utils.clip_grad_value_(module.parameters(), gradient_clip_val)
    elif isinstance(strategy, FSDPStrategy):  # the norm over every rank's shards
        module.trainer.model.clip_grad_norm_(gradient_clip_val)
    else:  # DDP's gradients are already averaged; FSDP2's are DTensors, whose norm covers all shards
        torch.nn.utils.clip_grad_norm_(module.parameters(), gradient_clip_val)


def sharded(module) -> bool:
    """Whether the module's weights are split over processes (FSDP, FSDP2, DeepSpeed)."""
    trainer = module._trainer
    return trainer is not None and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy,
                                                                 DeepSpeedStrategy))


def shard_blocks(module, model: torch.nn.Module, blocks: list) -> None:
    """Shards the repeated blocks (transformer layers) one at a time, from a LightningModule's configure_model:
    FSDP wraps each as its own unit (without a policy it gathers every weight at once); FSDP2
    (ModelParallelStrategy) applies fully_shard to each block, then to the model. With tensor_parallel_size 1 the
    shards span every data-parallel rank; with "auto" sizes (nodes x GPUs per node) they span one node and are
    replicated across nodes (HSDP). No tensor-parallel plan here."""
    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    if isinstance(strategy, FSDPStrategy) and "auto_wrap_policy" not in strategy.kwargs:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy({type(b) for b in blocks})
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.fsdp import fully_shard

        dp = module.device_mesh["data_parallel"].size()
        tp = module.device_mesh["tensor_parallel"].size()
        mesh = module.device_mesh["data_parallel"] if tp == 1 else (
            module.device_mesh["tensor_parallel"] if dp == 1 else module.device_mesh)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        sys.stdout.write(f"[rank {module.global_rank}] FSDP2: this rank holds {local:,} of {total:,} parameter"
                         " elements\n")  # one write: the ranks' lines do not interleave


def pretrained(load, name_or_path: str, what: str = "model", **kwargs):
    """load(name_or_path, **kwargs), a Hugging Face from_pretrained, with one-line errors: a missing local folder, a
    name not in the cache offline, and a model that ships its own code (run only with trust_remote_code)."""
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"folder not found: {name_or_path}: pass a folder saved with save_pretrained")
    try:
        return load(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        fix = ("it ships its own Python code: read it, and only if you trust it pass --model.trust_remote_code true"
               if "custom code" in str(err) else
               "offline, pass a local folder saved with save_pretrained or a name already in the cache")
        raise ConfigError(f"cannot load {what} {name_or_path!r} ({str(err).splitlines()[0]}): {fix}") from None


# LoRA's default target modules per architecture: the attention and MLP projections of every block (the QLoRA
# paper's choice). detect_hardware.py's memory planner counts adapters with the same table. Other types: every Linear
# layer except the output head (peft's "all-linear").
LORA_TARGETS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite"),
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def add_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: Optional[list] = None,
             task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """The model frozen, with trainable low-rank adapters (peft) on `targets` (None: LORA_TARGETS for its type;
    for a classifier, SEQ_CLS, peft's own defaults for the type, and its head trains in full)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install peft") from None
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ConfigError(f"LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1 (got {r}, {alpha},"
                          f" {dropout})")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets:
        targets = list(targets)
    elif task_type == "CAUSAL_LM":
        targets = LORA_TARGETS.get(model_type, "all-linear")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # no module of that name
        raise ConfigError(f"LoRA: {one_line(err)[:300]}: set --model.lora_targets to names of Linear layers of the"
                          " model (print(model) shows them)") from None


def four_bit_device(module) -> torch.device:
    """The GPU a QLoRA model's frozen weights load on in 4 bits (the run's, or outside a Trainer the current one),
    after the checks that it can: CUDA, a 16-bit -mixed precision, no sharding, bitsandbytes."""
    cuda = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = module.trainer.strategy.root_device if module._trainer is not None else cuda
    if device.type != "cuda":
        raise ConfigError("--model.finetune qlora loads the model in 4 bits with bitsandbytes, on a CUDA GPU only:"
                          " use --config configs/gpu.yaml, or --model.finetune lora here")
    if module._trainer is not None and str(module.trainer.precision) not in ("bf16-mixed", "16-mixed"):
        raise ConfigError("--model.finetune qlora trains under --trainer.precision bf16-mixed (or 16-mixed on GPUs"
                          " without bfloat16)")
    if sharded(module):  # 4-bit weights are integers, which FSDP and DeepSpeed cannot shard
        raise ConfigError("--model.finetune qlora runs on one GPU or under DDP (configs/gpu.yaml, ddp.yaml): use"
                          " --model.finetune lora with FSDP or DeepSpeed")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--model.finetune qlora needs bitsandbytes: pip install bitsandbytes")
    return device


def trainable_keys(module: torch.nn.Module) -> set:
    """State-dict names of the parameters that train, without the wrappers' prefixes (FSDP, checkpointing)."""
    return {re.sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.", "", name)
            for name, p in module.named_parameters() if p.requires_grad}


# ---- data for language models: conversations (instruction tuning) and a sampler that resumes mid-epoch ----------
def chat_tokens(tokenizer, messages: list, generation_prompt: bool = False, where: str = "the prompt") -> tuple:
    """(token ids, labels) of a conversation: labels are the ids of the assistant's turns (their end-of-turn token
    included) and -100 (not learned) elsewhere. Rendered with the tokenizer's chat template where it has one, else as
    "<|role|>\n" + text per turn, an assistant's ended by the end-of-text token (byte 0 for UTF-8 bytes).
    generation_prompt: end with the start of an assistant turn (for generate)."""
    if tokenizer is not None and tokenizer.chat_template:
        def render(turns, open_turn):
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=open_turn)
            return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote them

        def extends(longer, shorter):
            if longer[:len(shorter)] != shorter:  # e.g. a template that moves the system prompt to the last turn
                raise ConfigError(f"{where}: the tokenizer's chat template does not render this conversation turn"
                                  " after turn, so the answers cannot be told apart: use --data.data_format text with"
                                  " a text field, or a tokenizer with another template")

        ids, labels = [], []
        try:
            for i, message in enumerate(messages):
                if message["role"] == "assistant":
                    before, after = render(messages[:i], True), render(messages[:i + 1], False)
                    extends(before, ids)
                    extends(after, before)
                    labels += [-100] * (len(before) - len(ids)) + after[len(before):]
                    ids = after
            if generation_prompt or messages[-1]["role"] != "assistant":
                rest = render(messages, generation_prompt)
                extends(rest, ids)
                labels, ids = labels + [-100] * (len(rest) - len(ids)), rest
        except ConfigError:
            raise
        except Exception as err:  # the template's own checks (jinja2's TemplateError: roles, their order)
            raise ConfigError(f"{where}: the chat template refused this conversation ({one_line(err)})") from None
        return ids, labels
    encode = (lambda text: list(text.encode("utf-8"))) if tokenizer is None else (
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    end = 0 if tokenizer is None else (tokenizer.eos_token_id or 0)
    ids = [] if tokenizer is None or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    labels = [-100] * len(ids)
    for message in messages:
        head = encode(f"<|{message['role']}|>\n")
        answer = message["role"] == "assistant"
        body = encode(message["content"]) + [end] if answer else encode(message["content"] + "\n")
        ids += head + body
        labels += [-100] * len(head) + (body if answer else [-100] * len(body))
    if generation_prompt:
        head = encode("<|assistant|>\n")
        ids, labels = ids + head, labels + [-100] * len(head)
    return ids, labels


def stop_tokens(tokenizer, model, chat: bool) -> list:
    """Where generation stops: the end-of-text tokens of the tokenizer and the model, and after an instruction fit
    the special token that ends an assistant turn in the chat template (<|im_end|>, <|eot_id|>, <end_of_turn>, ...,
    which training taught the model to emit: it may differ from the tokenizer's end of text)."""
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    found = getattr(config, "eos_token_id", None)
    ends = list(found) if isinstance(found, (list, tuple)) else [] if found is None else [found]
    if not chat:
        return ends
    if tokenizer is None:
        return [0]  # chat_tokens ends an answer with byte 0
    ends.append(tokenizer.eos_token_id)
    ids, labels = chat_tokens(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    specials = set(tokenizer.all_special_ids)
    ends += [t for t in labels if t in specials]
    return list(dict.fromkeys(t for t in ends if t is not None))


class Conversations(Dataset):
    """Rows of (input, target[, positions]) of at most block_size tokens: one conversation each, or with packing as
    many whole conversations as fit, in order, with positions restarting at each (transformers then keeps each
    conversation's attention to itself)."""

    def __init__(self, examples: list, block_size: int, packing: bool):
        self.packing = packing
        self.rows = []
        for example in examples:
            if packing and self.rows and sum(len(x) for x, _ in self.rows[-1]) + len(example[0]) <= block_size:
                self.rows[-1].append(example)
            else:
                self.rows.append([example])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        inputs, targets = torch.cat([x for x, _ in row]), torch.cat([y for _, y in row])
        if not self.packing:
            return inputs, targets
        return inputs, targets, torch.cat([torch.arange(len(x)) for x, _ in row])


def pad_rows(rows: list) -> tuple:
    """A batch of rows padded at the end to the longest: padding comes after every real token, so causal attention
    never reaches it, and its targets are -100. Positions continue through the padding."""
    longest = max(len(row[0]) for row in rows)
    inputs = torch.zeros(len(rows), longest, dtype=torch.long)
    targets = torch.full((len(rows), longest), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, :len(row[0])], targets[i, :len(row[1])] = row[0], row[1]
    if len(rows[0]) == 2:
        return inputs, targets
    positions = torch.arange(longest).repeat(len(rows), 1)
    for i, row in enumerate(rows):
        n = len(row[2])
        positions[i, :n] = row[2]
        positions[i, n:] += row[2][-1] + 1 - n
    return inputs, targets, positions


class ResumableSampler(DistributedSampler):
    """Shuffles every epoch with seed + epoch, as Lightning's DDP sampler does, on one process too; the first epoch
    after a resume starts at the checkpoint's epoch and skips the samples it had trained on. A resumed run then sees
    the data an uninterrupted one would; Lightning alone starts the epoch over, in a new order."""

    def __init__(self, dataset: Dataset, resume: dict, **kwargs):
        super().__init__(dataset, shuffle=True, seed=int(os.getenv("PL_GLOBAL_SEED", 0)), **kwargs)  # Lightning's
        self.resume = resume  # the DataModule's: its load_state_dict may fill it after this is built
        self.started = False

    def order(self) -> list:
        return [len(self.dataset), self.num_replicas, self.seed]  # what decides each process's samples

    def __iter__(self):
        skip = 0
        resume = dict(self.resume)
        self.started = True
        self.resume.clear()
        if resume and resume["order"] != self.order():
            rank_zero_warn("the training data, seed or number of processes differ from the checkpoint's: the resumed"
                           " epoch starts over in a new order")
        elif resume and self.epoch <= resume["epoch"]:  # lower: workers began before Lightning's set_epoch
            self.epoch, skip = resume["epoch"], resume["samples"]
        return itertools.islice(super().__iter__(), skip, None)


def transformers_config(model_type: str, defaults: dict, model_config: Optional[dict], **fixed):
    """A Hugging Face config of model_type for training from scratch: the template's small defaults, overridden by
    model_config under either name of a key (GPT-2's n_embd is hidden_size), then `fixed` (vocab_size, labels). A key
    that is not the config's own but a letter or two from one is refused: a config keeps any keyword, so the typo
    would change nothing, silently."""
    from transformers import AutoConfig

    try:
        empty = AutoConfig.for_model(model_type)
    except ValueError as err:
        raise ConfigError(f"cannot build a {model_type!r} config: {err}") from None
    known = set(empty.to_dict()) | set(empty.attribute_map)
    for cls in type(empty).__mro__:
        if "__init__" in vars(cls):
            known |= set(inspect.signature(cls.__init__).parameters)
    user = dict(model_config or {})
    near = {key: difflib.get_close_matches(key, known, n=1, cutoff=0.85) for key in user}
    typos = {key: match[0] for key, match in near.items() if key not in known and match}
    if typos:
        raise ConfigError(f"model_config key(s) {sorted(typos)} are not {type(empty).__name__} settings; did you"
                          f" mean: {', '.join(typos[key] for key in sorted(typos))}")
    given = {empty.attribute_map.get(key, key) for key in {**user, **fixed}}
    kept = {key: value for key, value in defaults.items() if empty.attribute_map.get(key, key) not in given}
    try:
        return AutoConfig.for_model(model_type, **kept, **user, **fixed)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"cannot build a {model_type!r} config: {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# Checks of --ckpt_path, before anything is built or written
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_folder(config) -> Path:
    return Path(config.last_checkpoint.dirpath or Path(config.trainer.default_root_dir or ".") / "checkpoints")


def best_checkpoint_file(config) -> str:
    """The newest file fit's best_checkpoint callback wrote in its folder."""
    folder = Path(config.best_checkpoint.dirpath or checkpoint_folder(config))
    return str(newest_checkpoint(folder, config.best_checkpoint.filename or "best"))


def newest_checkpoint(folder: Path, name: str) -> Path:
    """<name>.ckpt, or the newest <name>-v1.ckpt, -v2, ... that a later fit wrote where it found the name taken."""
    found = [f for f in folder.glob("*.ckpt") if re.fullmatch(re.escape(name) + r"(-v\d+)?\.ckpt", f.name)]
    return max(found, key=lambda f: f.stat().st_mtime) if found else folder / f"{name}.ckpt"


def check_checkpoint_file(ckpt) -> None:
    """Refuses a checkpoint that is missing, truncated or holds code (URLs and last/best/hpc are left to Lightning)."""
    if not ckpt or ckpt in ("last", "best", "hpc") or re.match(r"\w+:", str(ckpt)):
        return
    path = Path(ckpt).expanduser()
    if path.is_dir():  # sharded: torch distributed checkpoint (.metadata + Lightning's meta.pt) or DeepSpeed
        distcp = (path / "meta.pt").is_file() and (path / ".metadata").is_file()
        if not distcp and not (path / "latest").is_file():
            raise ConfigError(f"{path} is not a complete sharded checkpoint (no .metadata and meta.pt, no"
                              " DeepSpeed 'latest'): pass an intact one, e.g. an epoch=*-step=*.ckpt folder")
    elif not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}: pass an existing .ckpt file, or --ckpt_path last")
    elif not zipfile.is_zipfile(path):  # torch.save writes a zip archive whose index is at the end
        raise ConfigError(f"cannot load checkpoint {path}: it is truncated or not a PyTorch checkpoint: pass an"
                          " intact one, for example last.ckpt or best.ckpt in the run's checkpoints folder")
    else:
        try:  # as LightningCLI will: weights_only runs no code from the file; mmap leaves the tensors on disk
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            # torch names the object "Unsupported global: GLOBAL x.y" (2.4-2.13); any weights-only refusal holds code
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            reason = (f"it holds a Python object ({found.group(1) if found else 'not a tensor or plain value'}) that"
                      " could run code when loaded, so it is refused; save plain tensors and values instead"
                      ) if found or "Weights only load failed" in str(err) else (
                f"it is damaged ({str(err).splitlines()[0][:120]})")
            raise ConfigError(f"cannot load checkpoint {path}: {reason}") from None
        if not isinstance(loaded, dict) or not {"state_dict", "pytorch-lightning_version"} <= set(loaded):
            raise ConfigError(f"cannot load checkpoint {path}: it is not a Lightning checkpoint (torch.save of a"
                              " state_dict or tensors?): load such weights in the model's __init__, or pass a .ckpt"
                              " a Lightning run wrote")


def cpu_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_cpu_processes(trainer) -> None:
    """More CPU processes than cores: Lightning would start them all and stall."""
    accelerator = trainer.accelerator if isinstance(trainer.accelerator, str) else None
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    cores = cpu_cores()
    if on_cpu and str(trainer.devices).isdigit() and int(trainer.devices) > cores:
        raise ConfigError(f"devices={trainer.devices} asks for {trainer.devices} CPU processes but this machine has"
                          f" {cores} cores: set --trainer.devices to at most {cores} (1 is fastest for small models)")


def newest_intact_checkpoint(config) -> None:
    """--ckpt_path last: the newest checkpoint of the run's folder that loads (last*.ckpt first at equal times), as a
    path. Broken ones (cut short by a kill or a full disk) are skipped, and one line names them; none at all leaves
    `last` to Lightning, which starts afresh."""
    folder = checkpoint_folder(config)
    found = sorted([f for f in folder.glob("*.ckpt") if f.exists()] if folder.is_dir() else [],  # not a dead link
                   key=lambda f: (f.stat().st_mtime, f.name.startswith("last")), reverse=True)
    skipped = []
    for path in found:
        try:
            check_checkpoint_file(str(path))
        except ConfigError as err:
            reason = re.sub(r"^cannot load checkpoint \S+: ", "", str(err).replace(str(path), "it"))
            skipped.append(f"{path.name} ({reason.split(': pass')[0]})")
            continue
        config.ckpt_path = os.path.abspath(path)  # as Lightning names `last` in its log lines
        if skipped and rank_zero_only.rank == 0:
            sys.stderr.write(f"--ckpt_path last: skipped {'; '.join(skipped)}; resuming from {config.ckpt_path}\n")
        return
    if skipped:
        raise ConfigError(f"no checkpoint in {folder} loads: {'; '.join(skipped)}: start afresh without --ckpt_path")


def checkpoint_to_read(config) -> Optional[Path]:
    """The single file --ckpt_path names; None when there is none (yet), or for a sharded folder, a URL or `hpc`."""
    ckpt = config.get("ckpt_path")
    if not ckpt or ckpt in ("hpc", "last") or re.match(r"\w+:", str(ckpt)):
        return None
    path = Path(ckpt).expanduser()
    return path if path.is_file() else None


# Numeric options checked by name before anything is built, in the model and data (a template's or your own) and
# the Trainer: group -> [(name pattern, lowest, highest)]; lowest 0.0 (a float) means above 0. Above the int32
# range no count or size makes sense (a tensor dimension fails there).
NUMBER_RULES = {
    "model data": [
        (r"num_workers|\w*seed|fold|onehot_max|fake_size|\w*(warmup|freeze)\w*|\w+_epochs|\w+_steps", 0, 2**31 - 1),
        (r"\w*(size|dims?|length|folds|layers|heads|labels|classes|_r|lora_alpha)", 1, 2**31 - 1),
        (r"\w*(dropout|fraction|smoothing)", 0, 1),
        (r"\w*(lr|learning_rate|weight_decay|_ratio|_scale)", 0, math.inf)],
    "trainer": [
        (r"accumulate_grad_batches|check_val_every_n_epoch|log_every_n_steps", 1, 2**31 - 1),
        (r"val_check_interval", 0.0, math.inf),
        (r"gradient_clip_val", 0, math.inf)],
}


def check_numbers(config) -> None:
    """Refuses a negative, zero or oversized count (batch_size 0, hidden_dims [0], block_size -1, warmup_steps -5,
    batch_size 1e20, accumulate_grad_batches 0) in one line naming the option, before it becomes a traceback, a
    network of zero width or a silently different run."""
    for groups, rules in NUMBER_RULES.items():
        for group in groups.split():
            for key, value in vars(config.get(group) or argparse.Namespace()).items():
                rule = next((r for r in rules if re.fullmatch(r[0], key)), None)
                values = value if isinstance(value, (list, tuple)) else [value]
                numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
                _, low, high = rule or (None, None, None)
                above = isinstance(low, float)  # 0.0: above 0
                bad = next((v for v in numbers if not low <= v <= high or above and v == low), None) if rule else None
                if bad is not None:
                    allowed = f"at most {high}" if bad > high else f"above {low:g}" if above else f"at least {low}"
                    raise ConfigError(f"{group}.{key} is {value}: it must be {allowed}; set --{group}.{key}")


def cap_workers(data) -> None:
    """DataLoader workers beyond the CPU cores only compete for them (and thousands exhaust memory): use the cores."""
    cores = cpu_cores()
    if data is not None and isinstance(data.get("num_workers"), int) and data.num_workers > cores:
        rank_zero_warn(f"data.num_workers {data.num_workers} is more than this machine's {cores} CPU cores: using"
                       f" {cores}")
        data.num_workers = cores


def plain(value):
    """A config value as JSON data, so that (256, 128) from the command line equals [256, 128] from a checkpoint."""
    return json.loads(json.dumps(value, default=str))


def follow_checkpoint(config, defaults, path: Path, resuming: bool, model_class) -> None:
    """Makes the model and the checkpoint rules of this run those of the checkpoint it loads. A model option this
    command sets (other than its default) to another value than the checkpoint's is refused in one line: an explicit
    path would otherwise train the checkpoint's model, silently (LightningCLI rebuilds it from the file), and `last`
    would load it into another one. A resumed fit keeps the monitor and mode its best checkpoint and early stopping
    started with: Lightning files their state (best score, patience) under a key made of both and would resume
    without it, silently, under another rule."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hparams = ckpt.get("hyper_parameters") or {}
    accepted = inspect.signature(model_class.__init__).parameters
    foreign = sorted(set(hparams) - set(accepted) - {"_instantiator", "_class_path"})
    if foreign and not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        raise ConfigError(f"{path} was written by another model (its options {', '.join(foreign[:4])} are not"
                          f" {model_class.__name__}'s): pass a checkpoint of this template's runs")
    for key, value in hparams.items():
        if key not in config.model or plain(config.model[key]) == plain(value):
            continue
        if plain(config.model[key]) != plain(defaults.model.get(key)):
            raise ConfigError(f"{path} was trained with model.{key}={plain(value)}; this command sets"
                              f" {plain(config.model[key])}: drop --model.{key} to use the checkpoint's value, or"
                              " start a new run without --ckpt_path")
        config.model[key] = value  # left at its default: the checkpoint's model, as LightningCLI does for a path
    if not resuming or "callbacks" not in ckpt:
        return
    for name, kind in (("best_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping")):
        if name not in config:
            continue
        saved = [rule for key in ckpt["callbacks"] if key.startswith(kind + "{")
                 for rule in [literal_rule(key[len(kind):])] if rule.get("monitor")]
        wanted = config[name]
        if not saved or any((r["monitor"], r["mode"]) == (wanted.monitor, wanted.mode) for r in saved):
            continue
        if (wanted.monitor, wanted.mode) != (defaults[name].monitor, defaults[name].mode):
            raise ConfigError(f"{path} ranked {name} by {saved[0]['monitor']} ({saved[0]['mode']}); this command asks"
                              f" for {wanted.monitor} ({wanted.mode}): resume with --{name}.monitor"
                              f" {saved[0]['monitor']} --{name}.mode {saved[0]['mode']}, or start a new run")
        wanted.monitor = saved[0]["monitor"]
        wanted.mode = saved[0]["mode"]
        rank_zero_info(f"{name} keeps ranking by {wanted.monitor} ({wanted.mode}), as the run in {path.name} did")


def literal_rule(text: str) -> dict:
    try:
        rule = ast.literal_eval(text)
    except (ValueError, SyntaxError):  # e.g. a train_time_interval, which is no literal
        return {}
    return rule if isinstance(rule, dict) else {}


# ----------------------------------------------------------------------------------------------------------------
# The command line every template shares
# ----------------------------------------------------------------------------------------------------------------
class TemplateCLI(LightningCLI):
    """LightningCLI with the callbacks and checks every template's runs get. A template's subclass sets:
    monitor, mode: the validation metric best.ckpt (and early stopping) rank by;
    patience: early stopping's patience in validations, None for no early stopping;
    evaluate: the subcommand of fit's first `next:` line, run on the kept checkpoint with the fit's options;
    then: fit's other `next:` commands on the kept checkpoint (predict with the fit's options; a tool: export, ...);
    absolute_paths: (group, key) options stored in checkpoints, made absolute so a later run finds them;
    and adds its own options and links in add_template_arguments (links from data to model are also checked against
    a checkpoint's values in validate/test/predict)."""

    monitor = "val_loss"
    mode = "min"
    patience: Optional[int] = None
    evaluate = "validate"
    then: tuple = ("predict",)
    absolute_paths: tuple = ()

    def add_template_arguments(self, parser) -> None:
        """The template's links and extra callbacks."""

    def link(self, parser, source: str, target: str) -> None:
        """A value the data computes, passed to the model when both are built (e.g. the number of classes)."""
        parser.link_arguments(source, target, apply_on="instantiate")
        key = target.split(".", 1)[1]  # once, though every subcommand's parser links it
        self.linked = [*[k for k in getattr(self, "linked", []) if k != key], key]

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--matmul_precision", choices=["highest", "high", "medium"], default="high",
                            help="torch.set_float32_matmul_precision: high uses TF32 tensor cores for float32"
                            " matmuls on Ampere and newer GPUs; scaffold.py sets what detect_hardware.py recommends")
        parser.add_argument("--record_steps", type=Optional[str], default=None,
                            help="write each training batch's step,loss,lr to this CSV, to compare with a plain loop"
                            " (scripts/compare_runs.py; references/migration.md)")
        # The best model by the template's validation metric, and an unmonitored checkpoint whose last.ckpt is
        # rewritten at every save: a monitored one only rewrites last.ckpt when the metric improves, so resuming from
        # it could redo epochs. dirpath None: <trainer.default_root_dir>/checkpoints, a fixed folder `last` finds.
        parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
        parser.set_defaults({"best_checkpoint.monitor": self.monitor, "best_checkpoint.mode": self.mode,
                             "best_checkpoint.filename": "best", "best_checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({"last_checkpoint.save_last": True, "last_checkpoint.save_top_k": 1})
        if self.patience is not None:
            # Checked after validation only: a run that ends before its first validation (a small max_steps) then
            # stops normally instead of failing at the epoch's end on a metric it has not logged yet.
            parser.add_lightning_class_args(EarlyStopping, "early_stopping")
            parser.set_defaults({"early_stopping.monitor": self.monitor, "early_stopping.mode": self.mode,
                                 "early_stopping.patience": self.patience,
                                 "early_stopping.check_on_train_epoch_end": False})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(CheckpointOnException, "exception_checkpoint")
        self.add_template_arguments(parser)

    def parse_arguments(self, parser, args) -> None:
        self.argv = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, type(None))) else None
        words = [w for a in self.argv or [] for w in (a.split("=", 1) if a.startswith("--config=") else [a])]
        for word, value in zip(words, words[1:]):  # jsonargparse reads config files as UTF-8
            if word == "--config" and Path(value).is_file():
                try:
                    Path(value).read_text(encoding="utf-8")
                except UnicodeDecodeError as err:
                    raise ConfigError(f"{value} is not UTF-8 text (byte {err.start}): save the config as UTF-8"
                                      ) from None
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(f"{with_nearest_keys(parser, err)} (see --help)") from None
        # Before LightningCLI reads hyperparameters from --ckpt_path and before anything is built or written.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        self.prepare_config(subcommand, config)
        if subcommand in ("validate", "test", "predict") and config.get("ckpt_path") == "best":
            config.ckpt_path = best_checkpoint_file(config)  # a new process has no fit's best_model_path
        if config.get("ckpt_path") == "last":
            newest_intact_checkpoint(config)
        check_checkpoint_file(config.get("ckpt_path"))
        check_cpu_processes(config.trainer)
        # A relative path is read from the current folder, else from the folder of a --config file that may name
        # it (the last first), else from the template's: scaffold writes paths inside the project relative to it.
        bases = [Path(os.fspath(f)).parent for f in reversed(config.get("config") or [])]
        bases.append(Path(sys.argv[0]).resolve().parent)
        data = config.get("data")
        paths = {*self.absolute_paths, *(("data", k) for k in (data.keys() if hasattr(data, "keys") else ())
                                         if k.endswith("_path") and "." not in k)}
        for group, key in sorted(paths):
            value = config[group][key]
            found = [b / value for b in bases if isinstance(value, str) and (b / value).exists()]
            if found and not Path(value).expanduser().exists():
                config[group][key] = str(found[0])
            elif value and (group, key) in self.absolute_paths and Path(value).expanduser().exists():
                config[group][key] = str(Path(value).expanduser().resolve())  # stored in checkpoints
        check_numbers(config)
        self.check_config(subcommand, config)
        path = checkpoint_to_read(config)
        if path is not None:
            defaults = (parser._subcommands_action._name_parser_map[subcommand] if subcommand else parser
                        ).get_defaults()
            follow_checkpoint(config, defaults, path, subcommand == "fit", self.model_class)
        cap_workers(config.get("data"))

    def prepare_config(self, subcommand: Optional[str], config) -> None:
        """The template's changes to the parsed options, before --ckpt_path is looked up."""

    def check_config(self, subcommand: Optional[str], config) -> None:
        """The template's own checks of the parsed options (raise ConfigError)."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        torch.set_float32_matmul_precision(config.matmul_precision)
        for key in ("best_checkpoint", "last_checkpoint", "exception_checkpoint"):
            if config[key].dirpath is None:
                config[key].dirpath = str(Path(config.trainer.default_root_dir or ".") / "checkpoints")
        if config.get("weights_only", False) is None:
            config.weights_only = True  # resume/evaluate load tensors and plain values only: no code runs
        if config.trainer.fast_dev_run:  # Lightning 2.6 still writes last.ckpt at train end under fast_dev_run: a
            config.last_checkpoint.save_last = False  # smoke test must not become the newest "last" to resume from
        model, data = config.get("model"), config.get("data")
        if model and data and "name_or_path" in model and "tokenizer" in data:  # a Hugging Face model's template
            if model.name_or_path and not data.tokenizer:
                data.tokenizer = model.name_or_path  # the model's own tokenizer
            if "trust_remote_code" in model and "trust_remote_code" in data:
                data.trust_remote_code = model.trust_remote_code  # one switch for the model's and tokenizer's code

    def instantiate_trainer(self, **kwargs):
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as err:  # no GPU
            raise ConfigError(f"cannot build the Trainer: {err}") from None
        if any(isinstance(c, LearningRateFinder) for c in trainer.callbacks):  # it sets the optimizer's lr only
            raise ConfigError("the LearningRateFinder callback would not reach this template's learning-rate schedule"
                              " (the schedule restores the configured lr at its first step): run hpo_optuna.py"
                              " --lr-find, or Tuner.lr_find, and pass the lr it suggests as a model option")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # single files, one device or DDP
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(trainer.strategy, (DeepSpeedStrategy, ModelParallelStrategy)) or getattr(
                trainer.strategy, "_state_dict_type", None) == "sharded":  # checkpoints are folders, written in place
            for callback in trainer.checkpoint_callbacks:  # so last.ckpt links to the newest whole epoch=* folder
                callback.save_last = "link" if callback.save_last is True else callback.save_last
        if not trainer.loggers:  # --trainer.logger false: the LR monitor has nothing to log to and would stop the run
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        return trainer

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path"):
            self.refuse_other_data(config.ckpt_path)
        if self.subcommand == "predict":
            self.trainer.callbacks.append(PredictionWriter(config.get("ckpt_path")))
        if self.subcommand == "fit" and config.get("record_steps"):
            self.trainer.callbacks.append(RecordSteps(config.record_steps, append=bool(config.get("ckpt_path"))))

    def refuse_other_data(self, ckpt_path: str) -> None:
        """What the data gives the model (classes, input shape, vocabulary: the links) must be what the checkpoint
        was trained on: another class list would label predictions wrongly without any error."""
        if not Path(ckpt_path).is_file():
            return  # Lightning names a missing file itself
        trained = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        for key in getattr(self, "linked", []):
            if key in trained and plain(trained[key]) != plain(self.model.hparams.get(key)):
                def show(value):
                    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
                    return text if len(text) < 80 else text[:77] + "..."

                raise ConfigError(f"the checkpoint was trained with {key} {show(plain(trained[key]))}; this data"
                                  f" gives {show(plain(self.model.hparams.get(key)))}: pass the fit's data options"
                                  " (e.g. --config config.yaml) and the other data as --data.test_path or"
                                  " --data.predict_path")

    def after_fit(self) -> None:
        trainer = self.trainer
        best = trainer.checkpoint_callback
        if not trainer.is_global_zero:
            return
        stopper = trainer.early_stopping_callback
        reason = getattr(stopper, "stopping_reason_message", None) if trainer.should_stop else None
        if reason:  # patience, a threshold or a non-finite metric: Lightning's own words
            print(f"stopped early in epoch {stopper.stopped_epoch}: {reason}")
        if best is not None and best.best_model_score is not None:
            print(kept_checkpoint(trainer))
            if self.argv is not None:
                print("\n".join(next_lines(self.argv, self.evaluate, self.then, best.best_model_path)))


def run_tool(argv: list, tools: dict, default_root: str) -> None:
    """`SCRIPT NAME [options]` for a command on a trained checkpoint (export, generate), with --ckpt_path best/last
    found where fit put them and one-line errors. tools: {NAME: (description, [(flags, kwargs), ...], function)};
    function(checkpoint_file, options) does the work."""
    script, name = Path(sys.argv[0]).name, argv[0]
    description, arguments, function = tools[name]
    parser = argparse.ArgumentParser(prog=f"{script} {name}", description=description)
    parser.add_argument("--ckpt_path", default="best", help="best (default) or last of the fit's checkpoints"
                        " folder, or a checkpoint file")
    parser.add_argument("--root", default=default_root, help="the fit's trainer.default_root_dir, where best and"
                        f" last are (default: {default_root})")
    for flags, kwargs in arguments:
        parser.add_argument(*flags, **kwargs)
    options = parser.parse_args(argv[1:])  # a usage error: argparse's line and exit code 2
    try:
        checkpoint = options.ckpt_path
        if checkpoint in ("best", "last"):
            checkpoint = str(newest_checkpoint(Path(options.root).expanduser() / "checkpoints", checkpoint))
        check_checkpoint_file(checkpoint)
        if (Path(checkpoint) / "latest").is_file():
            raise ConfigError(f"{checkpoint} is a DeepSpeed checkpoint folder: make one file of it first, python -c"
                              " \"from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_"
                              f"state_dict as c; c('{checkpoint}', 'model.ckpt')\"")
        if Path(checkpoint).is_dir():
            raise ConfigError(f"{checkpoint} is a sharded checkpoint folder: make one file of it first, python -m"
                              " lightning.fabric.utilities.consolidate_checkpoint FOLDER --output_file model.ckpt"
                              " (FSDP2; FSDP: lightning.pytorch.utilities.consolidate_checkpoint FOLDER)")
        function(checkpoint, options)
    except (ConfigError, OSError) as err:  # a file that cannot be read or written
        sys.stderr.write(f"{script} {name}: error: {one_line(err)}\n")
        sys.exit(2)


def write_folder(folder: str, write) -> Path:
    """write(staging_folder), then the finished folder moved to `folder` in one rename: a failure leaves nothing
    half-written, and an existing non-empty folder is never overwritten."""
    out = Path(folder).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty: pass a new folder")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


EXPORT_OPTIONS = [  # of every template's export command
    (["--out"], {"required": True, "help": "a new folder to write"}),
    (["--adapter"], {"action": "store_true", "help": "LoRA: save the adapters as a peft folder, not merged"}),
    (["--dtype"], {"choices": ["float32", "bfloat16", "float16"], "help": "the saved weights' (default float32)"})]


class Method(torch.nn.Module):
    """module.<name> as a module's forward: what save_program traces."""

    def __init__(self, module: torch.nn.Module, name: str):
        super().__init__()
        self.module, self.name = module, name

    def forward(self, *inputs):
        return getattr(self.module, self.name)(*inputs)


def save_program(module: torch.nn.Module, method: str, inputs: tuple, folder: str, about: dict) -> Path:
    """A standalone model: module.<method> (its preprocessing inside) traced by torch.export, every input's first
    dimension the batch, saved as FOLDER/model.pt2, with FOLDER/about.json describing inputs and outputs. It runs with
    torch alone, no Lightning nor this code: torch.export.load(FOLDER/model.pt2).module()(*inputs). torch.export, not
    ONNX: it needs no other package, keeps every operator, and AOTInductor compiles the same program for C++ serving."""
    model = Method(module, method).eval()
    batch = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        program = torch.export.export(model, inputs, dynamic_shapes={"inputs": tuple({0: batch} for _ in inputs)})
        expected = model(*inputs)

    def write(staging: Path) -> None:
        with warnings.catch_warnings():  # buffers that share storage: the weights are on the CPU, as it assumes
            warnings.filterwarnings("ignore", "No complete tensor found")
            torch.export.save(program, staging / "model.pt2")
        (staging / "about.json").write_text(json.dumps(about, indent=2))
        loaded = torch.export.load(staging / "model.pt2").module()(*inputs)  # the saved file gives the same numbers
        if not torch.allclose(loaded, expected, rtol=1e-4, atol=1e-5):
            raise ConfigError("the exported program's outputs differ from the checkpoint's: not saved")

    return write_folder(folder, write)


def save_hf_folder(model: torch.nn.Module, tokenizer, folder: str, adapter: bool = False,
                   dtype: Optional[str] = None) -> Path:
    """A Hugging Face folder that from_pretrained loads: config, weights and tokenizer. LoRA adapters are merged into
    the weights, or, with adapter=True, kept as a peft adapter folder (adapter_config.json names the base model)."""
    lora = hasattr(model, "peft_config")
    if adapter and not lora:
        raise ConfigError("--adapter keeps LoRA adapters apart, but this checkpoint has none: drop --adapter")
    if lora and not adapter:
        model = model.merge_and_unload()  # W + B @ A * alpha / r, as one plain model
    if dtype:
        model = model.to(getattr(torch, dtype))

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write_folder(folder, write)


def kept_checkpoint(trainer) -> str:
    """`best <monitor>=<score> (epoch E, step S; other validation metrics) checkpoint=<path>` for the file the
    best_checkpoint callback kept."""
    callback = trainer.checkpoint_callback
    path = callback.best_model_path
    where = ""
    saved_file = Path(path) / "meta.pt" if Path(path).is_dir() else Path(path)  # a sharded folder: its metadata
    if saved_file.is_file() and not zipfile.is_zipfile(saved_file):  # cut short or emptied since it was saved
        where = " (the file is damaged: evaluate another checkpoint of the folder)"
    elif saved_file.is_file():
        saved = torch.load(saved_file, map_location="cpu", weights_only=True, mmap=True)
        history = next((c.by_step for c in trainer.callbacks if isinstance(c, ValidationHistory)), {})
        others = [f"{k}={v:.4f}" for k, v in history.get(saved["global_step"], {}).items() if k != callback.monitor]
        where = f" (epoch {saved['epoch']}, step {saved['global_step']}{'; ' if others else ''}{', '.join(others)})"
    return f"best {callback.monitor}={callback.best_model_score.item():.4f}{where} checkpoint={path}"


def without_ckpt_path(argv: list, options: tuple = ("--ckpt_path",)) -> list:
    """The arguments without --ckpt_path (or the other options named) and its value."""
    args, skip = [], False
    for arg in argv:
        if skip or arg.startswith(tuple(f"{option}=" for option in options)):
            skip = False
        elif arg in options:
            skip = True  # and its value
        else:
            args.append(arg)
    return args


def next_command(argv: list, subcommand: str, checkpoint: str) -> str:
    """`python SCRIPT` + the fit arguments with the first `fit` made `subcommand` and --ckpt_path the checkpoint."""
    args = without_ckpt_path(argv, ("--ckpt_path", "--record_steps"))  # recording is for fit
    if "fit" in args:
        args[args.index("fit")] = subcommand
    return shlex.join([python_name(), sys.argv[0], *args, "--ckpt_path", checkpoint])


def python_name() -> str:
    """`python`, or this interpreter's path when a bare python is another one (which may lack torch)."""
    same = os.path.abspath(shutil.which("python") or "") == os.path.abspath(sys.executable)
    return "python" if same else sys.executable


def next_lines(argv: list, evaluate: str, then: tuple, checkpoint: str) -> list:
    """What fit prints last, the same in every template: evaluate and predict the kept checkpoint with the fit's
    data and settings, run the template's tools on it (export, generate), train on from the last checkpoint."""
    lines = [f"next: {next_command(argv, evaluate, checkpoint)}  # evaluate the kept checkpoint"]
    for command in then:
        if command.startswith("predict"):  # with the options predict needs beyond the fit's, if any
            lines.append(f"next: {next_command(argv, 'predict', checkpoint)}{command[7:]}  # -> predictions/")
        else:  # a tool: its own options, not the fit's
            words = [python_name(), sys.argv[0], *command.split(), "--ckpt_path", checkpoint]
            lines.append(f"next: {shlex.join(words)}")
    lines.append(f"next: {next_command(argv, 'fit', 'last')}  # resume (with a larger max_epochs/max_steps: train"
                 " on)")
    return lines


def with_nearest_keys(parser, err: Exception) -> str:
    """The parser's error, plus the nearest valid keys for a mistyped one."""
    subcommands = parser._subcommands_action._name_parser_map.values() if parser._subcommands_action else []
    keys = {k for sub in [*subcommands, parser] for k in sub.get_defaults().keys()}
    typed = [t for t in re.findall(r"[\w.]+\.[\w.]+|(?<=--)\w+", str(err)) if t not in keys]
    near = sorted({k for t in typed for k in difflib.get_close_matches(t, keys, n=3, cutoff=0.6)})
    return f"{err}" + (f"; did you mean: {', '.join(near)}" if near else "")


def release_process_group() -> None:
    """Ends the process group while Python is still whole. Lightning 2.6 does this at exit for NCCL only; a gloo
    (CPU) group left to interpreter shutdown can abort a finished run ("terminate called without an active
    exception", exit code -6)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def one_line(err: BaseException) -> str:
    """An error's message on one line; for one raised in a DataLoader worker, the worker's own message."""
    text = str(err)
    if "Original Traceback" in text:  # "Caught ConfigError in DataLoader worker process 0. Original Traceback..."
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def run_cli(cli_class, model_class, data_class, args=None, run: bool = True, callbacks: tuple = (),
            trainer_defaults: Optional[dict] = None):
    """A template's main(): the command line, with every error a user can fix as one line on stderr and an exit
    code (2 bad input, 1 NaN loss, 143 SIGTERM). run=False builds model, data and trainer without running a
    subcommand and returns the CLI (hpo_optuna.py and bench.py); `callbacks` are added to every run."""
    name = Path(sys.argv[0]).name
    defaults = dict(trainer_defaults or {})
    defaults["callbacks"] = [ResumableRandomState(), ResumeAtUnfinishedBatch(), ScheduleAtResume(),
                             StopOnNonFiniteLoss(), ValidationHistory(), *callbacks]
    # clip_gradients leaves clipping to DeepSpeed, which clips by trainer.gradient_clip_val itself
    warnings.filterwarnings("ignore", "Since DeepSpeed handles gradient clipping internally")
    try:
        return cli_class(
            model_class,
            data_class,
            seed_everything_default=42,
            auto_configure_optimizers=False,  # the model's configure_optimizers decides; --optimizer would be ignored
            trainer_defaults=defaults,
            save_config_callback=AtomicSaveConfig,
            save_config_kwargs={"overwrite": True},  # the saved config.yaml is rewritten when a run is resumed
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},  # errors end in one line, below
            args=args,
            run=run,
        )
    except SIGTERMException:  # Lightning raises it as a SystemExit without a code, which would exit 0 (success)
        sys.stderr.write(f"{name}: stopped by SIGTERM; --ckpt_path last continues from the newest checkpoint\n")
        sys.exit(128 + signal.SIGTERM)
    except (ConfigError, NonFiniteLossError) as err:
        sys.stderr.write(f"{name}: error: {one_line(err)}\n")  # one write: ranks' lines stay whole
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)
    except ValueError as err:
        if not schedule_exhausted(err):
            raise
        sys.stderr.write(f"{name}: error: the learning-rate schedule has ended ({one_line(err)}): it was built for the"
                         " first run's length, so train longer as a new run (without --ckpt_path), or use a schedule"
                         " that reads trainer.max_epochs at each step (lightning_support.cosine_by_epoch)\n")
        sys.exit(2)
    except torch.OutOfMemoryError as err:  # a GPU: what to change is in references/performance.md
        sys.stderr.write(f"{name}: error: out of GPU memory ({one_line(err)[:160]}): lower --data.batch_size (and"
                         " raise --trainer.accumulate_grad_batches), or see detect_hardware.py --model\n")
        sys.exit(2)
    except (PermissionError, NotADirectoryError, IsADirectoryError) as err:  # read-only output, a file as folder
        sys.stderr.write(f"{name}: error: {err.strerror or one_line(err)}: {err.filename}: fix that path or its"
                         " permissions (a data option, or --trainer.default_root_dir for the outputs)\n")
        sys.exit(2)
    except FileNotFoundError as err:  # a data file a template's (or your) reader opens
        sys.stderr.write(f"{name}: error: file not found: {err.filename or one_line(err)}: check the path (relative"
                         f" paths are read from {os.getcwd()})\n")
        sys.exit(2)
    except (MisconfigurationException, RuntimeError, OSError) as err:
        if getattr(err, "errno", None) in DISK_FULL or "can't allocate memory" in str(err):
            what = ("the disk is full or read-only: free space or set --trainer.default_root_dir elsewhere (a"
                    " checkpoint being written then was not kept; --ckpt_path last resumes from the newest whole"
                    " one)") if isinstance(err, OSError) else "lower the model's sizes or --data.batch_size"
            sys.stderr.write(f"{name}: error: {one_line(err)[:200]}: {what}\n")
            sys.exit(2)
        if "Error(s) in loading state_dict" in str(err):  # a checkpoint of another model shape (vocabulary, classes)
            detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
            sys.stderr.write(f"{name}: error: the checkpoint does not fit this model ({detail[:200]}): pass the"
                             " options it was trained with (its run's config.yaml)\n")
            sys.exit(2)
        if not monitor_missing(err):
            raise
        sys.stderr.write(f"{name}: error: {one_line(err)} (set that callback's monitor, e.g."
                         " --best_checkpoint.monitor, to a logged metric)\n")
        sys.exit(2)
    finally:  # after errors too, while the interpreter is still whole; run=False callers own their group
        if run:
            release_process_group()
