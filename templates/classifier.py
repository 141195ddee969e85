"""Classifier template: LightningModule + LightningDataModule + LightningCLI in one file.

Trains out of the box on the 8x8 handwritten digits shipped in ../assets (1,797 images; about 97% validation
accuracy in well under a minute on a laptop CPU). Copy this file into your project and point it at your data.

Run it:
    python classifier.py fit                                     # train (CPU defaults, embedded digits)
    python classifier.py fit --config configs/gpu.yaml           # one GPU, bf16-mixed
    python classifier.py fit --config configs/ddp.yaml           # all GPUs of one machine, DDP
    python classifier.py fit --ckpt_path last                    # resume an interrupted run where it stopped
    python classifier.py test --ckpt_path runs/classifier/checkpoints/best.ckpt
    python classifier.py predict --ckpt_path runs/classifier/checkpoints/best.ckpt   # writes predictions.csv
    python classifier.py predict --ckpt_path ... --data.predict_path new_images/   # new, unlabelled data
    python classifier.py test --ckpt_path ... --data.test_path held_out/   # a whole labelled set; accuracy per class
In a scaffolded project, pass --config config.yaml (your data settings) before any other config, e.g.
    python classifier.py fit --config config.yaml --config configs/gpu.yaml
    python classifier.py fit --print_config > my_config.yaml     # every setting, ready to edit and pass back

Your own data is a config value, not a code change:
    --data.data_path my_table.csv --data.label_column species    # CSV (or .csv.gz): numeric features + a label column
    --data.data_path my_images/                                  # folder of images, one subfolder per class
    --data.image_size 64 --data.grayscale false                  # image folders: resize and colour mode
The network is the one place to edit for a different model: `build_network` below.

Inference without this script: Classifier.load_from_checkpoint(best, weights_only=True).eval() takes raw CSV rows (it
standardizes them itself); model.hparams.class_names names its outputs.

Outputs: checkpoints in <trainer.default_root_dir>/checkpoints (best.ckpt by val_loss, last.ckpt every epoch), logs in
<trainer.default_root_dir>/lightning_logs/version_N (TensorBoard; CSV when tensorboard is not installed).
"""

import ast
import csv
import difflib
from argparse import ArgumentError
import gzip
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning as L
from lightning.fabric.utilities.data import suggested_max_num_workers
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (BasePredictionWriter, Callback, EarlyStopping, LearningRateMonitor,
                                         ModelCheckpoint)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "assets" / "digits.csv.gz"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ConfigError(ValueError):
    """Bad data or configuration input: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Model: edit `build_network` for another architecture; everything else adapts.
# ----------------------------------------------------------------------------------------------------------------
def build_network(input_shape: tuple, num_classes: int, hidden_dims: tuple, dropout: float) -> nn.Module:
    """An MLP for feature vectors; images (C, H, W) get a small convolutional stem in front of it."""
    layers: list = []
    if len(input_shape) == 3:
        channels = input_shape[0]
        for width in (32, 64):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        layers.append(nn.AdaptiveAvgPool2d(4))
        features = channels * 16
    else:
        features = math.prod(input_shape)
    layers.append(nn.Flatten())
    for width in hidden_dims:
        layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(dropout)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


class Classifier(L.LightningModule):
    def __init__(
        self,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (64,),
        hidden_dims: tuple[int, ...] = (256, 128),
        dropout: float = 0.1,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        class_names: Optional[list[str]] = None,
    ):
        """num_classes, input_shape and class_names come from the data (linked in the CLI)."""
        super().__init__()
        if not 0 <= dropout < 1 or lr <= 0:
            raise ConfigError(f"dropout ({dropout}) must be in [0, 1) and lr ({lr}) above 0")
        self.save_hyperparameters()  # load_from_checkpoint needs no arguments
        self.net = build_network(tuple(input_shape), num_classes, tuple(hidden_dims), dropout)
        # Feature vectors are standardized here, with the training split's statistics (set at fit start), so a
        # checkpoint alone predicts on raw CSV rows: Classifier.load_from_checkpoint(path)(rows).
        shape = tuple(input_shape) if len(input_shape) == 1 else ()
        self.register_buffer("input_mean", torch.zeros(shape))
        self.register_buffer("input_std", torch.ones(shape))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)  # per-class accuracy, printed after `test`
        self.test_matrix: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mean.dim():  # feature vectors (images arrive scaled to [-1, 1])
            x = (x - self.input_mean) / self.input_std
        return self.net(x)

    def on_fit_start(self):
        data = self.trainer.datamodule
        if getattr(data, "mean", None) is not None:
            self.input_mean.copy_(data.mean)
            self.input_std.copy_(data.std)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        # No prog_bar on per-step values: the logger reads them every log_every_n_steps, so there is no
        # device-to-host sync each step. Epoch values are accumulated on the device and averaged over every process
        # once, at the epoch's end (sync_dist on a per-step value would add a collective to every step).
        self.log("train_loss", loss)
        self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", self.test_acc)
        self.test_confusion(self(batch[0]), batch[1])

    def on_test_epoch_end(self):
        self.test_matrix = self.test_confusion.compute().cpu()  # rows: true class, columns: predicted; all ranks
        self.test_confusion.reset()

    def _evaluate(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        metric(logits, y)  # torchmetrics syncs itself across processes
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", metric, prog_bar=True)

    def predict_step(self, batch, batch_idx):
        x, y = batch
        probs = self(x).softmax(dim=-1)
        confidence, prediction = probs.max(dim=-1)
        return {"prediction": prediction, "confidence": confidence, "label": y}

    def configure_optimizers(self):
        # fused on CUDA: one kernel, and under 16-mixed no GPU read per step (GradScaler hands it the inf check);
        # not with --trainer.gradient_clip_val, which Lightning 2.6 refuses for a fused optimizer under -mixed
        fused = self.device.type == "cuda" and not self.trainer.gradient_clip_val
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                      fused=fused)
        epochs = self.trainer.max_epochs
        if not epochs or epochs < 1:  # max_epochs=-1 trains until stopped: keep the learning rate constant
            return optimizer

        def cosine(epoch: int) -> float:
            # max_epochs read at each step, not stored: a run resumed with a larger max_epochs follows the longer
            # schedule from where it is (CosineAnnealingLR would restore the old T_max, reach 0 and climb back up)
            total = max(1, self.trainer.max_epochs)
            return 0.5 * (1 + math.cos(math.pi * min(epoch, total) / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_start(self):
        # A resumed run restores the optimizer's learning rate from the checkpoint, where the old schedule left it:
        # set it from the schedule at this epoch (a fresh run: unchanged).
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # e.g. the Tuner's lr_find sweep
                continue
            for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)


# ----------------------------------------------------------------------------------------------------------------
# Data: a CSV of numeric features + label column, or a folder of images with one subfolder per class.
# ----------------------------------------------------------------------------------------------------------------
def read_csv_table(path: Path, label_column: str, require_label: bool = True):
    """Returns (features [N, F] float tensor, raw labels or None, feature column names)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:  # -sig: Excel's byte-order mark is no column
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ConfigError(f"{path} has no data rows: a CSV needs a header row and at least one data row")
    header, rows = rows[0], rows[1:]
    if label_column not in header and require_label:
        raise ConfigError(f"{path} has no column {label_column!r} (columns: {', '.join(header[:8])}"
                        f"{', ...' if len(header) > 8 else ''}): set --data.label_column to the label column")
    label_idx = header.index(label_column) if label_column in header else None
    feature_idx = [i for i in range(len(header)) if i != label_idx]
    try:
        features = torch.tensor([[float(row[i]) for i in feature_idx] for row in rows], dtype=torch.float32)
        bad = None if features.isfinite().all() else (~features.isfinite()).nonzero()[0].tolist()
    except (ValueError, IndexError):
        bad = next([r, k] for r, row in enumerate(rows) for k, i in enumerate(feature_idx)
                   if not _is_number(row[i] if i < len(row) else ""))
    if bad:  # line numbers count the header as line 1, as editors do
        r, k = bad
        value = rows[r][feature_idx[k]] if feature_idx[k] < len(rows[r]) else ""
        raise ConfigError(f"{path} line {r + 2}, column {header[feature_idx[k]]!r}: {value!r} is not a finite number;"
                          f" every column but the label {label_column!r} must be numeric: fill or drop that row")
    labels = [row[label_idx] for row in rows] if label_idx is not None else None
    return features, labels, [header[i] for i in feature_idx]


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def in_training_order(features: torch.Tensor, names: list, wanted: list, path: Path) -> torch.Tensor:
    """Predict data's feature columns matched to the training data's by name (any order); missing or extra ones
    are refused, since a column in the wrong place gives wrong predictions without any error."""
    if names == wanted:
        return features
    missing, extra = [n for n in wanted if n not in names], [n for n in names if n not in wanted]
    if missing or extra or len(set(names)) != len(names):
        raise ConfigError(f"{path}: its feature columns differ from the training data's (missing: {missing[:5]},"
                          f" not in training: {extra[:5]}): predict data needs the same named columns, in any order")
    return features[:, [names.index(n) for n in wanted]]


def sorted_classes(labels) -> list:
    """Class names in a stable order: numerically when every label is a number."""
    unique = set(labels)
    try:
        return sorted(unique, key=float)
    except ValueError:
        return sorted(unique)


def refuse_unreadable_images(files: list) -> None:
    """Opens every image's header (about 60 us a file) so that a file that is no image stops the run before training,
    not hours into it."""
    from PIL import Image

    bad = []
    for file in files:
        try:
            with Image.open(file):
                pass
        except OSError:  # PIL's UnidentifiedImageError is one
            bad.append(str(file))
    if bad:
        raise ConfigError(f"{len(bad)} file(s) are not readable images: {', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''}: delete or replace them")


class ImageFolder(Dataset):
    """Loads images lazily, so a folder larger than memory works (DataLoader workers decode while the model trains)."""

    def __init__(self, files: list, labels: list, image_size: int, grayscale: bool):
        self.files, self.labels, self.image_size, self.mode = files, labels, image_size, "L" if grayscale else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as img:
                img = img.convert(self.mode).resize((self.image_size, self.image_size))
                x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except OSError as err:  # a file cut short: its header read at start-up, its pixels do not
            raise OSError(f"cannot decode image {self.files[i]} ({err}): replace or delete it, then rerun") from None
        x = x.view(self.image_size, self.image_size, -1).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return x, self.labels[i]


class ClassificationData(L.LightningDataModule):
    def __init__(
        self,
        data_path: Optional[str] = None,
        label_column: str = "label",
        image_size: int = 32,
        grayscale: bool = False,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 64,
        num_workers: Optional[int] = None,
        split_seed: int = 1234,
        predict_path: Optional[str] = None,
        test_path: Optional[str] = None,
    ):
        """data_path: CSV/CSV.GZ file or image folder (default: the embedded digits). num_workers: DataLoader
        worker processes; default: none for a CSV (held in memory), for images Lightning's suggestion for this
        machine's CPUs per device, at most 8. split_seed fixes the train/val/test split across runs: stratified by
        class, and adding or removing data moves only a few other items between splits.
        predict_path: what `predict` labels (a CSV without the label column, or a folder of images, in class
        subfolders or not); default: the test split. predictions.csv names each row's file or CSV row.
        test_path: a labelled CSV or image folder that `test` scores in full; default: the test split."""
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ConfigError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
        if batch_size < 1 or (num_workers is not None and num_workers < 0) or image_size < 1:
            raise ConfigError(f"batch_size ({batch_size}) and image_size ({image_size}) must be at least 1, num_workers"
                              f" ({num_workers}) at least 0")
        self.path = Path(data_path).expanduser() if data_path else DEFAULT_DATA
        if not self.path.exists():
            hint = "" if data_path else " (the embedded digits live in ../assets next to this template)"
            raise ConfigError(f"data not found: {self.path}{hint}: set --data.data_path to a CSV file or image folder")
        self.classes, self.inputs, self.targets = self._load(self.path, require_label=True)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.inputs.shape[1:]) if torch.is_tensor(self.inputs) else (1 if self.hparams.grayscale else 3,
                                                                                   self.hparams.image_size,
                                                                                   self.hparams.image_size)

    def _load(self, path: Path, require_label: bool, classes: Optional[list] = None):
        """Returns (classes, inputs, targets): inputs is a feature tensor (CSV) or a list of image files. An image's
        class is its top-level folder, whatever subfolders lie below it (as in torchvision's ImageFolder)."""
        if path.is_dir():
            def visible(p: Path) -> bool:  # not .DS_Store, ._x.png, .ipynb_checkpoints/ or a zip's __MACOSX/
                return not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(path).parts)

            training = classes is None
            if training:
                classes = sorted(p.name for p in path.iterdir() if p.is_dir() and visible(p))
            files, targets, outside = [], [], []
            for p in sorted(path.rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES and visible(p):
                    files.append(p)
                    parts = p.relative_to(path).parts
                    targets.append(classes.index(parts[0]) if len(parts) > 1 and parts[0] in classes else -1)
                    if targets[-1] < 0:
                        outside.append(p)
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            if not files:
                raise ConfigError(f"{path}: no images ({kinds}) found")
            if require_label and outside:
                raise ConfigError(f"{path}: {len(outside)} image(s) are not in a class subfolder"
                                  f"{'' if training else ' named after one of the model classes'}, e.g. {outside[0]}:"
                                  " move them into one (an image's class is its top-level folder)")
            empty = [c for i, c in enumerate(classes) if i not in set(targets)] if training else []
            if require_label and empty:
                raise ConfigError(f"{path}: class folder(s) {', '.join(empty[:5])} hold no images ({kinds}): add"
                                  " images or move them out")
            if require_label and len(classes) < 2:
                raise ConfigError(f"{path}: an image folder needs at least 2 class subfolders holding images")
            refuse_unreadable_images(files)
            return classes, files, torch.tensor(targets)
        if not path.name.endswith((".csv", ".csv.gz")):
            raise ConfigError(f"{path}: unsupported data file; use a .csv/.csv.gz table or a folder of images")
        features, labels, names = read_csv_table(path, self.hparams.label_column, require_label)
        if classes is not None:  # predict data: the training data's columns, in its order
            features = in_training_order(features, names, getattr(self, "feature_names", []), path)
        else:
            self.feature_names = names
            classes = sorted_classes(labels)
            if len(classes) < 2:
                raise ConfigError(f"{path}: column {self.hparams.label_column!r} holds fewer than 2 classes")
        targets = [classes.index(v) if v in classes else -1 for v in labels] if labels else [-1] * len(features)
        if require_label and -1 in targets:  # test data with a label the model never saw
            unknown = sorted({v for v in labels if v not in classes})
            raise ConfigError(f"{path}: label(s) {', '.join(unknown[:5])} are not among the model's classes"
                              f" ({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
        return classes, features, torch.tensor(targets)

    def setup(self, stage: str) -> None:
        # The same seed gives every process (and every resumed run) the same split.
        hp = self.hparams
        keys = row_keys(self.inputs, self.targets) if torch.is_tensor(self.inputs) else [
            p.relative_to(self.path).as_posix() for p in self.inputs]  # image paths
        splits = split_by_class(keys, self.targets.tolist(), hp.val_fraction, hp.test_fraction, hp.split_seed)
        unmeasured = sorted({self.classes[int(c)] for c in self.targets.unique()} -
                            {self.classes[int(c)] for c in self.targets[splits["val"]].unique()})
        if unmeasured and hp.val_fraction > 0 and stage == "fit":
            rank_zero_warn(f"class(es) {', '.join(unmeasured[:8])} have too few examples for one in the validation"
                           " split: val_acc does not measure them (add data, or raise val_fraction)")
        if torch.is_tensor(self.inputs):  # training-split statistics: the model standardizes with them
            train = self.inputs[splits["train"]]
            std = train.std(0)
            self.mean, self.std = train.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std))  # constant columns
        self.datasets = {name: self._dataset(self.inputs, self.targets, idx) for name, idx in splits.items()}
        if stage == "test" and hp.test_path:
            path = Path(hp.test_path).expanduser()
            if not path.exists():
                raise ConfigError(f"test data not found: {path}: set --data.test_path")
            _, inputs, targets = self._load(path, require_label=True, classes=self.classes)
            self.datasets["test"] = self._dataset(inputs, targets, torch.arange(len(targets)))
        if stage == "predict" and self.hparams.predict_path:
            path = Path(self.hparams.predict_path).expanduser()
            if not path.exists():
                raise ConfigError(f"predict data not found: {path}: set --data.predict_path")
            _, inputs, targets = self._load(path, require_label=False, classes=self.classes)
            self.datasets["predict"] = self._dataset(inputs, targets, torch.arange(len(targets)))
            self.predict_sources = sources_of(inputs, range(len(targets)))
        else:
            self.datasets["predict"] = self.datasets["test"]
            self.predict_sources = sources_of(self.inputs, splits["test"].tolist())

    def _dataset(self, inputs, targets, idx: torch.Tensor) -> Dataset:
        if torch.is_tensor(inputs):
            return TensorDataset(inputs[idx], targets[idx])
        return ImageFolder([inputs[i] for i in idx], targets[idx].tolist(), self.hparams.image_size,
                           self.hparams.grayscale)

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        if workers is None:  # decoding images in the training process would leave the accelerator waiting
            devices = self.trainer.num_devices if self.trainer else 1
            workers = min(8, suggested_max_num_workers(devices)) if isinstance(self.datasets[name], ImageFolder) else 0
        return DataLoader(self.datasets[name], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")


def row_keys(features: torch.Tensor, targets: torch.Tensor) -> list:
    """A CSV row's split key: its values and label (and which repeat of them it is), not its position, so inserting
    or deleting rows leaves the other rows in their splits."""
    keys, seen = [], {}
    for row, target in zip(features.numpy(), targets.tolist()):
        key = hashlib.blake2b(row.tobytes() + str(target).encode(), digest_size=8).hexdigest()
        seen[key] = seen.get(key, 0) + 1
        keys.append(f"{key}/{seen[key]}")
    return keys


def split_by_class(keys, targets: list, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Indices of the val, test and train splits: int(n * fraction) items each, shared out over the classes in
    proportion to their sizes (largest remainder; each class keeps a training example). Within a class, items are
    ordered by a hash of (seed, key), so adding or removing a few items moves only a few others between splits,
    where a permutation of the whole list would reshuffle them all (and leak test data into training)."""
    by_class: dict = {}
    for i, (key, target) in enumerate(zip(keys, targets)):
        by_class.setdefault(target, []).append((hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), i))
    orders = [[i for _, i in sorted(members)] for _, members in sorted(by_class.items())]
    room = [len(order) - 1 for order in orders]  # what each class can still give away
    splits = {"val": [], "test": [], "train": []}
    taken = [0] * len(orders)
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        shares = [len(order) * fraction for order in orders]
        counts = [min(int(share), r) for share, r in zip(shares, room)]
        by_remainder = sorted(range(len(orders)), key=lambda c: (-(shares[c] - int(shares[c])), c))
        for c in by_remainder * 2:  # a second pass fills what classes without room left over
            if sum(counts) >= int(len(targets) * fraction):
                break
            if counts[c] < room[c]:
                counts[c] += 1
        for c, (order, count) in enumerate(zip(orders, counts)):
            splits[name] += order[taken[c]:taken[c] + count]
            taken[c] += count
            room[c] -= count
    for c, order in enumerate(orders):
        splits["train"] += order[taken[c]:]
    return {name: torch.tensor(sorted(idx), dtype=torch.long) for name, idx in splits.items()}


def sources_of(inputs, idx) -> tuple:
    """What each prediction comes from: ("file", image paths) or ("row", CSV data rows, 1 = the row after the
    header)."""
    if torch.is_tensor(inputs):
        return "row", [i + 1 for i in idx]
    return "file", [str(inputs[i]) for i in idx]


class PredictionCSV(BasePredictionWriter):
    """Writes predictions.csv (one file per process) into the run's log folder: nothing is overwritten. Its first
    column names the input of each row: the image file, or the CSV data row."""

    def __init__(self):
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
        classes, (column, sources) = trainer.datamodule.classes, trainer.datamodule.predict_sources
        with open(out_dir / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([column, "prediction", "confidence", "label"])
            for batch, indices in zip(predictions, batch_indices[0]):  # indices into the predict dataset
                for i, p, c, y in zip(indices, batch["prediction"].tolist(), batch["confidence"].tolist(),
                                      batch["label"].tolist()):
                    writer.writerow([sources[i], classes[p], f"{c:.4f}", classes[y] if y >= 0 else ""])
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
# Command line: callbacks that every run gets, with defaults that any config or flag can change.
# ----------------------------------------------------------------------------------------------------------------
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


class ClassifierCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_argument("--matmul_precision", choices=["highest", "high", "medium"], default="high",
                            help="torch.set_float32_matmul_precision: high uses TF32 tensor cores for float32"
                            " matmuls on Ampere and newer GPUs; scaffold.py sets what detect_hardware.py recommends")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.class_names", apply_on="instantiate")
        # The best model by validation loss (accuracy on a small validation set ties from the first epochs on, and a
        # tie keeps the older model), and an unmonitored checkpoint whose last.ckpt is rewritten every
        # epoch: a monitored one only rewrites last.ckpt when the metric improves, so resuming from it could redo
        # epochs. dirpath None means <trainer.default_root_dir>/checkpoints: a fixed folder that --ckpt_path last finds.
        parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
        parser.set_defaults({"best_checkpoint.monitor": "val_loss", "best_checkpoint.mode": "min",
                             "best_checkpoint.filename": "best", "best_checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({"last_checkpoint.save_last": True, "last_checkpoint.save_top_k": 1})
        # Checked after validation only: a run that ends before its first validation (a small max_steps) then stops
        # normally instead of failing at the epoch's end on the metric it has not logged yet.
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val_loss", "early_stopping.mode": "min",
                             "early_stopping.patience": 8, "early_stopping.check_on_train_epoch_end": False})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})
        parser.add_lightning_class_args(CheckpointOnException, "exception_checkpoint")

    def parse_arguments(self, parser, args) -> None:
        self.argv = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, type(None))) else None
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ArgumentError(None, with_nearest_keys(parser, err)) from None
        # Before LightningCLI reads hyperparameters from --ckpt_path and before anything is built or written.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if subcommand in ("validate", "test", "predict") and config.get("ckpt_path") == "best":
            config.ckpt_path = best_checkpoint_file(config)  # a new process has no fit's best_model_path
        check_run_inputs(config)
        path = checkpoint_to_read(config)
        if path is not None:
            follow_checkpoint(config, subcommand_defaults(parser, subcommand), path, resuming=subcommand == "fit")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        torch.set_float32_matmul_precision(config.matmul_precision)
        checkpoints = str(Path(config.trainer.default_root_dir or ".") / "checkpoints")
        for key in ("best_checkpoint", "last_checkpoint", "exception_checkpoint"):
            if config[key].dirpath is None:
                config[key].dirpath = checkpoints
        if config.get("weights_only", False) is None:
            config.weights_only = True  # resume/test/predict load tensors and plain values only: no code runs
        if config.trainer.fast_dev_run:  # Lightning 2.6 still writes last.ckpt at train end under fast_dev_run: a
            config.last_checkpoint.save_last = False  # smoke test must not become the newest "last" to resume from

    def instantiate_trainer(self, **kwargs):
        try:
            return without_unused_lr_monitor(super().instantiate_trainer(**kwargs))
        except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as err:  # no GPU
            raise ConfigError(f"cannot build the Trainer: {err}") from None

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path"):
            refuse_other_data(config.ckpt_path, self.datamodule)
        if self.subcommand == "predict":
            self.trainer.callbacks.append(PredictionCSV())

    def after_test(self) -> None:
        matrix = self.model.test_matrix
        if self.trainer.is_global_zero and matrix is not None:
            print(per_class_table(matrix, self.datamodule.classes))

    def after_fit(self) -> None:
        best, stopper = self.trainer.checkpoint_callback, self.trainer.early_stopping_callback
        if not self.trainer.is_global_zero:
            return
        reason = getattr(stopper, "stopping_reason_message", None) if self.trainer.should_stop else None
        if reason:  # patience, a threshold or a non-finite metric: Lightning's own words
            print(f"stopped early in epoch {stopper.stopped_epoch}: {reason}")
        if best is not None and best.best_model_score is not None:
            print(kept_checkpoint(self.trainer))
            if self.argv is not None:  # the same data and settings: the fit command line, test for fit
                print(f"next: {test_command(self.argv, best.best_model_path)}")


def refuse_other_data(ckpt_path: str, data: ClassificationData) -> None:
    """The classes and input shape the checkpoint was trained on must be this data's: a class folder added or
    removed, or another image_size, would otherwise label predictions wrongly without any error."""
    if not Path(ckpt_path).is_file():
        return  # Lightning names a missing file itself
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    if "test_path" not in ckpt.get("datamodule_hyper_parameters", {"test_path": None}):
        rank_zero_warn("this checkpoint was trained before the split became stratified: its validation and test rows"
                       " differ from today's split, so test scores may include rows it trained on")
    names = [str(c) for c in hp.get("class_names") or data.classes]  # older checkpoints: the shape only
    trained, given = (names, tuple(hp.get("input_shape", data.input_shape))), ([str(c) for c in data.classes],
                                                                              tuple(data.input_shape))
    if trained != given:
        def show(classes, shape):
            return f"classes {', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''} and input shape {shape}"

        raise ConfigError(f"the checkpoint was trained on {show(*trained)}; this data gives {show(*given)}: pass the"
                          " fit's data options (e.g. --config config.yaml, or the same --data.data_path,"
                          " --data.image_size, --data.grayscale)")


def per_class_table(matrix: torch.Tensor, classes: list) -> str:
    """Each class's test accuracy (its recall), its number of test examples and the class it is most often taken
    for: one overall number can hide a class the model never gets right."""
    counts = matrix.sum(1)
    recall = matrix.diag() / counts.clamp(min=1)
    lines = [f"per-class test accuracy (macro average {recall[counts > 0].mean().item():.4f}):"]
    width = max(len(str(c)) for c in classes)
    for i, name in enumerate(classes):
        errors = matrix[i].clone()
        errors[i] = 0
        worst = f"  most often taken for {classes[int(errors.argmax())]} ({int(errors.max())})" if errors.max() else ""
        accuracy = f"{recall[i].item():.4f}" if counts[i] else "-     "
        lines.append(f"  {str(name):<{width}}  {accuracy}  n={int(counts[i])}{worst}")
    return "\n".join(lines)


def test_command(argv: list, checkpoint: str) -> str:
    """`python SCRIPT` + the fit arguments with the first `fit` made `test` and --ckpt_path the given checkpoint."""
    args, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
        elif arg == "--ckpt_path":
            skip = True  # and its value
        else:
            args.append(arg)
    if "fit" in args:
        args[args.index("fit")] = "test"
    python = "python" if os.path.abspath(shutil.which("python") or "") == os.path.abspath(sys.executable) else (
        sys.executable)  # a bare python that is another interpreter may lack torch
    return shlex.join([python, sys.argv[0], *args, "--ckpt_path", checkpoint])


def main(args=None, run: bool = True, callbacks: tuple = ()):
    """Command line. run=False builds model, data and trainer without running a subcommand and returns the CLI;
    callbacks are always added (hpo_optuna.py passes its pruning callback this way)."""
    defaults = {"max_epochs": 40, "log_every_n_steps": 10, "default_root_dir": "runs/classifier"}
    defaults["callbacks"] = [ResumableRandomState(), ResumeAtUnfinishedBatch(), StopOnNonFiniteLoss(), ValidationHistory(),
                             *callbacks]
    try:
        return ClassifierCLI(
            Classifier,
            ClassificationData,
            seed_everything_default=42,
            auto_configure_optimizers=False,  # the model's configure_optimizers decides; --optimizer would be ignored
            trainer_defaults=defaults,
            save_config_kwargs={"overwrite": True},  # the saved config.yaml is rewritten when a run is resumed
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},  # errors end in one line, below
            args=args,
            run=run,
        )
    except SIGTERMException:  # Lightning raises it as a SystemExit without a code, which would exit 0 (success)
        sys.stderr.write(f"{Path(sys.argv[0]).name}: stopped by SIGTERM; --ckpt_path last continues from the newest"
                         " checkpoint\n")
        sys.exit(128 + signal.SIGTERM)
    except (ConfigError, ArgumentError, NonFiniteLossError) as err:
        message = " ".join(str(err).split())
        hint = "" if isinstance(err, NonFiniteLossError) else " (see --help)"
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}{hint}\n")  # one write: ranks' lines stay whole
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)
    except OSError as err:  # an image cut short (its header was read at start-up), maybe in a DataLoader worker
        if "cannot decode image" not in str(err):
            raise
        message = " ".join(str(err).split("OSError: ")[-1].split())  # without the worker's traceback
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")
        sys.exit(2)
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
