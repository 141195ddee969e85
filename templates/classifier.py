"""Classifier template: a feature table (CSV) or a folder of images by class -> a classifier, driven by LightningCLI.

Trains out of the box on the 8x8 handwritten digits shipped in ../assets (1,797 images; about 97% validation
accuracy in well under a minute on a laptop CPU). scaffold.py copies it into your project with lightning_support.py
(the run machinery: checkpoints, exact resume, NaN stop, one-line errors) and configs/.

Run it:
    python classifier.py fit                                     # train (CPU defaults, embedded digits)
    python classifier.py fit --config configs/gpu.yaml           # one GPU, bf16-mixed
    python classifier.py fit --config configs/ddp.yaml           # all GPUs of one machine, DDP
    python classifier.py fit --ckpt_path last                    # resume an interrupted run where it stopped
    python classifier.py test --ckpt_path best                   # the kept checkpoint on the test split, per class
    python classifier.py test --ckpt_path best --data.test_path held_out/   # a whole labelled set
    python classifier.py predict --ckpt_path best --data.predict_path new_images/   # -> predictions/best.csv
In a scaffolded project, pass --config config.yaml (your data settings) before any other config, e.g.
    python classifier.py fit --config config.yaml --config configs/gpu.yaml
    python classifier.py fit --print_config > my_config.yaml     # every setting, ready to edit and pass back

Your own data is a config value, not a code change:
    --data.data_path my_table.csv --data.label_column species    # CSV (or .csv.gz): numeric features + a label column
    --data.data_path my_images/                                  # folder of images, one subfolder per class
    --data.image_size 64 --data.grayscale false                  # image folders: resize and colour mode
Your own network: edit `build_network` (EDIT HERE below); the rest adapts to its output.

The kept model: best.ckpt has the lowest val_loss (accuracy on a small validation set ties, and a tie would keep an
early model); fit's last lines name its epoch, step and val_acc, and the `next:` command that tests it.
Inference without this script: Classifier.load_from_checkpoint(best, weights_only=True).eval() takes raw CSV rows (it
standardizes them itself); model.hparams.class_names names its outputs.
Outputs: <trainer.default_root_dir>/checkpoints (best.ckpt, last.ckpt), lightning_logs/version_N (TensorBoard; CSV
when tensorboard is not installed), predictions/<checkpoint>.csv.
"""

import csv
import gzip
import hashlib
import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning as L
from lightning.fabric.utilities.data import suggested_max_num_workers
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

try:
    from lightning_support import ConfigError, TemplateCLI, run_cli
except ModuleNotFoundError as missing:  # copied without its support module: one line on how to get both
    sys.exit(f"{Path(sys.argv[0]).name}: error: lightning_support.py is missing next to this file: copy both with"
             f" python scripts/scaffold.py classifier DEST" if missing.name == "lightning_support" else missing)

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "assets" / "digits.csv.gz"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
# EDIT HERE: your own network. It gets the input shape, (features,) or (channels, height, width), and the number of
# classes, and returns logits [batch, num_classes]; its options are Classifier's __init__ arguments.
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
        logits = self._evaluate(batch, "test", self.test_acc)
        self.test_confusion(logits, batch[1])

    def on_test_epoch_end(self):
        self.test_matrix = self.test_confusion.compute().cpu()  # rows: true class, columns: predicted; all ranks
        self.test_confusion.reset()

    def _evaluate(self, batch, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        metric(logits, y)  # torchmetrics syncs itself across processes
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", metric, prog_bar=True)
        return logits

    def predict_step(self, batch, batch_idx):
        """The columns of predictions/<checkpoint>.csv: class name, its probability, the true class if known."""
        x, y = batch
        confidence, prediction = self(x).softmax(dim=-1).max(dim=-1)
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        return {"prediction": [names[i] for i in prediction.tolist()], "confidence": confidence,
                "label": [names[i] if i >= 0 else "" for i in y.tolist()]}

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
        self.files = files
        self.labels = labels
        self.image_size = image_size
        self.mode = "L" if grayscale else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as img:
                img = img.convert(self.mode).resize((self.image_size, self.image_size))
                x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except OSError as err:  # a file cut short: its header read at start-up, its pixels do not
            raise ConfigError(f"cannot decode image {self.files[i]} ({err}): replace or delete it, then"
                              " rerun") from None
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
        subfolders or not); default: the test split. predictions/<checkpoint>.csv names each row's file or CSV row.
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
            files = []
            targets = []
            outside = []
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
            self.mean = train.mean(0)
            self.std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant column is left as it is
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
    keys = []
    seen = {}
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


# ----------------------------------------------------------------------------------------------------------------
# Command line: TemplateCLI (lightning_support.py) adds the checkpoints, early stopping and checks every run gets
# ----------------------------------------------------------------------------------------------------------------
class ClassifierCLI(TemplateCLI):
    patience = 8  # early stopping: validations without a lower val_loss
    evaluate = "test"  # fit's `next:` line tests the kept checkpoint on the test split

    def add_template_arguments(self, parser):
        self.link(parser, "data.classes", "model.class_names")
        self.link(parser, "data.input_shape", "model.input_shape")
        self.link(parser, "data.num_classes", "model.num_classes")
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})

    def after_test(self) -> None:
        matrix = self.model.test_matrix
        if self.trainer.is_global_zero and matrix is not None:
            print(per_class_table(matrix, self.datamodule.classes))


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



def main(args=None, run: bool = True, callbacks: tuple = ()):
    """The command line (see the docstring). run=False builds model, data and trainer and returns the CLI."""
    return run_cli(ClassifierCLI, Classifier, ClassificationData, args, run, callbacks,
                   trainer_defaults={"max_epochs": 40, "log_every_n_steps": 10, "default_root_dir": "runs/classifier"})


if __name__ == "__main__":
    main()
