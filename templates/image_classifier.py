"""Image classifier template: fine-tune a pretrained backbone on a folder of images, driven by LightningCLI.

The backbone is any Hugging Face image classifier (ResNet, ConvNeXt, ViT, Swin, EfficientNet, DINOv2, ...; timm's
`timm/...` models where timm is installed), by hub name or by a local folder saved with save_pretrained (how a
machine without internet gets weights). Its head is replaced for your classes; its own image-processor config sets
the input size, normalization and resampling. The backbone is frozen for the first --model.freeze_epochs epochs
(the new head learns first), then trains at lr x --model.backbone_lr_scale. Out of the box it trains on a small set of
generated shapes (written to runs/shapes/ on first use). scaffold.py copies it into your project with
lightning_support.py (checkpoints, exact resume, NaN stop, one-line errors) and configs/.

Run it:
    python image_classifier.py fit --data.data_path photos/                       # class subfolders; resnet-18
    python image_classifier.py fit --data.data_path photos/ --model.backbone facebook/convnext-tiny-224
    python image_classifier.py fit --model.backbone ./resnet18_folder             # offline: a save_pretrained folder
    python image_classifier.py fit --data.data_path labels.csv                    # path,label[,split] (relative paths)
    python image_classifier.py fit --config configs/gpu.yaml                      # one GPU, bf16-mixed
    python image_classifier.py fit --ckpt_path last                               # resume where it stopped
    python image_classifier.py test --ckpt_path best                              # per-class accuracy, confusions
    python image_classifier.py export --out my_model      # model.pt2 (torch.export, normalization inside), torch alone
    python image_classifier.py predict --ckpt_path best --data.predict_path new/  # -> predictions/best.csv
In a scaffolded project, pass --config config.yaml (your data settings) before any other config.

Your images:
- A folder with one subfolder per class (an image's class is its top-level folder), or a folder holding train/,
  val/ (or valid/; without it, val_fraction of train) and test/, each with class subfolders, or a CSV with columns
  path,label and optionally split (train, val, test). Without given splits, --data.val_fraction and
  --data.test_fraction of each class are held out, chosen by a hash of the path: new images move few others.
- Grayscale, palette and transparent images become RGB (transparency over white); EXIF orientation is applied.
- Training views: a random resized crop (--data.crop_scale) and a horizontal flip (--data.flip false for text or
  digits); --data.augment strong adds TrivialAugment (one random colour or geometry change per image). Evaluation
  views: resize and center crop, as the backbone's processor does. --data.image_size overrides the input size.
The kept model, best.ckpt, has the lowest val_loss. In Python: ImageClassifier.load_from_checkpoint(best,
weights_only=True).save_pretrained("my_model") writes a Hugging Face folder (config with your class names, weights,
processor config) that --model.backbone and transformers' pipeline("image-classification") load.
Outputs: <trainer.default_root_dir>/checkpoints (best.ckpt, last.ckpt), lightning_logs/version_N,
predictions/<checkpoint>.csv (file, prediction, confidence, label).
"""

import csv
import difflib
import hashlib
import inspect
import json
import math
import os
import random
import socket
import sys
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

import lightning as L
from lightning.fabric.utilities.data import suggested_max_num_workers
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

try:
    from lightning_support import (EXPORT_OPTIONS, ConfigError, TemplateCLI, adamw, cosine_by_epoch, log_train_loss,
                                   pretrained, run_cli, run_tool, save_program)
except ModuleNotFoundError as missing:  # copied without its support module: one line on how to get both
    sys.exit(f"{Path(sys.argv[0]).name}: error: lightning_support.py is missing next to this file: copy both with"
             f" python scripts/scaffold.py image_classifier DEST" if missing.name == "lightning_support" else missing)

DEFAULT_BACKBONE = "microsoft/resnet-18"
# Well-kept backbones on the Hugging Face hub: suggested when a name is mistyped.
KNOWN_BACKBONES = ["microsoft/resnet-18", "microsoft/resnet-50", "facebook/convnext-tiny-224",
                   "facebook/convnext-base-224", "google/vit-base-patch16-224", "google/efficientnet-b0",
                   "google/mobilenet_v2_1.0_224", "microsoft/swin-tiny-patch4-window7-224"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SHAPES_FOLDER = Path("runs") / "shapes"  # the generated default data, relative to where the template runs


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
# EDIT HERE: your own network. forward(pixels), normalized float [batch, 3, height, width], gives logits [batch,
# classes] or an object holding them as .logits (any Hugging Face image classifier); with_weights False builds it
# untrained (a checkpoint brings the weights). Parameters under its `base_model`, if any, freeze first. A network of
# your own reads no processor config: pass --data.processor imagenet and --data.image_size N.
def build_network(backbone: str, with_weights: bool, class_names: list) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification, logging

    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    labels = {"id2label": dict(enumerate(class_names)), "label2id": {c: i for i, c in enumerate(class_names)}}
    try:
        config = pretrained(AutoConfig.from_pretrained, backbone, what="backbone config")
        if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
            raise ValueError(f"a {config.model_type} model")
        if not with_weights:
            return AutoModelForImageClassification.from_config(config.__class__(**{**config.to_dict(), **labels}))
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # its load report lists the replaced head as a mismatch: expected here
        try:
            model, info = pretrained(AutoModelForImageClassification.from_pretrained, backbone, what="backbone",
                                     ignore_mismatched_sizes=True, output_loading_info=True, **labels)
        finally:
            logging.set_verbosity(verbosity)
    except ConfigError as err:
        raise ConfigError(f"{err}{nearest_backbones(backbone)}") from None
    except (ValueError, ImportError, KeyError) as err:  # a text model's folder, timm not installed
        raise ConfigError(f"{backbone!r} is not an image classifier transformers can build ({str(err).splitlines()[0]})"
                          f": pass one such as {DEFAULT_BACKBONE}") from None
    body = model.base_model_prefix + "."
    broken = [k for k in info["missing_keys"] if k.startswith(body)] + list(info["unexpected_keys"])
    if broken:  # weights of another architecture: transformers would start those layers from random values
        raise ConfigError(f"the weights in {backbone} do not fit its config ({len(broken)} tensors missing or unknown,"
                          f" e.g. {broken[0]}): pass the folder the weights were saved in, with its config.json")
    return model


def nearest_backbones(name: str) -> str:
    """'; did you mean: ...' with the well-kept backbones nearest a name that is not one of them."""
    near = [] if name in KNOWN_BACKBONES else difflib.get_close_matches(name, KNOWN_BACKBONES, n=2, cutoff=0.6)
    return f"; did you mean: {', '.join(near)}" if near else ""


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: bool = True,
        freeze_epochs: int = 1,
        backbone_lr_scale: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.1,
        class_names: Optional[list[str]] = None,
        processing: Optional[dict] = None,
    ):
        """backbone: a hub name or a save_pretrained folder; pretrained false starts it from random values (then the
        whole network trains at lr from the first epoch). freeze_epochs: epochs in which only the new head trains.
        class_names and processing (input size, normalization) come from the data (linked in the CLI)."""
        super().__init__()
        if freeze_epochs < 0 or not 0 < backbone_lr_scale <= 1 or lr <= 0 or not 0 <= label_smoothing < 1:
            raise ConfigError(f"freeze_epochs ({freeze_epochs}) must be >= 0, backbone_lr_scale ({backbone_lr_scale})"
                              f" in (0, 1], lr ({lr}) above 0 and label_smoothing ({label_smoothing}) in [0, 1)")
        self.save_hyperparameters()  # load_from_checkpoint needs no arguments
        self.class_names = list(class_names or ["0", "1"])
        k = len(self.class_names)
        prep = processing or {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        # Images arrive as uint8 (4x less to copy to the device); they are scaled and normalized here, so the
        # checkpoint alone classifies raw pixels.
        self.register_buffer("mean", 255 * torch.tensor(prep["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(prep["image_std"]).view(1, 3, 1, 1), persistent=False)
        self.net: Optional[torch.nn.Module] = None
        self.val_acc = MulticlassAccuracy(k, average="micro")
        self.test_acc = MulticlassAccuracy(k, average="micro")
        self.top_k = 5 if k >= 10 else 0  # many classes: top-5 accuracy beside top-1
        if self.top_k:
            self.val_top5 = MulticlassAccuracy(k, top_k=5, average="micro")
            self.test_top5 = MulticlassAccuracy(k, top_k=5, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(k)
        self.test_matrix: Optional[torch.Tensor] = None

    def setup(self, stage: str) -> None:
        # DDP sums the gradients of the parameters it was built with; a frozen backbone's give none, which plain DDP
        # takes for a bug and stops on. Set here, before DDP wraps the model, whatever chose DDP (a config, or
        # --trainer.devices 2 under strategy auto).
        strategy = self.trainer.strategy
        if stage == "fit" and self.frozen_at_start() and isinstance(strategy, DDPStrategy) and \
                not strategy._ddp_kwargs.get("find_unused_parameters"):
            strategy._ddp_kwargs["find_unused_parameters"] = True
            rank_zero_info("DDP with find_unused_parameters: the frozen backbone's parameters get no gradients in the"
                           " first epochs (--model.freeze_epochs 0 keeps plain DDP)")

    def frozen_at_start(self) -> bool:
        return self.hparams.pretrained and self.hparams.freeze_epochs > 0

    def configure_model(self) -> None:
        if self.net is not None:
            return
        # Pretrained weights for a new fit only: a resumed run, test and predict get every weight from the checkpoint
        # (no download; load_from_checkpoint runs this without a trainer).
        fresh = self._trainer is not None and not self.trainer.ckpt_path
        self.use_network(build_network(self.hparams.backbone, self.hparams.pretrained and fresh, self.class_names))

    def use_network(self, net: torch.nn.Module) -> None:
        """Makes `net` this model's network (configure_model's; in Python, a network built by hand)."""
        self.net = net.to(memory_format=torch.channels_last)  # faster convolutions on GPUs (tensor cores) and CPUs
        # ViT-style models refuse another input size (--data.image_size) unless told to interpolate their positions
        accepts = inspect.signature(self.net.forward).parameters
        self.forward_options = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepts else {}
        self.net.train()  # from_pretrained returns eval mode, and Lightning 2.6 keeps a module's mode
        # The body that freezes first and trains at the lower rate: a Hugging Face model's base_model (the network
        # without its head). A network without one, or whose head sits inside it (timm's wrapper), trains whole.
        body = getattr(self.net, "base_model", None)
        names = [n for n, child in self.net.named_children() if child is body]
        head = [p for n, p in self.net.named_parameters() if not names or not n.startswith(names[0] + ".")]
        self.backbone_prefix = f"net.{names[0]}." if names and head else None
        if self.hparams.pretrained and self.hparams.freeze_epochs and self.backbone_prefix is None:
            rank_zero_warn("this network has no separate head to train first: --model.freeze_epochs is ignored")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [batch, height, width, 3] (RGB, as the data gives them) -> logits [batch, classes]."""
        x = images.permute(0, 3, 1, 2)  # NCHW view of channels-last memory: no copy
        out = self.net((x.float() - self.mean) / self.std, **self.forward_options)  # first argument: pixel_values
        return getattr(out, "logits", out)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of uint8 RGB images [batch, size, size, 3]: what `export` saves."""
        return self(images).float().softmax(-1)

    def frozen(self) -> bool:
        return self.hparams.pretrained and self.current_epoch < self.hparams.freeze_epochs

    def on_train_epoch_start(self):
        # Decided from the epoch, so a resumed run freezes and unfreezes exactly where an uninterrupted one does.
        # Frozen parameters get no gradient, so the optimizer leaves them (and their weight decay) alone; BatchNorm's
        # running statistics keep adapting to the new images (the network stays in training mode).
        for name, p in self.named_parameters():
            if self.backbone_prefix and name.startswith(self.backbone_prefix):
                p.requires_grad_(not self.frozen())

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        log_train_loss(self, loss, len(y))  # no per-step device sync
        return loss

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self.test_confusion(self._evaluate(batch, "test"), batch[1])

    def on_test_epoch_end(self):
        self.test_matrix = self.test_confusion.compute().cpu()  # rows: true class, columns: predicted; all ranks
        self.test_confusion.reset()

    def _evaluate(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        for name in ("acc", "top5") if self.top_k else ("acc",):
            metric = getattr(self, f"{stage}_{name}")
            metric(logits, y)  # torchmetrics syncs itself across processes
            self.log(f"{stage}_{name}", metric, prog_bar=name == "acc")
        return logits

    def predict_step(self, batch, batch_idx):
        """The columns of predictions/<checkpoint>.csv: class, its probability, the true class where known."""
        x, y = batch
        confidence, prediction = self(x).softmax(dim=-1).max(dim=-1)
        return {"prediction": [self.class_names[i] for i in prediction.tolist()], "confidence": confidence,
                "label": [self.class_names[i] if i >= 0 else "" for i in y.tolist()]}

    def configure_optimizers(self):
        scale = self.hparams.backbone_lr_scale if self.hparams.pretrained else 1.0
        lr_scale = {self.backbone_prefix: scale} if self.backbone_prefix else {}
        optimizer = adamw(self, self.hparams.lr, self.hparams.weight_decay, lr_scale=lr_scale)
        return cosine_by_epoch(self, optimizer)

    def save_pretrained(self, folder: str) -> None:
        """A Hugging Face folder of this model: weights, config (with the class names) and the processor config of
        the data it was trained on, which --model.backbone and pipeline("image-classification") load."""
        if self.net is None:
            self.configure_model()
        self.net.save_pretrained(folder)
        prep = self.hparams.processing or {}
        size = prep.get("size", 224)
        resized = round(size * prep.get("resize_ratio", 1.0))
        config = {"image_processor_type": "BitImageProcessor", "do_resize": True, "do_rescale": True,
                  "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": prep.get("image_mean"),
                  "image_std": prep.get("image_std"), "resample": prep.get("resample", 2),
                  "size": {"shortest_edge": resized}, "do_center_crop": True,
                  "crop_size": {"height": size, "width": size}}  # short side resized, then the crop
        if prep.get("squash"):  # each side resized (aspect not kept), then the crop if any
            config.update(image_processor_type="DeiTImageProcessor", size={"height": resized, "width": resized},
                          do_center_crop=resized != size)
        Path(folder, "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Images: reading, the backbone's processing, training views
# ----------------------------------------------------------------------------------------------------------------
def load_image(path, min_side: int = 0):
    """An RGB PIL image the right way up: EXIF orientation applied, grayscale/palette converted, transparency laid
    over white. A large JPEG is decoded at a reduced scale (still >= 2 x min_side): far less work per image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            if min_side and img.format == "JPEG":
                img.draft("RGB", (2 * min_side, 2 * min_side))
            img = ImageOps.exif_transpose(img)  # a decoded copy
    except Image.DecompressionBombError as err:
        raise ConfigError(f"{path}: {err}: downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise ConfigError(f"cannot decode image {path} ({err}): replace or delete it, then rerun") from None
    if img.mode.startswith("I;16"):  # 16-bit grey: the top 8 bits (convert("L") would clip to 0 or 255)
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if "transparency" in img.info:  # a palette, grey or RGB image with one transparent colour
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def hub_reachable() -> bool:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=3).close()
        return True
    except OSError:
        return False


def processing_of(name: str, image_size: Optional[int]) -> dict:
    """Input size, resize-then-crop ratio, resampling and normalization from the backbone's preprocessor_config.json
    (a hub name or a folder), as its own processor applies them; ImageNet's 224 px when it has none."""
    from transformers.image_processing_utils import ImageProcessingMixin

    if name == "imagenet":  # a network of your own: ImageNet's statistics, resize to 8/7 of the size, crop
        return {"size": int(image_size or 224), "resize_ratio": round(256 / 224, 6), "squash": False, "resample": 2,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    try:  # the cache first: no network round trip for a backbone already downloaded
        config, _ = ImageProcessingMixin.get_image_processor_dict(name, local_files_only=True)
    except (OSError, ValueError):
        if not Path(name).expanduser().exists() and not hub_reachable():  # not a minute of retries, twice
            raise ConfigError(f"{name!r} is not in the Hugging Face cache and the hub cannot be reached: offline,"
                              f" pass --model.backbone a folder saved with save_pretrained{nearest_backbones(name)}")
        try:
            config, _ = ImageProcessingMixin.get_image_processor_dict(name)
        except (OSError, ValueError):
            rank_zero_warn(f"no image-processor config for {name!r}: ImageNet's (224 px, resize 256 and center crop)")
            config = {}
    size, crop = config.get("size") or {}, config.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if config.get("do_center_crop", bool(crop)) and crop:  # resize to `size`, then crop `crop_size`
        final = crop.get("height", 224)
        ratio = (size.get("shortest_edge") or size.get("height") or final) / final
        squash = "shortest_edge" not in size  # DeiT: resized to height x width (aspect not kept), then cropped
    elif "shortest_edge" in size:  # ConvNeXt: short side to size / crop_pct, then the crop; from 384 px a square
        final = size["shortest_edge"]
        squash = final >= 384
        ratio = int(final / config["crop_pct"]) / final if config.get("crop_pct") and not squash else 1.0
    elif "height" in size:  # ViT-style: resized to exactly height x width, aspect not kept
        final, ratio, squash = size["height"], 1.0, True
    else:
        final, ratio, squash = 224, 256 / 224, False
    resample = config.get("resample", 2)
    std = list(config.get("image_std") or [0.229, 0.224, 0.225])
    if str(config.get("image_processor_type", "")).startswith("EfficientNet") and config.get("include_top", True):
        std = [s * s for s in std]  # its processor divides by std a second time (include_top)
    return {"size": int(image_size or final), "resize_ratio": round(float(ratio), 6), "squash": squash,
            "resample": int(resample if isinstance(resample, int) else 2),
            "image_mean": list(config.get("image_mean") or [0.485, 0.456, 0.406]), "image_std": std}


def evaluation_view(img, prep: dict):
    """The short side (squash: each side) resized to size x resize_ratio, then the center size x size: one PIL
    resize of the matching box of the original."""
    size, ratio, (w, h) = prep["size"], prep["resize_ratio"], img.size
    if prep["squash"]:
        cw, ch = w / ratio, h / ratio
    else:
        cw = ch = min(w, h) * size / round(size * ratio)  # the crop, in the original's pixels
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return img.resize((size, size), prep["resample"], box=box)


def training_view(img, prep: dict, rng: random.Random, crop_scale: tuple, flip: bool, strong: bool):
    """A random resized crop (area share in crop_scale, aspect 3/4..4/3, as torchvision's), a horizontal flip and,
    if strong, one TrivialAugment operation."""
    w, h = img.size
    cw, ch = (w, min(h, w * 4 / 3)) if w / h < 3 / 4 else (min(w, h * 4 / 3), h)  # after 10 misses: the center
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    for _ in range(10):
        area = w * h * rng.uniform(*crop_scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if cw <= w and ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            box = (left, top, left + cw, top + ch)
            break
    img = img.resize((prep["size"], prep["size"]), prep["resample"], box=box)
    if strong:
        img = trivial_augment(img, rng)
    if flip and rng.random() < 0.5:
        img = img.transpose(0)  # Image.Transpose.FLIP_LEFT_RIGHT
    return img


def trivial_augment(img, rng: random.Random):
    """TrivialAugment (Mueller & Hutter, 2021; torchvision's TrivialAugmentWide ranges): one operation, one random
    strength."""
    from PIL import Image, ImageEnhance, ImageOps

    m = rng.randint(0, 30) / 30
    sign = rng.choice((-1, 1))
    op = rng.randrange(14)
    grey = (128, 128, 128)
    if op == 0:
        return img
    if op in (1, 2):  # shear x / y
        s = sign * 0.99 * m
        return img.transform(img.size, Image.AFFINE, (1, s, 0, 0, 1, 0) if op == 1 else (1, 0, 0, s, 1, 0),
                             Image.BILINEAR, fillcolor=grey)
    if op in (3, 4):  # translate x / y, up to 32 px at 224 px
        t = sign * m * 32 / 224 * img.size[0]
        return img.transform(img.size, Image.AFFINE, (1, 0, t, 0, 1, 0) if op == 3 else (1, 0, 0, 0, 1, t),
                             Image.BILINEAR, fillcolor=grey)
    if op == 5:
        return img.rotate(sign * 135 * m, Image.BILINEAR, fillcolor=grey)
    if op in (6, 7, 8, 9):
        enhance = (ImageEnhance.Brightness, ImageEnhance.Color, ImageEnhance.Contrast, ImageEnhance.Sharpness)[op - 6]
        return enhance(img).enhance(1 + sign * 0.99 * m)
    if op == 10:
        return ImageOps.posterize(img, 8 - round(6 * m))
    if op == 11:
        return ImageOps.solarize(img, int(255 * (1 - m)))
    return ImageOps.autocontrast(img) if op == 12 else ImageOps.equalize(img)


class ImageFiles(Dataset):
    """Decodes images lazily, in the DataLoader's workers, so a folder larger than memory works. A training item
    comes as (index, seed): the seed of its random view, drawn by AugmentSeeds in the main process."""

    def __init__(self, files: list, targets: list, prep: dict, augment: str = "none", crop_scale=(0.25, 1.0),
                 flip: bool = True):
        self.files, self.targets, self.prep = files, targets, prep
        self.augment, self.crop_scale, self.flip = augment, tuple(crop_scale), flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        img = load_image(self.files[i], self.prep["size"])
        if seed is None or self.augment == "none":
            img = evaluation_view(img, self.prep)
        else:
            img = training_view(img, self.prep, random.Random(seed), self.crop_scale, self.flip,
                                self.augment == "strong")
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.size[1], img.size[0], 3)
        return pixels, self.targets[i]


class AugmentSeeds(Sampler):
    """A shuffled order with one augmentation seed per item, both drawn from the run's seed and the epoch: a resumed
    run sees the same order, crops and flips as an uninterrupted one, however many workers decode and whatever else
    drew random numbers before."""

    def __init__(self, size: int, epoch: Callable[[], int]):
        self.size, self.epoch = size, epoch
        self.seed = torch.initial_seed()  # seed_everything's value: the same in every process and every resume

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch()) % 2**63)
        order = torch.randperm(self.size, generator=generator).tolist()
        return iter(zip(order, torch.randint(2**62, (self.size,), generator=generator).tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Data: the folder or CSV a user has, split by class; the generated shapes by default
# ----------------------------------------------------------------------------------------------------------------
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


def visible(path: Path, root: Path) -> bool:
    """Not .DS_Store, ._x.png, .ipynb_checkpoints/ or a zip's __MACOSX/."""
    return not any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(root).parts)


def read_folder(root: Path, require_label: bool) -> tuple:
    """(files, labels): an image's label is its top-level folder under root ('' for an image directly in it)."""
    files = [p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and visible(p, root)]
    labels = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
    if require_label:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and visible(p, root))
        empty = [name for name in folders if name not in set(labels)]
        if empty:
            raise ConfigError(f"{root}: class folder(s) {', '.join(empty[:5])} hold no images"
                              f" ({', '.join(sorted(IMAGE_SUFFIXES))}): add images or move the folder out")
        if "" in labels:
            raise ConfigError(f"{root}: {labels.count('')} image(s) are not in a class subfolder, e.g."
                              f" {files[labels.index('')]}: move them into one (an image's class is its folder)")
    return files, labels


def read_csv(path: Path, require_label: bool) -> tuple:
    """(files, labels, splits) from a CSV with columns path (or file, image, filename), label (or class) and
    optionally split; paths relative to the CSV's folder."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}): save it as CSV UTF-8") from None
    header = {name.strip().lower(): name for name in (rows[0] if rows else {})}
    column = {key: next((header[n] for n in names if n in header), None) for key, names in
              {"path": ("path", "file", "image", "filename"), "label": ("label", "class"), "split": ("split",)}.items()}
    if column["path"] is None or (require_label and column["label"] is None):
        raise ConfigError(f"{path}: needs a header with columns path,label (and optionally split); it has"
                          f" {', '.join(header.values()) or 'no rows'}")
    empty = [n + 2 for n, row in enumerate(rows) if not (row[column["path"]] or "").strip()]
    if empty:
        raise ConfigError(f"{path}: line {empty[0]} has no path")
    files = [(path.parent / row[column["path"]].strip()).resolve() for row in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} listed image(s) not found, e.g. {missing[0]} (paths are relative"
                          " to the CSV's folder)")
    labels = [(row[column["label"]] or "").strip() if column["label"] else "" for row in rows]
    labels = ["" if label.lower() in ("nan", "null", "none", "n/a") else label for label in labels]
    if require_label and "" in labels:
        raise ConfigError(f"{path}: line {labels.index('') + 2} has no label: fill it in or delete the line")
    splits = [SPLIT_NAMES.get((row[column["split"]] or "").strip().lower(), "?") if column["split"] else None
              for row in rows]
    if "?" in splits:
        raise ConfigError(f"{path}: line {splits.index('?') + 2}: split must be train, val or test")
    return files, labels, splits if column["split"] else None


def read_images(path: Path, require_label: bool = True) -> tuple:
    """(files, labels, splits or None) from a folder of class folders, a folder of train/val/test folders, or a
    CSV."""
    if not path.exists():
        raise ConfigError(f"data not found: {path}: pass a folder of class subfolders or a CSV of path,label")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ConfigError(f"{path}: pass a folder of images (one subfolder per class) or a .csv of path,label")
        return read_csv(path, require_label)
    parts = {SPLIT_NAMES[p.name.lower()]: p for p in path.iterdir() if p.is_dir() and p.name.lower() in SPLIT_NAMES}
    if "train" in parts and len(parts) > 1:  # splits made already: train/ val/ test/, each of class folders
        files, labels, splits = [], [], []
        for name, folder in sorted(parts.items()):
            f, lab = read_folder(folder, require_label)
            files, labels, splits = files + f, labels + lab, splits + [name] * len(f)
        return files, labels, splits
    files, labels = read_folder(path, require_label)
    return files, labels, None


def refuse_unreadable(files: list) -> None:
    """Opens every image's header (about 60 us a file): a file that is no image stops the run before training, not
    hours into it. (A file cut short after its header stops at its first decode, with the same one line.)"""
    from PIL import Image

    bad = []
    for file in files:
        try:
            with Image.open(file):
                pass
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            bad.append(str(file))
    if bad:
        raise ConfigError(f"{len(bad)} file(s) are not readable images: {', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''}: delete or replace them")


def split_by_class(keys: list, targets: list, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Indices of the val, test and train splits: round(n x fraction) of each class (each class keeps at least one
    training image), the items ordered within their class by a hash of (seed, key): adding or removing images moves
    few others between splits, where a permutation of the whole list would reshuffle them all."""
    by_class: dict = {}
    for i, (key, target) in enumerate(zip(keys, targets)):
        by_class.setdefault(target, []).append((hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), i))
    splits: dict = {"val": [], "test": [], "train": []}
    for members in by_class.values():
        order = [i for _, i in sorted(members)]
        n_val = min(round(len(order) * val_fraction), len(order) - 1)
        n_test = min(round(len(order) * test_fraction), len(order) - 1 - n_val)
        splits["val"] += order[:n_val]
        splits["test"] += order[n_val:n_val + n_test]
        splits["train"] += order[n_val + n_test:]
    return {name: sorted(idx) for name, idx in splits.items()}


SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")


def make_shapes(folder: Path, shapes: tuple = SHAPES[:4], per_class: int = 150, size: int = 64,
                seed: int = 0) -> Path:
    """A small image set to train on before real data exists: one filled shape per image, random colours, size,
    place and rotation over a noisy background, one subfolder per shape. Written beside the folder and moved into
    place, so an interrupted run (or another process writing the same set) leaves no half-made folder."""
    from PIL import Image, ImageDraw

    if folder.is_dir():
        return folder
    rng = random.Random(seed)
    staging = folder.with_name(f".{folder.name}-{os.getpid()}")
    for shape in shapes:
        (staging / shape).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            img = Image.effect_noise((size, size), rng.uniform(10, 40)).convert("RGB")
            img = Image.blend(img, Image.new("RGB", img.size, tuple(rng.randrange(100) for _ in range(3))), 0.7)
            draw = ImageDraw.Draw(img)
            radius = size * rng.uniform(0.25, 0.45)
            cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
            colour = tuple(rng.randrange(130, 256) for _ in range(3))  # a bright shape on a dark background
            turn = rng.uniform(0, 2 * math.pi)

            def ring(count: int, scale: float = 1.0, offset: float = 0.0) -> list:
                return [(cx + scale * radius * math.cos(turn + offset + 2 * math.pi * k / count),
                         cy + scale * radius * math.sin(turn + offset + 2 * math.pi * k / count)) for k in range(count)]

            if shape in ("circle", "ring"):
                box = (cx - radius, cy - radius, cx + radius, cy + radius)
                draw.ellipse(box, fill=None if shape == "ring" else colour, outline=colour,
                             width=max(2, int(radius / 3)))
            elif shape == "star":
                outer, inner = ring(5), ring(5, 0.4, math.pi / 5)
                draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=colour)
            elif shape == "cross":
                arms = [(1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3), (-.3, -1),
                        (.3, -1), (.3, -.3), (1, -.3)]
                c, s = math.cos(turn), math.sin(turn)
                draw.polygon([(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in arms],
                             fill=colour)
            else:
                corners = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[shape]
                points = ring(corners)
                if shape == "diamond":  # a rhombus: one diagonal half the other
                    points = [(cx + (x - cx) * (0.5 if k % 2 else 1), cy + (y - cy) * (0.5 if k % 2 else 1))
                              for k, (x, y) in enumerate(points)]
                draw.polygon(points, fill=colour)
            img.save(staging / shape / f"{n:04d}.png")
    try:
        staging.rename(folder)
    except OSError:  # another process moved its (identical) set into place first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return folder


class ImageData(L.LightningDataModule):
    def __init__(
        self,
        data_path: Optional[str] = None,
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        predict_path: Optional[str] = None,
        processor: Optional[str] = None,
        image_size: Optional[int] = None,
        augment: Literal["light", "strong", "none"] = "light",
        crop_scale: tuple[float, float] = (0.25, 1.0),
        flip: bool = True,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: Optional[int] = None,
    ):
        """data_path: a folder (class subfolders, or train/ val/ test/ of class subfolders) or a CSV of
        path,label[,split]; default: generated shapes in runs/shapes. val_path, test_path: other labelled sets for
        those splits; predict_path: a folder or CSV to label (default: the test split). processor: where the image
        processing is read from (default: --model.backbone; imagenet: ImageNet's, for a network of your own).
        num_workers: decoding processes (default: per CPU core, up to 8 per device)."""
        super().__init__()
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1 or image_size is not None and image_size < 8:
            raise ConfigError(f"crop_scale {tuple(crop_scale)} must satisfy 0 < low <= high <= 1 and image_size"
                              f" ({image_size}) be at least 8")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1) or \
                batch_size < 1 or (num_workers or 0) < 0:
            raise ConfigError(f"val_fraction ({val_fraction}) must be in (0, 1), test_fraction ({test_fraction}) in"
                              f" [0, 1) with a sum below 1, batch_size ({batch_size}) >= 1, num_workers >= 0")
        self.save_hyperparameters()
        self.path = Path(data_path).expanduser() if data_path else make_shapes(SHAPES_FOLDER)
        self.files, labels, given = read_images(self.path)
        self.classes = sorted(set(labels))
        if len(self.classes) < 2:
            raise ConfigError(f"{self.path}: needs at least 2 classes of images; found {len(self.classes)}")
        self.targets = [self.classes.index(label) for label in labels]
        refuse_unreadable(self.files)
        keys = [f.relative_to(self.path).as_posix() if f.is_relative_to(self.path) else str(f) for f in self.files]
        if given is None:
            self.splits = split_by_class(keys, self.targets, val_fraction, test_fraction, split_seed)
        else:
            self.splits = {name: [i for i, s in enumerate(given) if s == name] for name in ("train", "val", "test")}
            if not self.splits["val"] and not val_path:  # train/ and test/ only: val_fraction of train is held out
                train = self.splits["train"]
                held = split_by_class([keys[i] for i in train], [self.targets[i] for i in train], val_fraction, 0,
                                      split_seed)
                self.splits.update(val=[train[i] for i in held["val"]], train=[train[i] for i in held["train"]])
        self.processing = processing_of(processor or DEFAULT_BACKBONE, image_size)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.sets = {name: ([self.files[i] for i in idx], [self.targets[i] for i in idx])
                     for name, idx in self.splits.items()}
        for name in ("val", "test", "predict"):
            path = hp.get(f"{name}_path")
            if path and (stage == name or name == "val" or stage == "validate" and name == "val"):
                files, labels, _ = read_images(Path(path).expanduser(), require_label=name != "predict")
                unknown = sorted(set(labels) - set(self.classes) - {""})
                if unknown:
                    raise ConfigError(f"{path}: class(es) {', '.join(unknown[:5])} are not among the model's classes"
                                      f" ({', '.join(self.classes[:8])}{', ...' if len(self.classes) > 8 else ''})")
                refuse_unreadable(files)
                self.sets[name] = (files, [self.classes.index(x) if x in self.classes else -1 for x in labels])
        self.sets.setdefault("predict", self.sets["test"])
        self.predict_sources = ("file", [str(f) for f in self.sets["predict"][0]])
        if not self.sets["train"][0] or not self.sets["val"][0]:
            raise ConfigError(f"{self.path}: the train and val splits both need images (val has"
                              f" {len(self.sets['val'][0])}); add images or give a val split")

    def _loader(self, name: str, train: bool = False) -> DataLoader:
        hp = self.hparams
        files, targets = self.sets[name]
        data = ImageFiles(files, targets, self.processing, hp.augment if train else "none", hp.crop_scale, hp.flip)
        workers = hp.num_workers
        if workers is None:  # decoding in the training process would leave the accelerator waiting
            workers = min(8, suggested_max_num_workers(self.trainer.num_devices if self.trainer else 1))
        per_process = len(data) // (self.trainer.world_size if self.trainer else 1)
        sampler = AugmentSeeds(len(data), self._epoch) if train else None
        return DataLoader(data, batch_size=hp.batch_size, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          drop_last=train and per_process >= hp.batch_size)  # no tiny last batch for BatchNorm

    def _epoch(self) -> int:
        """The epoch the training loader is opened for. On resume from an epoch-end checkpoint, Lightning 2.6 opens
        it (and the workers prefetch) while current_epoch and set_epoch still name the finished epoch; the count of
        processed epochs is already right then, as it is at every other epoch start."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")


# ----------------------------------------------------------------------------------------------------------------
# Command line: TemplateCLI (lightning_support.py) adds the checkpoints, early stopping and checks every run gets
# ----------------------------------------------------------------------------------------------------------------
class ImageCLI(TemplateCLI):
    patience = 5  # early stopping: validations without a lower val_loss
    evaluate = "test"  # fit's `next:` line tests the kept checkpoint on the test split
    then = ("predict", "export --out exported_model")
    absolute_paths = (("data", "data_path"), ("data", "val_path"), ("data", "test_path"), ("model", "backbone"))

    def add_template_arguments(self, parser):
        self.link(parser, "data.classes", "model.class_names")
        self.link(parser, "data.processing", "model.processing")
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.data.processor = config.data.processor or config.model.backbone  # after --ckpt_path's model options

    def after_test(self) -> None:
        matrix = self.model.test_matrix
        if self.trainer.is_global_zero and matrix is not None:
            print(per_class_table(matrix, self.datamodule.classes))


def per_class_table(matrix: torch.Tensor, classes: list, pairs: int = 5) -> str:
    """Each class's test accuracy (its recall) and number of test images, then the most frequent confusions: one
    overall number can hide a class the model never gets right."""
    counts = matrix.sum(1)
    recall = matrix.diag() / counts.clamp(min=1)
    lines = [f"per-class test accuracy (macro average {recall[counts > 0].mean().item():.4f}):"]
    width = max(len(str(c)) for c in classes)
    for i, name in enumerate(classes):
        accuracy = f"{recall[i].item():.4f}" if counts[i] else "-     "
        lines.append(f"  {str(name):<{width}}  {accuracy}  n={int(counts[i])}")
    errors = matrix.clone().fill_diagonal_(0)
    worst = [divmod(int(i), len(classes)) for i in errors.flatten().argsort(descending=True)[:pairs]]
    worst = [(t, p) for t, p in worst if errors[t, p] > 0]
    lines.append("most frequent confusions (true -> predicted: images):" if worst else "no confusions")
    lines += [f"  {classes[t]} -> {classes[p]}: {int(errors[t, p])}" for t, p in worst]
    return "\n".join(lines)


def export(checkpoint: str, out: str) -> Path:
    """A standalone program of the checkpoint (save_program): uint8 RGB images at the trained size in, class
    probabilities out, the scaling and normalization inside; the resize and crop that come before, in about.json."""
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    prep = model.hparams.processing or {}
    size = prep.get("size", 224)
    resize = (f"each side to {round(size * prep.get('resize_ratio', 1.0))}" if prep.get("squash") else
              f"the short side to {round(size * prep.get('resize_ratio', 1.0))}") + f", then the center {size}x{size}"
    about = {"inputs": {"images": f"uint8 [batch, {size}, {size}, 3], RGB", "resize first": resize},
             "outputs": {"classes": model.class_names},
             "usage": "model(images) -> class probabilities [batch, classes], in the order of classes"}
    return save_program(model, "probabilities", (torch.zeros(2, size, size, 3, dtype=torch.uint8),), out, about)


TOOLS = {"export": ("A standalone torch.export program of a trained checkpoint, its normalization inside (runs with"
                    " torch alone). Example: python image_classifier.py export --out exported_model",
                    EXPORT_OPTIONS[:1], lambda ckpt, o: print(f"exported {ckpt} to {export(ckpt, o.out)}"))}


def main(args=None, run: bool = True, callbacks: tuple = ()):
    """The command line (see the docstring). run=False builds model, data and trainer and returns the CLI."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["export"]:  # beside LightningCLI's subcommands
        return run_tool(argv, TOOLS, "runs/image_classifier")
    return run_cli(ImageCLI, ImageClassifier, ImageData, args, run, callbacks,
                   trainer_defaults={"max_epochs": 10, "log_every_n_steps": 10,
                                     "default_root_dir": "runs/image_classifier"})


if __name__ == "__main__":
    main()
