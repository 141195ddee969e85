"""Tabular template: a CSV table with one target column -> a classifier or a regressor, driven by LightningCLI.

Trains out of the box on the 8x8 handwritten digits shipped in ../assets (64 pixel columns + label, 1,797 rows;
about 97% validation accuracy in well under a minute on a laptop CPU). scaffold.py copies it into your project with
lightning_support.py (the run machinery: checkpoints, exact resume, NaN stop, one-line errors) and configs/.

Run it:
    python tabular.py fit                                        # train (CPU defaults, embedded digits)
    python tabular.py fit --data.data_path houses.csv --data.label_column price      # your table; task from the data
    python tabular.py fit --data.folds 5                         # 5 models, metrics as mean +/- std over folds
    python tabular.py fit --ckpt_path last                       # resume an interrupted run (each fold its own)
    python tabular.py test --ckpt_path best                      # the kept model on the held-out test rows
    python tabular.py predict --ckpt_path best --data.predict_path new_rows.csv     # -> predictions/best.csv
    python tabular.py export --out my_model      # model.pt2 (torch.export, preprocessing inside) for torch alone
    python tabular.py fit --config configs/gpu.yaml              # one GPU, bf16-mixed
In a scaffolded project, pass --config config.yaml (your data settings) before any other config.

What it does with a table (UTF-8 CSV, cells split by commas, or by semicolons with decimal commas as Excel writes
in many locales, or by tabs):
- Task: a text or true/false target, or whole numbers with at most 50 distinct values (and at most 10, or at most
  5% of the rows), is classification; anything else is regression. fit says which and why; --model.task overrides.
- Features: numeric columns are imputed (training median) with a missing-indicator column and standardized; text
  columns are categories, one-hot up to --model.onehot_max values and learned embeddings above; a value seen fewer
  than twice outside the test rows, a new one at predict time and a missing one share an "unknown" code. ID-like columns, constant columns and copies of the target are
  dropped with a warning naming them. All of it lives in the checkpoint, which predicts from raw rows by itself.
- Regression targets are standardized with the training split's mean and std; metrics and predictions are in the
  target's units (val_mae, val_rmse, val_r2). Classification logs val_acc, val_f1 (macro) and val_auroc (macro);
  --model.class_weights balanced or --data.balanced_sampler true handle imbalanced classes.
- A baseline beside every result: fit and test print the same metrics for logistic regression / a least-squares line
  and for the majority class / the mean, fitted on the same training rows, so you see whether the network earns its
  place (logged as baseline_val_* and baseline_test_*).
- The kept model, best.ckpt, has the lowest val_loss. The held-out test rows are the same in every fold and run.
- With --data.folds K: fit trains one model per fold in fold_0 .. fold_K-1 and prints each metric as mean +/- std;
  --ckpt_path last resumes each fold from its own last.ckpt (a fold not begun starts); test scores every fold's
  kept model on the same test rows; predict averages them into predictions/folds-best.csv. hpo_optuna.py scores a
  trial on one split (fold 0 validates); train the chosen settings with folds afterwards.
Your own network: edit `build_network` (EDIT HERE below).
Outputs: <trainer.default_root_dir>/checkpoints (best.ckpt, last.ckpt), lightning_logs/version_N,
predictions/<checkpoint>.csv; with folds, fold_K/ holds each fold's run and predictions/ the folds' average.
"""

import csv
import gzip
import hashlib
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score
from torchmetrics.utilities import dim_zero_cat

try:
    from lightning_support import (EXPORT_OPTIONS, ConfigError, PredictionWriter, TemplateCLI, adamw,
                                   cosine_by_epoch, log_train_loss, newest_checkpoint, next_lines, run_cli, run_tool,
                                   save_program, without_ckpt_path)
except ModuleNotFoundError as missing:  # copied without its support module: one line on how to get both
    sys.exit(f"{Path(sys.argv[0]).name}: error: lightning_support.py is missing next to this file: copy both with"
             f" python scripts/scaffold.py tabular DEST" if missing.name == "lightning_support" else missing)

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "assets" / "digits.csv.gz"
MISSING = {"", "na", "n/a", "nan", "null", "none", "?"}  # read as a missing value, in any letter case
MAX_CLASSES = 50  # whole-number targets with more distinct values are regression
SMALL_VALIDATION = 300  # rows: below this, fit suggests --data.folds


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
# EDIT HERE: your own network. It gets the width of the encoded row (standardized numbers, missing indicators,
# one-hot and embedded categories) and the number of outputs (classes, or 1 for regression).
def build_network(in_features: int, outputs: int, hidden_dims: tuple, dropout: float) -> nn.Module:
    layers: list = []
    for width in hidden_dims:
        layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
        in_features = width
    layers.append(nn.Linear(in_features, outputs))
    return nn.Sequential(*layers)


class PresentClassesAUROC(MulticlassAUROC):
    """Macro AUROC over the classes present in the targets: torchmetrics scores an absent class 0 and averages it in
    (a class with one row, which stays in training, would pull every validation AUROC down)."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes, average=None)

    def compute(self) -> torch.Tensor:
        scores = super().compute()
        present = torch.bincount(dim_zero_cat(self.target).long(), minlength=self.num_classes) > 0
        return scores[present].mean()


class RowEncoder(nn.Module):
    """Raw rows -> the network's input: numbers imputed with the training median, a 0/1 column for each numeric
    column that had missing values, standardized; categories one-hot or embedded (code 0: missing or unseen)."""

    def __init__(self, features: dict, onehot_max: int):
        super().__init__()
        self.register_buffer("fill", torch.tensor(features["fill"], dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(features["mean"], dtype=torch.float32))
        self.register_buffer("std", torch.tensor(features["std"], dtype=torch.float32))
        indicators = [features["numeric"].index(name) for name in features["indicators"]]
        self.register_buffer("indicators", torch.tensor(indicators, dtype=torch.long))
        self.sizes = [len(vocab) + 1 for vocab in features["vocab"]]
        self.embeddings = nn.ModuleDict({str(j): nn.Embedding(size, min(16, math.ceil(1.6 * size ** 0.56)))
                                         for j, size in enumerate(self.sizes) if size > onehot_max + 1})
        self.width = len(features["numeric"]) + len(indicators) + sum(
            self.embeddings[str(j)].embedding_dim if str(j) in self.embeddings else size
            for j, size in enumerate(self.sizes))

    def forward(self, numeric: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        missing = numeric.isnan()
        x = (torch.where(missing, self.fill, numeric) - self.mean) / self.std
        parts = [x, missing[:, self.indicators].to(x.dtype)]
        for j, size in enumerate(self.sizes):
            column = codes[:, j]
            embedding = self.embeddings[str(j)] if str(j) in self.embeddings else None
            parts.append(embedding(column) if embedding is not None else F.one_hot(column, size).to(x.dtype))
        return torch.cat(parts, dim=1)


class TabularModel(L.LightningModule):
    def __init__(
        self,
        features: Optional[dict] = None,
        target: Optional[dict] = None,
        task: Optional[Literal["classification", "regression"]] = None,
        hidden_dims: tuple[int, ...] = (256, 128),
        dropout: float = 0.1,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        loss: Literal["mse", "huber"] = "mse",
        class_weights: Literal["none", "balanced"] = "none",
        onehot_max: int = 10,
    ):
        """features and target describe the table (columns, vocabularies, training statistics, classes or target
        units) and come from the data. task: classification or regression; default: decided from the target column.
        loss: regression's loss on the standardized target (huber: less pulled by outliers). class_weights:
        balanced weighs each class's loss by the inverse of its share of the training rows."""
        super().__init__()
        if not 0 <= dropout < 1 or lr <= 0 or onehot_max < 0:
            raise ConfigError(f"dropout ({dropout}) must be in [0, 1), lr ({lr}) above 0, onehot_max ({onehot_max})"
                              " at least 0")
        if features is None or target is None:
            raise ConfigError("features and target come from the data: build the model through the command line,"
                              " or with TabularModel.load_from_checkpoint")
        self.save_hyperparameters()  # load_from_checkpoint needs no arguments
        self.classification = target["task"] == "classification"
        outputs = len(target["classes"]) if self.classification else 1
        self.encoder = RowEncoder(features, onehot_max)
        self.net = build_network(self.encoder.width, outputs, tuple(hidden_dims), dropout)
        if self.classification:
            counts = torch.tensor(target["counts"], dtype=torch.float32).clamp(min=1)
            weights = counts.sum() / (len(counts) * counts) if class_weights == "balanced" else torch.ones_like(counts)
            self.register_buffer("class_weights", weights)
            metrics = MetricCollection({"acc": MulticlassAccuracy(outputs, average="micro"),
                                        "f1": MulticlassF1Score(outputs, average="macro"),
                                        "auroc": PresentClassesAUROC(outputs)})
        else:
            self.register_buffer("target_mean", torch.tensor(float(target["mean"])))
            self.register_buffer("target_std", torch.tensor(float(target["std"])))
            metrics = MetricCollection({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False),
                                        "r2": R2Score()})
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    def forward(self, numeric: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Class logits [batch, classes], or the standardized regression value [batch]."""
        out = self.net(self.encoder(numeric, codes))
        return out if self.classification else out.squeeze(1)

    def in_target_units(self, out: torch.Tensor) -> torch.Tensor:
        return out.float() * self.target_std + self.target_mean

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return F.cross_entropy(out.float(), y, weight=self.class_weights)
        z = (y - self.target_mean) / self.target_std
        return (F.huber_loss if self.hparams.loss == "huber" else F.mse_loss)(out.float(), z)

    def training_step(self, batch, batch_idx):
        numeric, codes, y = batch
        loss = self.loss(self(numeric, codes), y)
        log_train_loss(self, loss, len(y))  # no per-step device sync
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, stage: str) -> None:
        numeric, codes, y = batch
        out = self(numeric, codes)
        self.log(f"{stage}_loss", self.loss(out, y), prog_bar=True, sync_dist=True)
        metrics.update(out.float().softmax(-1) if self.classification else self.in_target_units(out), y)
        self.log_dict(metrics, prog_bar=True)  # torchmetrics sync themselves across processes

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_metrics, "test")

    def on_validation_epoch_end(self):
        self._log_baseline("val")

    def on_test_epoch_end(self):
        self._log_baseline("test")

    def _log_baseline(self, split: str) -> None:
        """The simple model's metrics on the same rows, logged next to the network's (summarize_run.py compares)."""
        data = self.trainer.datamodule
        if not self.trainer.sanity_checking and hasattr(data, "baselines"):
            _, (_, linear) = data.baselines(split)
            self.log_dict({f"baseline_{k}": v for k, v in linear.items()}, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        """The columns of predictions/<checkpoint>.csv."""
        numeric, codes, y = batch
        return self.describe(self(numeric, codes), y)

    def describe(self, out: torch.Tensor, y: torch.Tensor) -> dict:
        """Outputs as prediction columns: class, its probability and the true class if known; or the value in the
        target's units and the true value if known."""
        if self.classification:
            names = self.hparams.target["classes"]
            confidence, index = out.float().softmax(-1).max(-1)
            return {"prediction": [names[i] for i in index.tolist()], "confidence": confidence,
                    "label": [names[i] if i >= 0 else "" for i in y.tolist()]}
        return {"prediction": self.in_target_units(out),
                "label": ["" if math.isnan(v) else f"{v:.6g}" for v in y.tolist()]}

    def configure_optimizers(self):
        optimizer = adamw(self, self.hparams.lr, self.hparams.weight_decay)  # no decay on biases
        return cosine_by_epoch(self, optimizer)

    def in_table_terms(self, numeric: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Class probabilities, or the prediction in the target's units: what `export` saves."""
        out = self(numeric, codes)
        return out.float().softmax(-1) if self.classification else self.in_target_units(out)

    def encode_rows(self, rows: list) -> tuple:
        """Raw rows (dicts of column name -> text or number, as csv.DictReader gives) -> (numeric, codes) for
        forward: inference without this script, from the checkpoint alone."""
        spec = self.hparams.features
        numeric = torch.tensor([[number(str(row.get(name, ""))) for name in spec["numeric"]] for row in rows],
                               dtype=torch.float32).reshape(len(rows), len(spec["numeric"]))
        lookup = [{value: i + 1 for i, value in enumerate(vocab)} for vocab in spec["vocab"]]
        codes = torch.tensor([[lookup[j].get(str(row.get(name, "")).strip(), 0)
                               for j, name in enumerate(spec["categorical"])] for row in rows],
                             dtype=torch.long).reshape(len(rows), len(spec["categorical"]))
        return numeric.to(self.device), codes.to(self.device)


# ----------------------------------------------------------------------------------------------------------------
# Data: a CSV (or .csv.gz) table, one target column, numeric and text feature columns.
# ----------------------------------------------------------------------------------------------------------------
def number(text: str) -> float:
    """A cell as a number; NaN for a missing or non-finite value."""
    if text.strip().lower() in MISSING:
        return math.nan
    value = float(text)
    return value if math.isfinite(value) else math.nan


def is_number(text: str) -> bool:
    try:
        number(text)
        return True
    except ValueError:
        return False


def read_table(path: Path) -> tuple:
    """(header, rows of text cells). Line numbers in messages count the header as line 1, as editors do."""
    if not path.name.endswith((".csv", ".csv.gz")):
        raise ConfigError(f"{path}: unsupported data file: use a .csv or .csv.gz table")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:  # -sig: Excel's byte-order mark
            first = f.readline()
            f.seek(0)
            # Excel in many locales writes ';' between cells and a decimal comma; tab-separated files too
            delimiter = next((d for d in ",;\t" if d in first), ",")
            rows = [row for row in csv.reader(f, delimiter=delimiter) if row]
    except (UnicodeDecodeError, OSError, csv.Error) as err:
        raise ConfigError(f"{path} is not a readable UTF-8 CSV ({err}): save it as CSV UTF-8") from None
    if delimiter == ";":
        rows = [[c.replace(",", ".", 1) if c.count(",") == 1 and is_number(c.replace(",", ".")) else c for c in row]
                for row in rows]
    if len(rows) < 2:
        raise ConfigError(f"{path} has no data rows: a CSV needs a header row and at least one data row")
    header, rows = [name.strip() for name in rows[0]], rows[1:]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ConfigError(f"{path}: column name(s) {', '.join(map(repr, repeated))} appear more than once: give every"
                          " column its own name")
    ragged = next((i for i, row in enumerate(rows) if len(row) != len(header)), None)
    if ragged is not None:
        raise ConfigError(f"{path} line {ragged + 2} has {len(rows[ragged])} cells, the header {len(header)}: every"
                          " row needs one cell per column (quote cells that contain commas)")
    return header, rows


def decide_task(values: list, label: str, override: Optional[str]) -> tuple:
    """(task, why): the rule in the module docstring, in one line fit prints."""
    numbers = [float(v) for v in values if is_number(v)] if all(is_number(v) for v in values) else None
    distinct = len(set(values if numbers is None else numbers))
    if override:
        return override, f"--model.task {override}"
    if numbers is None:
        return "classification", f"{label!r} holds text ({distinct} distinct values)"
    whole = all(v.is_integer() for v in numbers)
    limit = max(10, int(0.05 * len(numbers)))
    if whole and distinct <= min(MAX_CLASSES, limit):
        return "classification", (f"{label!r} holds {distinct} distinct whole numbers in {len(numbers)} rows (at"
                                  f" most {MAX_CLASSES}, and at most 10 or 5% of the rows)")
    kind = "whole numbers" if whole else "numbers with fractions"
    return "regression", f"{label!r} holds {distinct} distinct {kind} in {len(numbers)} rows"


def sorted_classes(values) -> list:
    unique = set(values)
    try:
        return sorted(unique, key=float)  # numerically when every class is a number
    except ValueError:
        return sorted(unique)


def assign_splits(keys: list, strata: list, val_fraction: float, test_fraction: float, folds: int,
                  seed: int) -> list:
    """Each row's split: "test", "val" or "train" (folds=1), or "test" or its fold number 0..folds-1. Rows are put in
    one order that interleaves the strata (class, or target decile for regression) by each row's place in its own
    stratum, ties broken by a hash of (seed, row content); the test rows are the first round(N * test_fraction) of
    that order, then the validation rows (at least one each when the fraction is above 0), then the rest, dealt out
    to the folds in turn. So every split gets its share of every class, the test rows never change with the fold,
    and adding rows moves only a few others."""
    by_stratum: dict = {}
    for i, (key, stratum) in enumerate(zip(keys, strata)):
        digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
        by_stratum.setdefault(stratum, []).append((digest, i))
    order = []
    for members in by_stratum.values():
        ranked = sorted(members)
        order += [((rank + 0.5) / len(ranked), digest, i) for rank, (digest, i) in enumerate(ranked)]
    order = [i for _, _, i in sorted(order)]
    n = len(order)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n >= 3 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 and n >= 3 and folds == 1 else 0
    splits: list = [None] * n
    for position, i in enumerate(order):
        if position < n_test:
            splits[i] = "test"
        elif folds > 1:
            splits[i] = (position - n_test) % folds
        else:
            splits[i] = "val" if position < n_test + n_val else "train"
    return splits


class TableData(L.LightningDataModule):
    def __init__(
        self,
        data_path: Optional[str] = None,
        label_column: str = "label",
        task: Optional[Literal["classification", "regression"]] = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        folds: int = 1,
        fold: Optional[int] = None,
        batch_size: int = 64,
        balanced_sampler: bool = False,
        split_seed: int = 1234,
        test_path: Optional[str] = None,
        predict_path: Optional[str] = None,
    ):
        """data_path: CSV or CSV.GZ (default: the embedded digits). task: set from --model.task. folds: K > 1 keeps
        the test rows aside and splits the rest into K folds; fit then trains K models, one per validation fold
        (fold: which one; set by fit for each). balanced_sampler: draw training rows with equal weight per class.
        split_seed fixes the splits across runs. test_path: a labelled table `test` scores in full; predict_path: a
        table (target column optional) `predict` labels; default for both: the held-out test rows."""
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ConfigError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
        if batch_size < 1 or folds < 1 or (fold is not None and not 0 <= fold < folds):
            raise ConfigError(f"batch_size ({batch_size}) and folds ({folds}) must be at least 1, and fold ({fold})"
                              f" one of 0..{folds - 1}")
        self.path = Path(data_path).expanduser() if data_path else DEFAULT_DATA
        if not self.path.exists():
            raise ConfigError(f"data not found: {self.path}: set --data.data_path to a CSV file")
        header, rows = read_table(self.path)
        if label_column not in header:
            raise ConfigError(f"{self.path} has no column {label_column!r} (columns: {', '.join(header[:8])}"
                              f"{', ...' if len(header) > 8 else ''}): set --data.label_column to the target column")
        label = header.index(label_column)
        kept = [i for i, row in enumerate(rows) if row[label].strip().lower() not in MISSING]
        if len(kept) < len(rows):
            first = next(i for i, row in enumerate(rows) if row[label].strip().lower() in MISSING)
            rank_zero_warn(f"{len(rows) - len(kept)} row(s) have no {label_column!r} value (first: line {first + 2}):"
                           " left out of training")
        rows = [rows[i] for i in kept]
        values = [row[label].strip() for row in rows]
        self.task, self.task_reason = decide_task(values, label_column, task)
        if self.task == "regression":
            bad = next((i for i, v in enumerate(values) if not is_number(v) or math.isnan(number(v))), None)
            if bad is not None:
                raise ConfigError(f"{self.path}: {label_column!r} value {values[bad]!r} (line {kept[bad] + 2}) is not"
                                  " a finite number: a regression target must be numeric")
            targets = torch.tensor([number(v) for v in values], dtype=torch.float64)
            if targets.std() == 0 or len(set(values)) < 2:
                raise ConfigError(f"{self.path}: {label_column!r} has one value: nothing to predict")
            deciles = torch.bucketize(targets, targets.quantile(torch.linspace(0.1, 0.9, 9, dtype=torch.float64)))
            strata = deciles.tolist()
            self.targets = targets.float()
        else:
            self.classes = sorted_classes(values)
            if len(self.classes) < 2:
                raise ConfigError(f"{self.path}: {label_column!r} holds one class ({self.classes[0]!r}): a classifier"
                                  " needs at least 2")
            strata = [self.classes.index(v) for v in values]
            self.targets = torch.tensor(strata)
        columns = self._choose_columns(header, rows, label)
        keys = [f"{hashlib.blake2b(repr(row).encode(), digest_size=8).hexdigest()}/{n}"
                for n, row in enumerate(rows)]  # content + position: duplicate rows stay distinct
        self.splits = assign_splits(keys, strata, val_fraction, test_fraction, folds, split_seed)
        if folds > 1:  # fold `fold` validates, the others train; without --data.fold (the whole run): fold 0
            k = fold or 0
            self.splits = [s if s == "test" else ("val" if s == k else "train") for s in self.splits]
        train = [i for i, s in enumerate(self.splits) if s == "train"]
        not_test = [i for i, s in enumerate(self.splits) if s != "test"]
        if not train or "val" not in self.splits:
            raise ConfigError(f"{self.path}: {len(rows)} rows leave no {'validation' if train else 'training'} rows"
                              " (the kept model and early stopping are chosen on validation rows): add rows, or set"
                              " --data.val_fraction above 0")
        self.features = self._describe(columns, rows, train, not_test)
        self.numeric, self.codes = self.encode(rows, header)
        self.rows_of = {name: [i for i, s in enumerate(self.splits) if s == name] for name in ("train", "val", "test")}
        self.line_of = [i + 2 for i in kept]  # a row's line in the file, for predictions.csv
        self._baselines: dict = {}

    def _choose_columns(self, header: list, rows: list, label: int) -> dict:
        """Feature columns by kind, without those that cannot help: an ID (a different value in every row), a
        constant, a copy of the target. Each dropped column is named in a warning."""
        numeric, categorical, dropped = [], [], []
        target = [row[label].strip() for row in rows]
        for j, name in enumerate(header):
            if j == label:
                continue
            cells = [row[j].strip() for row in rows]
            present = [c for c in cells if c.lower() not in MISSING]
            is_numeric = all(is_number(c) for c in present)
            distinct = set(present)
            if not present:
                dropped.append(f"{name!r} (no values)")
            elif cells == target:
                dropped.append(f"{name!r} (a copy of the target)")
            elif len(distinct) <= 1 and len(present) == len(cells):
                dropped.append(f"{name!r} (one value in every row)")
            elif len(rows) >= 20 and len(distinct) == len(rows) and (not is_numeric or self._is_counter(present)
                                                                     or name.lower().replace(" ", "_") == "id"
                                                                     or name.lower().endswith(("_id", " id"))):
                dropped.append(f"{name!r} (a different value in every row: an ID)")
            else:
                (numeric if is_numeric else categorical).append(j)
        if dropped:
            rank_zero_warn(f"feature column(s) dropped: {', '.join(dropped)}")
        if not numeric and not categorical:
            raise ConfigError(f"{self.path}: no usable feature columns besides {header[label]!r}")
        return {"numeric": numeric, "categorical": categorical, "names": header}

    @staticmethod
    def _is_counter(cells: list) -> bool:
        """Whole numbers that run through a range without gaps (row numbers, 1..N in any order)."""
        values = [float(c) for c in cells]
        return all(v.is_integer() for v in values) and max(values) - min(values) + 1 == len(values)

    def _describe(self, columns: dict, rows: list, train: list, not_test: list) -> dict:
        """What the model needs to encode raw rows: numeric statistics from the training rows; the categories seen at
        least twice outside the test rows (one vocabulary for every fold)."""
        names = columns["names"]
        spec = {"numeric": [names[j] for j in columns["numeric"]], "fill": [], "mean": [], "std": [],
                "indicators": [], "categorical": [names[j] for j in columns["categorical"]], "vocab": []}
        for j in columns["numeric"]:
            values = [number(rows[i][j]) for i in train]
            present = [v for v in values if not math.isnan(v)]
            fill = statistics.median(present) if present else 0.0
            filled = [fill if math.isnan(v) else v for v in values]
            std = statistics.pstdev(filled) if len(filled) > 1 else 0.0
            spec["fill"].append(fill)
            spec["mean"].append(statistics.fmean(filled))
            spec["std"].append(std if std > 1e-6 else 1.0)  # constant over the training rows: left as it is
            if len(present) < len(values):
                spec["indicators"].append(names[j])
        for j in columns["categorical"]:
            counts: dict = {}
            for i in not_test:
                cell = rows[i][j].strip()
                if cell.lower() not in MISSING:
                    counts[cell] = counts.get(cell, 0) + 1
            # seen once: the unknown code, which then learns from such rows what an unseen value should mean
            spec["vocab"].append(sorted((v for v in counts if counts[v] >= 2), key=lambda v: (-counts[v], v)))
        return spec

    def encode(self, rows: list, header: list) -> tuple:
        """(numeric [N, n_numeric] with NaN where missing, codes [N, n_categorical]: 0 missing or unseen)."""
        spec = self.features
        where = {name: header.index(name) for name in spec["numeric"] + spec["categorical"]}
        numeric = torch.tensor([[number(row[where[name]]) if is_number(row[where[name]]) else math.nan
                                 for name in spec["numeric"]] for row in rows], dtype=torch.float32)
        lookup = [{value: i + 1 for i, value in enumerate(vocab)} for vocab in spec["vocab"]]
        codes = torch.tensor([[lookup[j].get(row[where[name]].strip(), 0) for j, name in
                               enumerate(spec["categorical"])] for row in rows], dtype=torch.long)
        return numeric.reshape(len(rows), len(spec["numeric"])), codes.reshape(len(rows), len(spec["categorical"]))

    @property
    def target(self) -> dict:
        """The target's description, linked to the model: classes and their training counts, or the training
        mean and std that the model standardizes with."""
        train = self.targets[self.rows_of["train"]]
        if self.task == "classification":
            counts = torch.bincount(train, minlength=len(self.classes)).tolist()
            return {"task": "classification", "name": self.hparams.label_column, "classes": self.classes,
                    "counts": counts}
        std = float(train.std()) if len(train) > 1 else 1.0
        return {"task": "regression", "name": self.hparams.label_column, "mean": float(train.mean()),
                "std": std if std > 0 else 1.0}

    def other_table(self, path: Path, need_target: bool) -> tuple:
        """(numeric, codes, targets, lines) of a test or predict table, its columns matched to training's by name
        (any order). A category training never saw is counted and encoded as unknown, not an error."""
        header, rows = read_table(path)
        spec = self.features
        missing = [n for n in spec["numeric"] + spec["categorical"] if n not in header]
        if missing:
            raise ConfigError(f"{path} lacks the feature column(s) {', '.join(missing[:5])} that the model was"
                              " trained on: predict data needs the training table's columns (any order)")
        label = self.hparams.label_column
        if need_target and label not in header:
            raise ConfigError(f"{path} has no target column {label!r}: test data needs it (predict data does not)")
        kept = range(len(rows))
        if need_target:  # rows without a target cannot be scored
            kept = [i for i, row in enumerate(rows) if row[header.index(label)].strip().lower() not in MISSING]
            if len(kept) < len(rows):
                rank_zero_warn(f"{path}: {len(rows) - len(kept)} row(s) have no {label!r} value: left out of the test")
            if not kept:
                raise ConfigError(f"{path}: no row has a {label!r} value to test against")
            rows = [rows[i] for i in kept]
        numeric, codes = self.encode(rows, header)
        unseen = sum(row[header.index(n)].strip() not in set(vocab) and row[header.index(n)].strip().lower()
                     not in MISSING for row in rows for n, vocab in zip(spec["categorical"], spec["vocab"]))
        if unseen:
            rank_zero_info(f"{path}: {unseen} categorical value(s) not in the model's vocabulary, encoded as unknown")
        cells = [row[header.index(label)].strip() if label in header else "" for row in rows]
        if self.task == "classification":
            unknown = sorted({c for c in cells if c.lower() not in MISSING and c not in self.classes})
            if unknown and need_target:
                raise ConfigError(f"{path}: target value(s) {', '.join(unknown[:5])} are not among the model's classes")
            targets = torch.tensor([self.classes.index(c) if c in self.classes else -1 for c in cells])
        else:
            bad = next((c for c in cells if need_target and not (is_number(c) and math.isfinite(number(c)))), None)
            if bad is not None:
                raise ConfigError(f"{path}: {label!r} value {bad!r} is not a finite number")
            targets = torch.tensor([number(c) if is_number(c) else math.nan for c in cells], dtype=torch.float32)
        return numeric, codes, targets, [i + 2 for i in kept]

    def setup(self, stage: str) -> None:
        self.datasets = {name: self._dataset(idx) for name, idx in self.rows_of.items()}
        self.predict_sources = ("line", [self.line_of[i] for i in self.rows_of["test"]])
        for name, path in (("test", self.hparams.test_path), ("predict", self.hparams.predict_path)):
            if path and stage == name:
                path = Path(path).expanduser()
                if not path.exists():
                    raise ConfigError(f"{name} data not found: {path}: set --data.{name}_path")
                numeric, codes, targets, lines = self.other_table(path, need_target=name == "test")
                self.datasets[name] = TensorDataset(numeric, codes, targets)
                self.predict_sources = ("line", lines)
        self.datasets.setdefault("predict", self.datasets["test"])
        if stage in ("test", "predict") and not len(self.datasets[stage]):
            raise ConfigError(f"no held-out test rows (test_fraction {self.hparams.test_fraction}): pass"
                              f" --data.{stage}_path FILE")
        if stage == "fit" and 0 < len(self.rows_of["val"]) < SMALL_VALIDATION and self.hparams.folds == 1:
            rank_zero_info(f"the validation split has {len(self.rows_of['val'])} rows: its metrics move by several"
                           " points from one split to another; --data.folds 5 reports mean +/- std over 5 models")

    def _dataset(self, idx: list) -> TensorDataset:
        return TensorDataset(self.numeric[idx], self.codes[idx], self.targets[idx])

    def _loader(self, name: str, sampler=None, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.datasets[name], batch_size=self.hparams.batch_size, shuffle=shuffle, sampler=sampler,
                          pin_memory=torch.cuda.is_available())  # in memory: no worker processes needed

    def train_dataloader(self):
        if self.hparams.balanced_sampler and self.task == "classification":
            labels = self.datasets["train"].tensors[2]
            weights = 1.0 / torch.bincount(labels).float()[labels]
            return self._loader("train", sampler=WeightedRandomSampler(weights, len(labels)))
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")

    # ---- the baseline: the same metrics for a simple model fitted on the same training rows ----
    def baselines(self, split: str) -> tuple:
        """((name, metrics), (name, metrics)) on a split: the constant guess (majority class or mean) and the
        linear model (logistic regression or least squares), with the network's metric names."""
        if split not in self._baselines:
            dataset = self.datasets[split] if hasattr(self, "datasets") else self._dataset(self.rows_of[split])
            numeric, codes, y = dataset.tensors
            train_x, test_x = self._design(*self._dataset(self.rows_of["train"]).tensors[:2]), self._design(numeric,
                                                                                                          codes)
            train_y = self.targets[self.rows_of["train"]]
            if self.task == "classification":
                k = len(self.classes)
                majority = F.one_hot(torch.bincount(train_y, minlength=k).argmax(), k).float().expand(len(y), k)
                simple = ("majority class", majority)
                linear = ("logistic regression", logistic_regression(train_x, train_y, k)(test_x).softmax(-1))
            else:
                simple = ("mean", train_y.mean().expand(len(y)))
                linear = ("least squares", least_squares(train_x, train_y)(test_x))
            self._baselines[split] = tuple((name, scores(pred, y, self.task, split)) for name, pred in (simple, linear))
        return self._baselines[split]

    def _design(self, numeric: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The rows as a linear model sees them: the network's input, every category of up to 50 values one-hot
        and the columns with more left out."""
        few = [j for j, vocab in enumerate(self.features["vocab"]) if len(vocab) <= 50]
        spec = {**self.features, "categorical": [self.features["categorical"][j] for j in few],
                "vocab": [self.features["vocab"][j] for j in few]}
        with torch.no_grad():
            return RowEncoder(spec, onehot_max=50)(numeric, codes[:, few])


def logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int):
    """A multinomial logistic regression (a little L2), fitted with L-BFGS; returns its logits function."""
    with torch.inference_mode(False), torch.enable_grad():  # also when called from a test or validation loop
        x, y = x.clone(), y.clone()
        with torch.random.fork_rng(devices=[]):  # leaves the run's random numbers (data order, dropout) as they were
            linear = nn.Linear(x.shape[1], classes)
        optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(linear(x), y) + 1e-4 * linear.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return lambda rows: linear(rows.clone()).detach()


def least_squares(x: torch.Tensor, y: torch.Tensor):
    """A least-squares line (a little ridge) with an intercept; returns its prediction function."""
    ones = torch.ones(len(x), 1)
    a = torch.cat([x, ones], 1).double()
    weights = torch.linalg.solve(a.T @ a + 1e-6 * torch.eye(a.shape[1], dtype=torch.float64), a.T @ y.double())
    return lambda rows: (torch.cat([rows, torch.ones(len(rows), 1)], 1).double() @ weights).float()


def scores(pred: torch.Tensor, y: torch.Tensor, task: str, split: str) -> dict:
    """The network's metrics (names and definitions) for other predictions."""
    if task == "classification":
        k = pred.shape[1]
        metrics = {"acc": MulticlassAccuracy(k, average="micro"), "f1": MulticlassF1Score(k, average="macro"),
                   "auroc": PresentClassesAUROC(k)}
    else:
        metrics = {"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False), "r2": R2Score()}
    return {f"{split}_{name}": float(metric(pred, y)) for name, metric in metrics.items()}


# ----------------------------------------------------------------------------------------------------------------
# Command line: TemplateCLI (lightning_support.py) adds the checkpoints, early stopping and checks every run gets;
# this adds the task line, the baselines and the folds.
# ----------------------------------------------------------------------------------------------------------------
class TabularCLI(TemplateCLI):
    patience = 10  # early stopping: validations without a lower val_loss
    evaluate = "test"  # fit's `next:` line tests the kept checkpoint on the held-out test rows
    then = ("predict", "export --out exported_model")

    def add_template_arguments(self, parser):
        self.link(parser, "data.features", "model.features")
        self.link(parser, "data.target", "model.target")
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})

    def prepare_config(self, subcommand, config) -> None:
        self.fold_ckpt = None
        if config.data.folds > 1 and config.data.fold is None and subcommand in ("fit", "test", "predict"):
            self.fold_ckpt, config.ckpt_path = config.get("ckpt_path"), None  # each fold finds its own

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        # the data decides the task, unless the model option (or the checkpoint the run continues) names it
        config.data.task = config.model.task or config.data.task

    def before_fit(self):
        if self.trainer.is_global_zero and self.datamodule.hparams.fold is None:
            print(f"task: {self.datamodule.task} ({self.datamodule.task_reason})")

    def _run_subcommand(self, subcommand: str) -> None:
        if self.datamodule.hparams.folds > 1 and self.datamodule.hparams.fold is None:
            if self.trainer.num_devices * self.trainer.num_nodes > 1:  # devices "auto" counted too
                raise ConfigError("--data.folds trains its models one after another in one process: pass"
                                  " --trainer.devices 1 (a table this size trains in seconds on one device)")
            return run_folds(self, subcommand)
        super()._run_subcommand(subcommand)

    inside_folds = False  # run_folds prints one `next:` line for all the folds

    def after_fit(self) -> None:
        if self.inside_folds:
            self.argv = None
        super().after_fit()
        if self.trainer.is_global_zero and self.trainer.checkpoint_callback.best_model_score is not None:
            print(baseline_line(self.datamodule, "val"))

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            if self.datamodule.task == "classification":
                print(f"per-class test accuracy: {per_class(self.model, self.trainer, self.datamodule)}")
            print(baseline_line(self.datamodule, "test"))


def baseline_line(data: TableData, split: str) -> str:
    parts = [f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
             for name, metrics in data.baselines(split)]
    return f"baselines on the same {split} rows: " + " | ".join(parts)


def per_class(model: TabularModel, trainer, data: TableData) -> str:
    """Each class's test accuracy (recall) and row count: one overall number can hide a class never got right."""
    numeric, codes, y = data.datasets["test"].tensors
    with torch.no_grad():
        predicted = model.eval()(numeric.to(model.device), codes.to(model.device)).argmax(-1).cpu()
    parts = []
    for i, name in enumerate(data.classes):
        n = int((y == i).sum())
        parts.append(f"{name} {float((predicted[y == i] == i).float().mean()):.3f} (n={n})" if n else f"{name} - ")
    return ", ".join(parts)


class FoldEnsemble(L.LightningModule):
    """The folds' models as one: predictions average their class probabilities or values."""

    def __init__(self, models: list):
        super().__init__()
        self.models = nn.ModuleList(models)

    def predict_step(self, batch, batch_idx):
        numeric, codes, y = batch
        first = self.models[0]
        if first.classification:
            mean = torch.stack([m(numeric, codes).float().softmax(-1) for m in self.models]).mean(0)
            return first.describe(mean.log(), y)  # log-probabilities: describe's softmax gives them back
        values = torch.stack([m.in_target_units(m(numeric, codes)) for m in self.models]).mean(0)
        return first.describe((values - first.target_mean) / first.target_std, y)


def run_folds(cli: TabularCLI, subcommand: str) -> None:
    """fit and test: the command once per fold (fold K in <default_root_dir>/fold_K, resumable on its own), then
    each metric as mean +/- std over the folds. predict: the folds' kept models averaged, in one file."""
    data, root = cli.datamodule, Path(cli.trainer.default_root_dir)
    folds = range(data.hparams.folds)
    checkpoint = cli.fold_ckpt or ("best" if subcommand != "fit" else None)
    if subcommand == "predict":
        files = [newest_checkpoint(root / f"fold_{k}" / "checkpoints", checkpoint) for k in folds]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ConfigError(f"fold checkpoint(s) not found: {', '.join(absent[:3])}: run fit with the same --data"
                              " options first")
        models = [TabularModel.load_from_checkpoint(f, map_location="cpu", weights_only=True) for f in files]
        writer = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))
        writer.name = f"folds-{checkpoint}"
        cli.trainer.predict(FoldEnsemble(models), datamodule=data, return_predictions=False)
        return
    argv = without_ckpt_path(cli.argv)
    if subcommand == "fit":
        print(f"task: {data.task} ({data.task_reason}); {len(folds)} folds, the test rows kept aside")
    results = []
    warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")  # each fold gets its own args
    TabularCLI.inside_folds = True
    for k in folds:
        fold_root = root / f"fold_{k}"
        args = [*argv, "--data.fold", str(k), "--trainer.default_root_dir", str(fold_root)]
        if checkpoint == "last" and (fold_root / "checkpoints" / "last.ckpt").is_file() or checkpoint not in (
                None, "last"):
            args += ["--ckpt_path", checkpoint]
        print(f"---- fold {k + 1} of {len(folds)} ----")
        run = main(args)
        if subcommand == "fit":
            best = run.trainer.checkpoint_callback
            step = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["global_step"]
            history = next(c.by_step for c in run.trainer.callbacks if hasattr(c, "by_step"))
            results.append({**history.get(step, {}), **{f"baseline_{k}": v for k, v in
                                                       run.datamodule.baselines("val")[1][1].items()}})
        else:
            results.append({k: float(v) for k, v in run.trainer.callback_metrics.items() if v.numel() == 1})
    TabularCLI.inside_folds = False
    print(f"---- {len(folds)} folds ({subcommand}) ----")
    for key in sorted(results[0], key=lambda k: (k.startswith("baseline_"), k)):
        values = [r[key] for r in results if key in r]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: {statistics.fmean(values):.4f} +/- {spread:.4f}  ({', '.join(f'{v:.4f}' for v in values)})")
    if subcommand == "fit":
        print("\n".join(next_lines(argv, "test", ("predict",), "best")))  # export takes one model, not K


def export(checkpoint: str, out: str) -> Path:
    """A standalone program of the checkpoint (save_program): numeric columns (NaN: missing) and category codes in,
    probabilities or values in the target's units out; imputation, standardization and encodings inside, the column
    names, vocabularies and classes in about.json."""
    model = TabularModel.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    spec, target = model.hparams.features, model.hparams.target
    about = {"inputs": {"numeric": spec["numeric"], "codes": {name: ["(missing or unseen)", *vocab] for name, vocab
                                                             in zip(spec["categorical"], spec["vocab"])}},
             "outputs": {"task": target["task"], "classes": target.get("classes"), "target": target.get("name")},
             "usage": "model(numeric float32 [rows, columns], NaN: missing; codes int64 [rows, columns], each the"
                      " index in its list) -> class probabilities [rows, classes] or the target's value [rows]"}
    return save_program(model, "in_table_terms", model.encode_rows([{}, {}]), out, about)


TOOLS = {"export": ("A standalone torch.export program of a trained checkpoint, its preprocessing inside (runs with"
                    " torch alone). Example: python tabular.py export --out exported_model",
                    EXPORT_OPTIONS[:1], lambda ckpt, o: print(f"exported {ckpt} to {export(ckpt, o.out)}"))}


def main(args=None, run: bool = True, callbacks: tuple = ()):
    """The command line (see the docstring). run=False builds model, data and trainer and returns the CLI."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["export"]:  # beside LightningCLI's subcommands
        return run_tool(argv, TOOLS, "runs/tabular")
    return run_cli(TabularCLI, TabularModel, TableData, args, run, callbacks,
                   trainer_defaults={"max_epochs": 40, "log_every_n_steps": 10, "default_root_dir": "runs/tabular"})


if __name__ == "__main__":
    main()
