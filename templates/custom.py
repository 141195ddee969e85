"""Your own model: a network, a loss, an optimizer and data of your own, run by Lightning with LightningCLI.

The smallest template: four places marked EDIT HERE hold everything that is yours; lightning_support.py, copied
beside it by scaffold.py, holds the run machinery (best/last checkpoints, resume exact from an epoch's end, NaN
stop, one-line errors), and configs/ the hardware (CPU, one GPU, DDP, FSDP). As shipped it trains a small CNN on the
8x8 handwritten digits in ../assets (about 99% validation accuracy in 10 seconds on a laptop CPU). Converting a plain
PyTorch loop, and proving per step that it trains the same: references/migration.md.

Run it:
    python custom.py fit                                  # train (embedded digits)
    python custom.py fit --data.fake_size 512             # random stand-in data: runs before your data exists
    python custom.py fit --ckpt_path last                 # resume an interrupted run where it stopped
    python custom.py test --ckpt_path best                # the kept model (lowest val_loss) on the test split
    python custom.py predict --ckpt_path best             # -> runs/custom/predictions/best.csv
    python custom.py export --out my_model                # model.pt2 (torch.export of forward), for torch alone
    python custom.py fit --config configs/gpu.yaml        # one GPU (bf16-mixed; add --trainer.precision 32-true
                                                          # to reproduce a float32 loop's numbers)
    python custom.py fit --seed_everything 1 --record_steps steps.csv    # every step's loss and lr, for
                                                          # scripts/compare_runs.py against your loop's
In a scaffolded project, pass --config config.yaml (your settings) before any other config. An option you add to
Model.__init__ or Data.__init__ becomes a command-line option and a config key (--model.NAME, --data.NAME).
Outputs: runs/custom/checkpoints (best.ckpt, last.ckpt), runs/custom/lightning_logs/version_N (TensorBoard).
"""

import csv
import gzip
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning as L

try:
    from lightning_support import EXPORT_OPTIONS, ConfigError, TemplateCLI, run_cli, run_tool, save_program
except ModuleNotFoundError as missing:  # copied without its support module: one line on how to get both
    sys.exit(f"{Path(sys.argv[0]).name}: error: lightning_support.py is missing next to this file: copy both with"
             f" python scripts/scaffold.py custom DEST" if missing.name == "lightning_support" else missing)

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "assets" / "digits.csv.gz"


# EDIT HERE (1 of 4): your network. Paste your nn.Module class (or import it) and return an instance; options it
# needs can become arguments of Model.__init__ and be passed on here.
def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))


class Model(L.LightningModule):
    """Lightning moves batches to the device, runs zero_grad, backward and step, and switches train/eval modes:
    keep none of that from your loop."""

    def __init__(self, lr: float = 3e-3, weight_decay: float = 0.01):
        super().__init__()
        self.save_hyperparameters()  # the options are stored in every checkpoint, which rebuilds this model
        self.net = build_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # EDIT HERE (2 of 4): the loss and metrics of one batch, for training, validation and test (log val_loss: the
    # kept checkpoint, best.ckpt, has the lowest; --best_checkpoint.monitor changes it), and what predict writes.
    def step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if stage == "train":
            self.log("train_loss", loss)
        else:  # averaged over the epoch (and over processes: sync_dist)
            accuracy = (logits.argmax(1) == y).float().mean()
            self.log_dict({f"{stage}_loss": loss, f"{stage}_acc": accuracy}, prog_bar=True, sync_dist=True)
        return loss

    def predict_step(self, batch, batch_idx):
        """Columns of predictions/<checkpoint>.csv, one value per row (row = index in the predicted dataset)."""
        return {"prediction": self(batch[0]).argmax(1)}

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.step(batch, "test")

    # EDIT HERE (3 of 4): any optimizer and learning-rate schedule. interval "step": the scheduler steps after
    # every optimizer step; "epoch": after every epoch (as a loop calling scheduler.step() after each epoch).
    # Gradient clipping is a Trainer option: --trainer.gradient_clip_val 1.0 is a loop's clip_grad_norm_(..., 1.0).
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.lr,
                                                        total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# EDIT HERE (4 of 4): your data, as ordinary torch Datasets of (input, target) pairs, and a random stand-in of the
# same shapes (--data.fake_size N) so the code runs before the data exists.
def make_datasets(data_path: str) -> tuple:
    """(train, val, test): the digits CSV (64 pixel columns, 0-16, then the label), split 70/15/15 the same way in
    every run (a generator of its own: the run's random numbers are left for shuffling and dropout)."""
    with gzip.open(data_path, "rt") if data_path.endswith(".gz") else open(data_path) as f:
        rows = [[float(v) for v in row] for row in list(csv.reader(f))[1:] if row]
    table = torch.tensor(rows)
    images, labels = (table[:, :64] / 16).reshape(-1, 1, 8, 8), table[:, 64].long()
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(0))
    cuts = [int(len(order) * 0.7), int(len(order) * 0.85)]
    return tuple(TensorDataset(images[part], labels[part]) for part in order.tensor_split(cuts))


def fake_datasets(size: int) -> tuple:
    generator = torch.Generator().manual_seed(0)
    fake = TensorDataset(torch.rand(size, 1, 8, 8, generator=generator), torch.randint(10, (size,),
                                                                                     generator=generator))
    return fake, fake, fake


class Data(L.LightningDataModule):
    def __init__(self, data_path: Optional[str] = None, batch_size: int = 64, num_workers: int = 0,
                 fake_size: int = 0):
        """data_path: your data (None: the embedded digits). batch_size: per process (with DDP the global batch is
        batch_size x devices x num_nodes). num_workers: loader processes (0: in the training process)."""
        super().__init__()
        self.save_hyperparameters()
        if data_path and not fake_size and not Path(data_path).expanduser().exists():  # before any run folder is made
            raise ConfigError(f"--data.data_path {data_path}: not found (relative paths are read from {Path.cwd()});"
                              " --data.fake_size N trains on random stand-in data meanwhile")

    def setup(self, stage: str) -> None:
        size, path = self.hparams.fake_size, self.hparams.data_path or str(DEFAULT_DATA)
        self.train, self.val, self.test = fake_datasets(size) if size > 0 else make_datasets(path)

    def loader(self, dataset, shuffle: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self.loader(self.train, shuffle=True)

    def val_dataloader(self):
        return self.loader(self.val)

    def test_dataloader(self):
        return self.loader(self.test)

    def predict_dataloader(self):
        return self.loader(self.test)


class CustomCLI(TemplateCLI):
    evaluate = "test"  # fit's `next:` line tests the kept checkpoint
    then = ("predict", "export --out exported_model")
    absolute_paths = (("data", "data_path"),)  # stored in checkpoints: a later run may start in another folder


def export(checkpoint: str, out: str) -> Path:
    """A standalone program of the checkpoint's forward (save_program), traced on inputs shaped as a test batch's."""
    model = Model.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    data = Data.load_from_checkpoint(checkpoint, weights_only=True)  # the data options the run was trained with
    data.setup("test")
    x = next(iter(data.test_dataloader()))[0][:2]  # a batch is (inputs, targets)
    about = {"inputs": {"x": f"{x.dtype} [batch, {', '.join(map(str, x.shape[1:]))}]"}, "outputs": "Model.forward's"}
    return save_program(model, "forward", (x,), out, about)


TOOLS = {"export": ("A standalone torch.export program of a trained checkpoint's forward (runs with torch alone)."
                    " Example: python custom.py export --out exported_model", EXPORT_OPTIONS[:1],
                    lambda ckpt, o: print(f"exported {ckpt} to {export(ckpt, o.out)}"))}


def main(args=None, run: bool = True, callbacks: tuple = ()):
    """The command line (see the docstring). run=False builds model, data and trainer and returns the CLI."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["export"]:  # beside LightningCLI's subcommands
        return run_tool(argv, TOOLS, "runs/custom")
    return run_cli(CustomCLI, Model, Data, args, run, callbacks,
                   trainer_defaults={"max_epochs": 10, "log_every_n_steps": 10, "default_root_dir": "runs/custom"})


if __name__ == "__main__":
    main()
