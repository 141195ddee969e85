"""Text classification with Hugging Face transformers: fine-tune a pretrained model (or train a tiny one) on a CSV/JSONL.

Out of the box, offline, it trains a tiny BERT from scratch with a word-level vocabulary built from the embedded
synthetic movie reviews (../assets/sentiment.csv.gz, positive/negative) on a CPU in under a minute. scaffold.py copies
it into your project with lightning_support.py (the run machinery: checkpoints, exact resume, NaN stop, one-line
errors) and configs/. For real work, name a model:

    python transformers_finetune.py fit                                          # tiny model, embedded reviews
    python transformers_finetune.py fit --model.name_or_path distilbert-base-uncased --data.data_path train.csv
    python transformers_finetune.py fit --model.name_or_path ./my_model --model.lora true   # LoRA (needs peft)
    python transformers_finetune.py fit --config configs/gpu.yaml ...           # bf16-mixed on one GPU
    python transformers_finetune.py fit --ckpt_path last ...                    # resume
    python transformers_finetune.py validate --ckpt_path best                   # the kept checkpoint, val split
    python transformers_finetune.py test --ckpt_path best --data.test_path held_out.jsonl   # a whole labelled file
    python transformers_finetune.py predict --ckpt_path best --data.predict_path new.jsonl  # -> predictions/best.csv
    python transformers_finetune.py export --out my_classifier   # best.ckpt as a Hugging Face folder (pipeline())
(test and predict take the fit's options too, e.g. --config config.yaml: the classes and vocabulary come from the
training file, and data whose classes differ from the checkpoint's is refused.)

Data: --data.data_path FILE (.csv, .csv.gz or .jsonl) with a text column and a label column
(--data.text_column, --data.label_column); labels may be strings or integers. The tokenizer follows the model
(--model.name_or_path); --data.tokenizer overrides it. trust_remote_code stays off unless you set
--model.trust_remote_code true for a model whose code you trust.
The kept model: best.ckpt has the lowest val_loss; fit's last lines name its epoch, step, val_acc and val_f1.
Your own head or loss: edit TextClassifier (EDIT HERE below).
"""

import csv
import gzip
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

import lightning as L
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

try:
    from lightning_support import (EXPORT_OPTIONS, ConfigError, TemplateCLI, adamw, add_lora, clip_gradients,
                                   log_train_loss, pretrained, run_cli, run_tool, save_hf_folder, transformers_config)
except ModuleNotFoundError as missing:  # copied without its support module: one line on how to get both
    sys.exit(f"{Path(sys.argv[0]).name}: error: lightning_support.py is missing next to this file: copy both"
             " with python scripts/scaffold.py transformers_finetune DEST" if missing.name == "lightning_support"
             else missing)

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "assets" / "sentiment.csv.gz"
TINY_BERT = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
             "max_position_embeddings": 512}


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
# EDIT HERE: the model. configure_model builds a Hugging Face sequence classifier (pretrained, or a tiny one from a
# config); forward returns logits [batch, num_labels]; training_step's loss and the metrics are yours to change.
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
        from transformers import AutoModelForSequenceClassification

        hp = self.hparams
        if hp.name_or_path:
            # A saved classifier head for another number of classes is replaced by a new one (transformers names it
            # in a warning); the body keeps its pretrained weights. dtype: float32 under -mixed precisions (trained
            # weights and optimizer state), the named one under -true, whatever dtype the checkpoint was saved in
            # (Lightning sets the default while configure_model runs).
            self.model = pretrained(AutoModelForSequenceClassification.from_pretrained, hp.name_or_path,
                                    num_labels=hp.num_labels, ignore_mismatched_sizes=True,
                                    dtype=torch.get_default_dtype(), trust_remote_code=hp.trust_remote_code)
        else:
            config = transformers_config(hp.model_type, TINY_BERT, hp.model_config, vocab_size=hp.vocab_size,
                                         num_labels=hp.num_labels)
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
        if hp.lora:  # only adapters (peft's default targets for the type) and the classifier head train
            self.model = add_lora(self.model, hp.lora_r, hp.lora_alpha, hp.lora_dropout, task_type="SEQ_CLS")
        self.model.train()  # from_pretrained returns eval mode (no dropout) and Lightning 2.6 keeps a module's mode

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self(batch), batch["labels"])
        log_train_loss(self, loss, len(batch["labels"]))  # no per-step device sync
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
        """The columns of predictions/<checkpoint>.csv: class name, its probability, the true class if known."""
        confidence, prediction = self(batch).softmax(dim=-1).max(dim=-1)
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_labels)]
        return {"prediction": [names[i] for i in prediction.tolist()], "confidence": confidence,
                "label": [names[i] if i >= 0 else "" for i in batch["labels"].tolist()]}

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.learning_rate or (5e-5 if hp.name_or_path else 1e-3)
        optimizer = adamw(self, lr, hp.weight_decay)  # no decay on norms and biases
        total = self.trainer.estimated_stepping_batches  # inf when neither max_steps nor max_epochs is set
        if math.isfinite(total):
            scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total), int(total))
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, 0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, gradient_clip_val, gradient_clip_algorithm)  # under every strategy and precision


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def split_words(text: str) -> list:
    return re.findall(r"\w+|[^\w\s]", text.lower())


MISSING = {"", "nan", "null", "none", "n/a", "na"}  # a label cell read as missing, in any letter case


def read_records(path: Path) -> list:
    """(line number, record) pairs; a JSONL line that is not a JSON object is refused with its number."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        return read_utf8_records(path, opener)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8 (CSV UTF-8 in Excel)"
                          ) from None
    except (csv.Error, OSError, EOFError) as err:  # a NUL byte, a folder, a gzip file cut short
        raise ConfigError(f"cannot read {path}: {err}: pass a .csv or .jsonl file") from None


def read_utf8_records(path: Path, opener) -> list:
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
        self.tokenizer = None
        self.vocab = {}
        if not tokenizer:  # ids 0 = padding, 1 = unknown word
            words = sorted({w for text in self.texts for w in split_words(text)})
            self.vocab = {w: i + 2 for i, w in enumerate(words)}
        else:
            from transformers import AutoTokenizer

            self.tokenizer = pretrained(AutoTokenizer.from_pretrained, tokenizer, what="tokenizer",
                                        trust_remote_code=trust_remote_code)

    def read(self, path: Path, require_label: bool) -> tuple:
        """(texts, labels or None for rows without one, line numbers) of a CSV/JSONL file."""
        text_column = self.hparams.text_column
        label_column = self.hparams.label_column
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
                value = record.get(column)
                if value is None or (column == label_column and str(value).strip().lower() in MISSING):
                    raise ConfigError(f"{path} line {number} has no {column!r} value: fill it in or delete the line")
                if isinstance(value, (list, dict)) or (column == label_column and isinstance(value, float)
                                                       and not value.is_integer()):
                    raise ConfigError(f"{path} line {number}: {column!r} is {str(value)[:40]}, not a"
                                      f" {'class name' if column == label_column else 'text'}: fix or delete the line")
        labels = [None if r.get(label_column) is None else str(r[label_column]).strip() for _, r in records]
        return [str(r[text_column]) for _, r in records], labels, [n for n, _ in records]

    def extra_file(self, name: str, require_label: bool) -> tuple:
        """(encoded rows, line numbers, texts) of test_path or predict_path; labels as the training file's class
        indices (-1: none)."""
        path = Path(self.hparams[f"{name}_path"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"{name} data not found: {path}: set --data.{name}_path to a .csv or .jsonl file")
        texts, labels, lines = self.read(path, require_label)
        unknown = sorted({v for v in labels if v is not None and v not in self.classes})
        if unknown and require_label:
            raise ConfigError(f"{path}: label(s) {', '.join(unknown[:5])} are not among the model's classes"
                              f" ({', '.join(self.classes[:8])})")
        targets = [self.classes.index(v) if v in self.classes else -1 for v in labels]
        return [(self.encode(t), y) for t, y in zip(texts, targets)], lines, texts

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
            self.test_set, _, _ = self.extra_file("test", require_label=True)
        if stage == "predict":
            self.predict_set, lines, texts = self.extra_file("predict", require_label=False)
            self.predict_sources = ("line", lines)  # the first columns of predictions/<checkpoint>.csv
            self.predict_columns = {"text": texts}

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


# ----------------------------------------------------------------------------------------------------------------
# Command line: TemplateCLI (lightning_support.py) adds the checkpoints, early stopping and checks every run gets
# ----------------------------------------------------------------------------------------------------------------
class FinetuneCLI(TemplateCLI):
    patience = 3  # early stopping: validations without a lower val_loss
    absolute_paths = (("model", "name_or_path"), ("data", "tokenizer"))  # stored in checkpoints
    then = ("predict --data.predict_path NEW.csv", "export --out hf_model")  # fit's next: lines after evaluate

    def add_template_arguments(self, parser):
        self.link(parser, "data.classes", "model.class_names")
        self.link(parser, "data.num_labels", "model.num_labels")
        self.link(parser, "data.vocab_size", "model.vocab_size")

    def check_config(self, subcommand, config) -> None:
        if subcommand in ("test", "predict") and not config.data.get(f"{subcommand}_path"):
            raise ConfigError(f"{subcommand} needs --data.{subcommand}_path FILE (the training file stays"
                              " --data.data_path: it defines the classes)")
        if not config.model.name_or_path:  # a misspelt model_config key, now rather than after the data is read
            transformers_config(config.model.model_type, TINY_BERT, config.model.model_config)


def export(checkpoint: str, folder: str, adapter: bool = False, dtype: Optional[str] = None) -> Path:
    """A Hugging Face folder of a single-file checkpoint for pipeline("text-classification", FOLDER,
    truncation=True): the model with its class names (id2label), LoRA merged in (or kept as a peft folder with
    adapter=True), and the tokenizer, whose model_max_length is the fit's max_length (truncation=True cuts there)."""
    data = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get(
        "datamodule_hyper_parameters", {})
    if not data.get("tokenizer"):
        raise ConfigError("this model was trained on a word-level vocabulary built from its data, which is not a"
                          " Hugging Face tokenizer: fine-tune a pretrained model (--model.name_or_path) to export")
    from transformers import AutoTokenizer

    module = TextClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    tokenizer = pretrained(AutoTokenizer.from_pretrained, data["tokenizer"], what="tokenizer",
                           trust_remote_code=data.get("trust_remote_code"))
    tokenizer.model_max_length = data.get("max_length", tokenizer.model_max_length)
    return save_hf_folder(module.model, tokenizer, folder, adapter, dtype)


TOOLS = {"export": (  # python transformers_finetune.py export --help
    "A Hugging Face folder of a trained checkpoint: model (class names, LoRA merged in) and tokenizer. Example:"
    " python transformers_finetune.py export --out my_classifier", EXPORT_OPTIONS,
    lambda ckpt, o: print(f"exported {ckpt} to {export(ckpt, o.out, o.adapter, o.dtype)}"))}


def main(args=None, run: bool = True, callbacks: tuple = ()):
    """The command line (see the docstring). run=False builds model, data and trainer and returns the CLI."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["export"]:  # beside LightningCLI's subcommands
        return run_tool(argv, TOOLS, "runs/transformers_finetune")
    return run_cli(FinetuneCLI, TextClassifier, TextClassificationData, args, run, callbacks,
                   trainer_defaults={"max_epochs": 10, "log_every_n_steps": 10, "gradient_clip_val": 1.0,
                                     "default_root_dir": "runs/transformers_finetune"})


if __name__ == "__main__":
    main()
