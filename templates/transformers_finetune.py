"""Text classification with Hugging Face transformers: fine-tune a pretrained model (or train a tiny one) on a CSV/JSONL.

Out of the box, offline, it trains a tiny BERT from scratch with a word-level vocabulary built from the embedded
synthetic movie reviews (../assets/sentiment.csv.gz, positive/negative) on a CPU in under a minute. For real work, name a model:

    python transformers_finetune.py fit                                          # tiny model, embedded reviews
    python transformers_finetune.py fit --model.name_or_path distilbert-base-uncased --data.data_path train.csv
    python transformers_finetune.py fit --model.name_or_path ./my_model --model.lora true   # LoRA (needs peft)
    python transformers_finetune.py fit --config configs/gpu.yaml ...           # bf16-mixed on one GPU
    python transformers_finetune.py fit --ckpt_path last ...                    # resume
    python transformers_finetune.py validate --ckpt_path runs/transformers_finetune/checkpoints/best.ckpt
    python transformers_finetune.py test --ckpt_path CKPT --data.test_path held_out.jsonl   # a whole labelled file
    python transformers_finetune.py predict --ckpt_path CKPT --data.predict_path new.jsonl  # -> predictions.csv
(test and predict take the fit's options too, e.g. --config config.yaml: the classes and vocabulary come from the
training file, and data whose classes differ from the checkpoint's is refused.)

Data: --data.data_path FILE (.csv, .csv.gz or .jsonl) with a text column and a label column
(--data.text_column, --data.label_column); labels may be strings or integers. The tokenizer follows the model
(--model.name_or_path); --data.tokenizer overrides it. trust_remote_code stays off unless you set
--model.trust_remote_code true for a model whose code you trust.
"""

import ast
import csv
import difflib
import gzip
import inspect
import json
import math
import os
import re
import signal
import sys
import warnings
import zipfile
from argparse import ArgumentError
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (BasePredictionWriter, Callback, EarlyStopping, LearningRateMonitor,
                                         ModelCheckpoint)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "assets" / "sentiment.csv.gz"
TINY_BERT = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
             "max_position_embeddings": 512}


class ConfigError(ValueError):
    """Bad data, model or strategy input: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class TextClassifier(L.LightningModule):
    def __init__(
        self,
        num_labels: int = 2,
        vocab_size: int = 30522,
        name_or_path: Optional[str] = None,
        model_type: str = "bert",
        model_config: Optional[dict] = None,
        learning_rate: Optional[float] = None,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        lora: bool = False,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        trust_remote_code: bool = False,
        class_names: Optional[list[str]] = None,
    ):
        """class_names come from the data (linked in the CLI); an export names its outputs with them (id2label).
        name_or_path: a pretrained model (name in the Hugging Face cache or a save_pretrained folder); None trains
        a tiny `model_type` model from scratch. learning_rate: default 5e-5 when fine-tuning, 1e-3 from scratch."""
        super().__init__()
        self.save_hyperparameters()
        self.model: Optional[torch.nn.Module] = None
        # micro: the share of texts classified right (torchmetrics' default, macro, would be balanced accuracy)
        self.val_acc, self.val_f1 = MulticlassAccuracy(num_labels, average="micro"), MulticlassF1Score(num_labels)
        self.test_acc, self.test_f1 = MulticlassAccuracy(num_labels, average="micro"), MulticlassF1Score(num_labels)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoConfig, AutoModelForSequenceClassification

        hp = self.hparams
        if hp.name_or_path:
            check_model_path(hp.name_or_path)
            try:
                # A saved classifier head for another number of classes is replaced by a new one (transformers
                # names it in a warning); the body keeps its pretrained weights.
                # dtype: float32 under -mixed precisions (trained weights and optimizer state), the named one under
                # -true, whatever dtype the checkpoint was saved in (Lightning sets the default for configure_model)
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    hp.name_or_path, num_labels=hp.num_labels, ignore_mismatched_sizes=True,
                    dtype=torch.get_default_dtype(), trust_remote_code=hp.trust_remote_code)
            except (OSError, ValueError) as err:
                fix = ("it ships its own Python code: read it, and only if you trust it pass --model.trust_remote_code"
                       " true") if "custom code" in str(err) else ("offline, pass a local folder saved with"
                                                                    " save_pretrained or a name already in the cache")
                raise ConfigError(f"cannot load model {hp.name_or_path!r} ({str(err).splitlines()[0]}): {fix}")
        else:
            user = {**(hp.model_config or {}), "vocab_size": hp.vocab_size, "num_labels": hp.num_labels}
            try:
                aliases = AutoConfig.for_model(hp.model_type).attribute_map  # DistilBERT's dim is hidden_size
                given = {aliases.get(key, key) for key in user}
                tiny = {key: value for key, value in TINY_BERT.items() if aliases.get(key, key) not in given}
                config = AutoConfig.for_model(hp.model_type, **tiny, **user)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"cannot build a {hp.model_type!r} config: {err}")
            self.model = AutoModelForSequenceClassification.from_config(config)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and self.model.config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer",
                                                      "data2vec-text"):
            limit -= 2  # their positions start after the padding index
        data = self.trainer.datamodule if self._trainer is not None else None
        encoded = [getattr(data, name, []) for name in ("train_set", "val_set", "test_set", "predict_set")]
        longest = max((len(ids) for items in encoded for ids, _ in items), default=0)  # setup ran before this
        if limit and longest > limit:  # else a crash at the first batch holding that text
            raise ConfigError(f"a text of {longest} tokens exceeds the model's {limit} positions: set"
                              f" --data.max_length {limit} or less")
        if hp.class_names:  # save_pretrained then names the classes (pipeline() prints them, not LABEL_0...)
            self.model.config.id2label = dict(enumerate(hp.class_names))
            self.model.config.label2id = {name: i for i, name in enumerate(hp.class_names)}
        if hp.lora:
            try:
                from peft import LoraConfig, TaskType, get_peft_model
            except ImportError:
                raise ConfigError("--model.lora true needs peft: pip install peft") from None
            lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=hp.lora_r, lora_alpha=hp.lora_alpha,
                              lora_dropout=hp.lora_dropout)
            self.model = get_peft_model(self.model, lora)  # only adapters and the classifier head train
        self.model.train()  # from_pretrained returns eval mode (no dropout) and Lightning 2.6 keeps a module's mode

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self(batch), batch["labels"])
        self.log("train_loss", loss)  # logged every log_every_n_steps; no per-step progress-bar sync
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch)
        self.val_acc(logits, batch["labels"])
        self.val_f1(logits, batch["labels"])
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, batch["labels"]), prog_bar=True,
                 sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)
        self.log("val_f1", self.val_f1)

    def test_step(self, batch, batch_idx):
        logits = self(batch)
        self.test_acc(logits, batch["labels"])
        self.test_f1(logits, batch["labels"])
        self.log("test_loss", torch.nn.functional.cross_entropy(logits, batch["labels"]), sync_dist=True)
        self.log("test_acc", self.test_acc)
        self.log("test_f1", self.test_f1)

    def predict_step(self, batch, batch_idx):
        confidence, prediction = self(batch).softmax(dim=-1).max(dim=-1)
        return {"prediction": prediction, "confidence": confidence, "label": batch["labels"]}

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.learning_rate or (5e-5 if hp.name_or_path else 1e-3)
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        # fused: one kernel for all parameters; not under fp16's gradient scaler, which must unscale first
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=self.device.type in ("cuda", "cpu") and scaler is None)
        total = self.trainer.estimated_stepping_batches  # inf when neither max_steps nor max_epochs is set
        if math.isfinite(total):
            scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total), int(total))
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, 0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Clipped here: Lightning 2.6 refuses to clip for a fused optimizer under bf16-mixed (no gradient scaler is
        # involved; Lightning #21435) and refuses norm clipping under FSDP. Gradients are unscaled by now.
        strategy = self.trainer.strategy
        if not gradient_clip_val or isinstance(strategy, DeepSpeedStrategy):  # DeepSpeed clips inside its engine
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        elif isinstance(strategy, FSDPStrategy):  # the norm over every rank's shards
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        else:  # DDP's gradients are already averaged
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)


def check_model_path(name_or_path: str) -> None:
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"folder not found: {name_or_path}: pass a folder saved with save_pretrained")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def split_words(text: str) -> list:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def read_records(path: Path) -> list:
    """(line number, record) pairs; a JSONL line that is not a JSON object is refused with its number."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:  # -sig: Excel's byte-order mark is no column
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
        records = []
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} line {number} is not JSON ({err.msg}): fix or delete that line") from None
            if line.strip() and not isinstance(record, dict):
                raise ConfigError(f"{path} line {number} is not a JSON object: one {{...}} record per line")
            if record is not None:
                records.append((number, record))
        return records


class TextClassificationData(L.LightningDataModule):
    def __init__(
        self,
        data_path: Optional[str] = None,
        text_column: str = "text",
        label_column: str = "label",
        tokenizer: Optional[str] = None,
        max_length: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        num_workers: int = 0,
        split_seed: int = 1234,
        trust_remote_code: bool = False,
        test_path: Optional[str] = None,
        predict_path: Optional[str] = None,
    ):
        """tokenizer: a Hugging Face name or folder (default: the model's); None with no model = a word-level
        vocabulary built from this data (for training from scratch). test_path: a labelled file `test` scores in
        full; predict_path: a file `predict` labels (its label column may be absent). Both use data_path's classes
        and vocabulary: keep data_path the training file."""
        super().__init__()
        self.save_hyperparameters()
        path = Path(data_path).expanduser() if data_path else DEFAULT_DATA
        if not path.is_file():
            raise ConfigError(f"data not found: {path}: set --data.data_path to a .csv, .csv.gz or .jsonl file")
        if not path.name.endswith((".csv", ".csv.gz", ".jsonl", ".jsonl.gz")):
            raise ConfigError(f"{path}: unsupported file type; use .csv, .csv.gz or .jsonl")
        self.texts, labels, _ = self.read(path, require_label=True)
        try:
            self.classes = sorted(set(labels), key=float)
        except ValueError:
            self.classes = sorted(set(labels))
        if not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction ({val_fraction}) must be between 0 and 1")
        if len(self.classes) < 2:
            raise ConfigError(f"{path}: column {label_column!r} holds fewer than 2 classes")
        self.targets = [self.classes.index(v) for v in labels]
        self.tokenizer, self.vocab = None, {}
        if not tokenizer:  # ids 0 = padding, 1 = unknown word
            words = sorted({w for text in self.texts for w in split_words(text)})
            self.vocab = {w: i + 2 for i, w in enumerate(words)}
        else:
            from transformers import AutoTokenizer

            check_model_path(tokenizer)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as err:
                fix = ("it ships its own Python code: read it, and only if you trust it pass"
                       " --model.trust_remote_code true") if "custom code" in str(err) else (
                    "offline, pass a local folder saved with save_pretrained or a name already in the cache")
                raise ConfigError(f"cannot load tokenizer {tokenizer!r} ({str(err).splitlines()[0]}): {fix}")

    def read(self, path: Path, require_label: bool) -> tuple:
        """(texts, labels or None for rows without one, line numbers) of a CSV/JSONL file."""
        text_column, label_column = self.hparams.text_column, self.hparams.label_column
        records = read_records(path)
        if not records:
            raise ConfigError(f"{path} holds no records")
        needed = (text_column, label_column) if require_label else (text_column,)
        for column in needed:
            if column not in records[0][1]:
                raise ConfigError(f"{path} has no column {column!r} (columns: {', '.join(records[0][1])}): set"
                                  f" --data.{'text' if column == text_column else 'label'}_column")
        for number, record in records:  # a missing label would otherwise become a class of its own ("None")
            for column in needed:
                if record.get(column) is None or (column == label_column and str(record[column]).strip() == ""):
                    raise ConfigError(f"{path} line {number} has no {column!r} value: fill it in or delete the line")
        labels = [None if r.get(label_column) is None else str(r[label_column]).strip() for _, r in records]
        return [str(r[text_column]) for _, r in records], labels, [n for n, _ in records]

    def extra_file(self, name: str, require_label: bool) -> tuple:
        """The encoded rows of test_path or predict_path, labels as the training file's class indices (-1: none)."""
        path = Path(self.hparams[f"{name}_path"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"{name} data not found: {path}: set --data.{name}_path to a .csv or .jsonl file")
        texts, labels, lines = self.read(path, require_label)
        unknown = sorted({v for v in labels if v is not None and v not in self.classes})
        if unknown and require_label:
            raise ConfigError(f"{path}: label(s) {', '.join(unknown[:5])} are not among the model's classes"
                              f" ({', '.join(self.classes[:8])})")
        targets = [self.classes.index(v) if v in self.classes else -1 for v in labels]
        return [(self.encode(t), y) for t, y in zip(texts, targets)], lines

    @property
    def num_labels(self) -> int:
        return len(self.classes)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2 if self.tokenizer is None else len(self.tokenizer)

    def encode(self, text: str) -> list:
        if self.tokenizer is None:
            return [self.vocab.get(w, 1) for w in split_words(text)][: self.hparams.max_length]
        return self.tokenizer(text, truncation=True, max_length=self.hparams.max_length)["input_ids"]

    def setup(self, stage: str) -> None:
        encoded = [(self.encode(t), y) for t, y in zip(self.texts, self.targets)]
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        n_val = max(1, int(len(encoded) * self.hparams.val_fraction))
        self.val_set = [encoded[i] for i in order[:n_val]]
        self.train_set = [encoded[i] for i in order[n_val:]]
        if stage == "test":
            self.test_set, _ = self.extra_file("test", require_label=True)
        if stage == "predict":
            self.predict_set, self.predict_lines = self.extra_file("predict", require_label=False)

    def collate(self, items: list) -> dict:
        pad = 0 if self.tokenizer is None else (self.tokenizer.pad_token_id or 0)
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (ids, _) in enumerate(items):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": torch.tensor([y for _, y in items])}

    def _loader(self, data: list, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=shuffle, collate_fn=self.collate,
                          num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self):
        return self._loader(self.predict_set, shuffle=False)


class PredictionCSV(BasePredictionWriter):
    """Writes predictions.csv (one file per process) into the run's log folder: nothing is overwritten. Each row
    names its line of the predict file."""

    def __init__(self):
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
        classes, lines = trainer.datamodule.classes, trainer.datamodule.predict_lines
        with open(out_dir / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["line", "prediction", "confidence", "label"])
            for batch, indices in zip(predictions, batch_indices[0]):
                for i, p, c, y in zip(indices, batch["prediction"].tolist(), batch["confidence"].tolist(),
                                      batch["label"].tolist()):
                    writer.writerow([lines[i], classes[p], f"{c:.4f}", classes[y] if y >= 0 else ""])
        print(f"predictions written to {out_dir / name}")


# ----------------------------------------------------------------------------------------------------------------
# Fault tolerance (the same block in every template; references/checkpointing.md, "What survives what")
# ----------------------------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf: reported as one line, exit code 1."""


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN/inf training loss and names its step. The flag stays on the device (no GPU
    sync per step): it is read every step on CPU, and on GPUs on logging steps, before validation, at epoch end and
    before every checkpoint save, so no checkpoint holds weights trained on a NaN. With several processes the ranks
    decide together (one rank stopping alone would leave the others waiting)."""

    def __init__(self):
        self.first_bad_step, self.step = None, 0

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


class CheckpointOnException(Callback):
    """On an exception or Ctrl-C during training, saves <dirpath>/last-on-exception.ckpt, so --ckpt_path last (the
    newest last*.ckpt) continues from that step. Unlike Lightning's OnExceptionCheckpoint it does not turn every fit
    without --ckpt_path into a resume, and it saves nothing after a NaN/inf loss (poisoned weights), when no step
    ran, or with several processes (a rank failing alone would wait forever in the collective save)."""

    def __init__(self, dirpath: Optional[str] = None):
        self.dirpath, self.start_step = dirpath, None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception):
        if (self.dirpath is None or self.start_step is None or trainer.global_step <= self.start_step
                or trainer.world_size > 1 or trainer.fast_dev_run or isinstance(exception, NonFiniteLossError)
                or monitor_missing(exception)):  # a config mistake: nothing to continue from
            return
        path = Path(self.dirpath) / "last-on-exception.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint, to resume from
        print(f"{type(exception).__name__} at step {trainer.global_step}: saved {path}; continue with"
              " --ckpt_path last", file=sys.stderr)


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
        progress, redo = loop.get("epoch_loop.batch_progress"), unfinished_batches(trainer)
        in_batch = progress is not None and progress["current"]["processed"] < progress["current"]["ready"]
        if progress is None or not (in_batch or redo):
            return
        for counts in (progress["total"], progress["current"]):
            done = counts["processed"] - redo  # on_train_batch_end's state: all counted but completed
            counts.update(ready=done, started=done, processed=done, completed=done - 1)
        progress["is_last_batch"] = False
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1  # that restart adds the step it assumes uncounted


def best_checkpoint_file(config) -> str:
    """The newest file fit's best_checkpoint callback wrote in <dirpath or default_root_dir/checkpoints>:
    <filename>.ckpt, or <filename>-v1.ckpt, -v2, ... where a later fit found the name taken."""
    folder = Path(config.best_checkpoint.dirpath or Path(config.trainer.default_root_dir or ".") / "checkpoints")
    name = config.best_checkpoint.filename or "best"
    found = [f for f in folder.glob("*.ckpt") if re.fullmatch(re.escape(name) + r"(-v\d+)?\.ckpt", f.name)]
    return str(max(found, key=lambda f: f.stat().st_mtime) if found else folder / f"{name}.ckpt")


def check_run_inputs(config) -> None:
    """Refuses, before anything is built or written: a checkpoint that is missing, truncated or holds code, and more
    CPU processes than cores (Lightning would start them all and stall)."""
    ckpt = config.get("ckpt_path")
    if ckpt and ckpt not in ("last", "best", "hpc") and not re.match(r"\w+:", str(ckpt)):  # URLs, registry:
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
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:
                found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
                reason = (f"it holds a Python object ({found.group(1)}) that could run code when loaded, so it is"
                          " refused; save plain tensors and values instead") if found else (
                    f"it is damaged ({str(err).splitlines()[0][:120]})")
                raise ConfigError(f"cannot load checkpoint {path}: {reason}") from None
    trainer = config.trainer
    accelerator = trainer.accelerator if isinstance(trainer.accelerator, str) else None
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if on_cpu and str(trainer.devices).isdigit() and int(trainer.devices) > cores:
        raise ConfigError(f"devices={trainer.devices} asks for {trainer.devices} CPU processes but this machine has"
                          f" {cores} cores: set --trainer.devices to at most {cores} (1 is fastest for small models)")


def checkpoint_to_read(config) -> Optional[Path]:
    """The single file --ckpt_path names, or the one `last` resumes from (the newest last*.ckpt in the checkpoint
    folder, as Lightning picks it); None when there is none yet, or for a sharded folder, a URL or `hpc`."""
    ckpt = config.get("ckpt_path")
    if not ckpt or ckpt == "hpc" or re.match(r"\w+:", str(ckpt)):
        return None
    if ckpt == "last":
        folder = Path(config.last_checkpoint.dirpath or Path(config.trainer.default_root_dir or ".") / "checkpoints")
        found = [f for f in folder.glob("last*.ckpt") if f.is_file()]
        return max(found, key=lambda f: f.stat().st_mtime) if found else None
    path = Path(ckpt).expanduser()
    return path if path.is_file() else None


def plain(value):
    """A config value as JSON data, so that (256, 128) from the command line equals [256, 128] from a checkpoint."""
    return json.loads(json.dumps(value, default=str))


def follow_checkpoint(config, defaults, path: Path, resuming: bool) -> None:
    """Makes the model and the checkpoint rules of this run those of the checkpoint it loads. A model option this
    command sets (other than its default) to another value than the checkpoint's is refused in one line: an explicit
    path would otherwise train the checkpoint's model, silently (LightningCLI rebuilds it from the file), and `last`
    would load it into another one. A resumed fit keeps the monitor and mode its best checkpoint and early stopping
    started with: Lightning files their state (best score, patience) under a key made of both and would resume
    without it, silently, under another rule."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key, value in (ckpt.get("hyper_parameters") or {}).items():
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
        wanted.monitor, wanted.mode = saved[0]["monitor"], saved[0]["mode"]
        rank_zero_info(f"{name} keeps ranking by {wanted.monitor} ({wanted.mode}), as the run in {path.name} did")


def literal_rule(text: str) -> dict:
    try:
        rule = ast.literal_eval(text)
    except (ValueError, SyntaxError):  # e.g. a train_time_interval, which is no literal
        return {}
    return rule if isinstance(rule, dict) else {}


class ValidationHistory(Callback):
    """The validation metrics of each validation in this process, by global step: the after-fit line reports those
    of the kept checkpoint (accuracy, say, next to the loss it was ranked by)."""

    def __init__(self):
        self.by_step: dict = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.by_step[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                                 if k.startswith("val_") and v.numel() == 1}


def kept_checkpoint(trainer) -> str:
    """`best <monitor>=<score> (epoch E, step S; other validation metrics) checkpoint=<path>` for the file the
    best_checkpoint callback kept."""
    callback = trainer.checkpoint_callback
    path, where = callback.best_model_path, ""
    if Path(path).is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        history = next((c.by_step for c in trainer.callbacks if isinstance(c, ValidationHistory)), {})
        others = [f"{k}={v:.4f}" for k, v in history.get(saved["global_step"], {}).items() if k != callback.monitor]
        where = f" (epoch {saved['epoch']}, step {saved['global_step']}{'; ' if others else ''}{', '.join(others)})"
    return f"best {callback.monitor}={callback.best_model_score.item():.4f}{where} checkpoint={path}"


def release_process_group() -> None:
    """Ends the process group while Python is still whole. Lightning 2.6 does this at exit for NCCL only; a gloo
    (CPU) group left to interpreter shutdown can abort a finished run ("terminate called without an active
    exception", exit code -6)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def refuse_misspelt_keys(model_type: str, model_config) -> None:
    """A transformers config keeps any keyword, so a misspelt model_config key would change nothing, silently: refuse
    a key that is not the config's own but within a letter or two of one of its keys."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type)
    except ValueError:
        return  # an unknown model_type is reported where the model is built
    known = set(config.to_dict()) | set(config.attribute_map)
    for cls in type(config).__mro__:
        if "__init__" in vars(cls):
            known |= set(inspect.signature(cls.__init__).parameters)
    near = {key: difflib.get_close_matches(key, known, n=1, cutoff=0.85) for key in model_config or {}}
    typos = {key: match[0] for key, match in near.items() if key not in known and match}
    if typos:
        raise ConfigError(f"model_config key(s) {sorted(typos)} are not {type(config).__name__} settings; did you"
                          f" mean: {', '.join(typos[key] for key in sorted(typos))}")


def subcommand_defaults(parser, subcommand):
    """The defaults of a subcommand's options: what a user who sets nothing gets."""
    return (parser._subcommands_action._name_parser_map[subcommand] if subcommand else parser).get_defaults()


def with_nearest_keys(parser, err: Exception) -> str:
    """The parser's error, plus the nearest valid keys for a mistyped one."""
    subcommands = parser._subcommands_action._name_parser_map.values() if parser._subcommands_action else []
    keys = {k for sub in [*subcommands, parser] for k in sub.get_defaults().keys()}
    typed = [t for t in re.findall(r"[\w.]+\.[\w.]+|(?<=--)\w+", str(err)) if t not in keys]
    near = sorted({k for t in typed for k in difflib.get_close_matches(t, keys, n=3, cutoff=0.6)})
    return f"{err}" + (f"; did you mean: {', '.join(near)}" if near else "")


def without_unused_lr_monitor(trainer):
    """--trainer.logger false: LearningRateMonitor has nothing to log to and would stop the run at its start."""
    if not trainer.loggers:
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
    return trainer


class FinetuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_argument("--matmul_precision", choices=["highest", "high", "medium"], default="high",
                            help="torch.set_float32_matmul_precision: high uses TF32 tensor cores for float32"
                            " matmuls on Ampere and newer GPUs; scaffold.py sets what detect_hardware.py recommends")
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.class_names", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
        parser.set_defaults({"best_checkpoint.monitor": "val_loss", "best_checkpoint.mode": "min",
                             "best_checkpoint.filename": "best"})
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")  # unmonitored: last.ckpt every epoch
        parser.set_defaults({"last_checkpoint.save_last": True})
        # Checked after validation only: a run that ends before its first validation (a small max_steps) then stops
        # normally instead of failing at the epoch's end on the metric it has not logged yet.
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val_loss", "early_stopping.mode": "min",
                             "early_stopping.patience": 3, "early_stopping.check_on_train_epoch_end": False})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(CheckpointOnException, "exception_checkpoint")

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(with_nearest_keys(parser, err)) from None
        # Before LightningCLI reads hyperparameters from --ckpt_path and before anything is built or written.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if subcommand in ("test", "predict") and not config.data.get(f"{subcommand}_path"):
            raise ConfigError(f"{subcommand} needs --data.{subcommand}_path FILE (the training file stays"
                              " --data.data_path: it defines the classes)")
        if subcommand in ("validate", "test", "predict") and config.get("ckpt_path") == "best":
            config.ckpt_path = best_checkpoint_file(config)  # a new process has no fit's best_model_path
        check_run_inputs(config)
        for group, key in (("model", "name_or_path"), ("data", "tokenizer")):  # stored in checkpoints: a later run
            value = config[group][key]                                          # may start in another folder
            if value and Path(value).expanduser().exists():
                config[group][key] = str(Path(value).expanduser().resolve())
        model = (self.config[self.config.subcommand] if self.config.get("subcommand") else self.config).model
        if not model.name_or_path:
            refuse_misspelt_keys(model.model_type, model.model_config)
        path = checkpoint_to_read(config)
        if path is not None:  # after the paths above are absolute: checkpoints store them so
            follow_checkpoint(config, subcommand_defaults(parser, subcommand), path, resuming=subcommand == "fit")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        torch.set_float32_matmul_precision(config.matmul_precision)
        for key in ("best_checkpoint", "last_checkpoint", "exception_checkpoint"):
            if config[key].dirpath is None:
                config[key].dirpath = str(Path(config.trainer.default_root_dir or ".") / "checkpoints")
        if config.get("weights_only", False) is None:
            config.weights_only = True  # resume/validate load tensors and plain values only: no code runs
        if config.trainer.fast_dev_run:  # Lightning 2.6 writes last.ckpt at train end even under fast_dev_run
            config.last_checkpoint.save_last = False
        if config.model.name_or_path and not config.data.tokenizer:
            config.data.tokenizer = config.model.name_or_path  # the model's own tokenizer
        config.data.trust_remote_code = config.model.trust_remote_code

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path"):
            refuse_other_data(config.ckpt_path, self.datamodule)
        if self.subcommand == "predict":
            self.trainer.callbacks.append(PredictionCSV())

    def instantiate_trainer(self, **kwargs):
        try:
            return without_unused_lr_monitor(super().instantiate_trainer(**kwargs))
        except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as err:  # FSDP on CPU
            raise ConfigError(f"cannot build the Trainer: {err}") from None

    def after_fit(self) -> None:
        best, stopper = self.trainer.checkpoint_callback, self.trainer.early_stopping_callback
        if not self.trainer.is_global_zero:
            return
        reason = getattr(stopper, "stopping_reason_message", None) if self.trainer.should_stop else None
        if reason:  # patience, a threshold or a non-finite metric: Lightning's own words
            print(f"stopped early in epoch {stopper.stopped_epoch}: {reason}")
        if best is not None and best.best_model_score is not None:
            print(kept_checkpoint(self.trainer))


def refuse_other_data(ckpt_path: str, data: TextClassificationData) -> None:
    """The checkpoint's classes and vocabulary size must be this data's: labels are numbered by the training file's
    sorted classes, so another file (say, a held-out one as --data.data_path) would score or name them wrongly."""
    if not Path(ckpt_path).is_file():
        return  # Lightning names a missing file itself
    hp = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    trained = ([str(c) for c in hp.get("class_names") or data.classes], hp.get("vocab_size", data.vocab_size))
    if trained != (list(data.classes), data.vocab_size):
        raise ConfigError(f"the checkpoint was trained on classes {', '.join(trained[0][:8])} (vocabulary"
                          f" {trained[1]}); this data gives {', '.join(data.classes[:8])} ({data.vocab_size}): keep"
                          " the training file as --data.data_path (e.g. --config config.yaml) and pass the other file"
                          " as --data.test_path or --data.predict_path")


def main(args=None, run: bool = True, callbacks: tuple = ()):
    """Command line. run=False builds model, data and trainer without running a subcommand and returns the CLI;
    callbacks are always added (hpo_optuna.py passes its pruning callback this way)."""
    # configure_gradient_clipping leaves clipping to DeepSpeed, which clips by trainer.gradient_clip_val itself
    warnings.filterwarnings("ignore", "Since DeepSpeed handles gradient clipping internally")
    try:
        return FinetuneCLI(
            TextClassifier,
            TextClassificationData,
            seed_everything_default=42,
            auto_configure_optimizers=False,  # the model's configure_optimizers decides; --optimizer would be ignored
            trainer_defaults={"max_epochs": 10, "log_every_n_steps": 10, "gradient_clip_val": 1.0,
                              "default_root_dir": "runs/transformers_finetune",
                              "callbacks": [ResumableRandomState(), ResumeAtUnfinishedBatch(), StopOnNonFiniteLoss(),
                                            ValidationHistory(), *callbacks]},
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
            args=args,
            run=run,
        )
    except SIGTERMException:  # Lightning raises it as a SystemExit without a code, which would exit 0 (success)
        sys.stderr.write(f"{Path(sys.argv[0]).name}: stopped by SIGTERM; --ckpt_path last continues from the newest"
                         " checkpoint\n")
        sys.exit(128 + signal.SIGTERM)
    except (ConfigError, NonFiniteLossError) as err:
        message = " ".join(str(err).split())
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")  # one write: ranks' lines stay whole
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)
    except (MisconfigurationException, RuntimeError) as err:
        if "Error(s) in loading state_dict" in str(err):  # a checkpoint of another model shape (vocabulary, classes)
            detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
            sys.stderr.write(f"{Path(sys.argv[0]).name}: error: the checkpoint does not fit this model"
                             f" ({detail[:200]}): pass the options it was trained with (its run's config.yaml)\n")
            sys.exit(2)
        if not monitor_missing(err):
            raise
        message = " ".join(str(err).split())
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message} (set that callback's monitor, e.g."
                         " --best_checkpoint.monitor, to a logged metric)\n")
        sys.exit(2)
    finally:  # after errors too, while the interpreter is still whole; run=False callers own their group
        if run:
            release_process_group()


if __name__ == "__main__":
    main()
