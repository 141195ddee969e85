"""Benchmark: the templates through Lightning's Trainer against plain PyTorch loops, side by side, in one process.

Causal LM: templates/causal_lm.py (its own CLI, default logging and progress bar) against a plain loop with the same
model, data, optimizer, schedule, clipping and precision. Tabular: templates/tabular.py against a plain loop
on CPU. Images: templates/image_classifier.py (ResNet-50 shape, 224 px, bf16-mixed, channels-last, 128 a batch)
against a plain loop on the same module and loader, and the loader alone (the data-loading bound). Fine-tuning:
templates/transformers_finetune.py against transformers.Trainer, each its own recipe, on a BERT-base shape (random
init), the same data, batch, steps and schedule. Prints one table: variant, card, batch x sequence, ms/step, tokens/s
(images/s, samples/s), MFU, ratio to the reference (the plain loop, or the peer), peak memory; then the correctness
checks (loss falls; template and plain loop reach the same loss, step by step for the images; both fine-tunes'
validation accuracy).

Usage:
    python bench/bench.py                         # GPU: GPT-2-small shape (124M, vocab 50304, seq 1024), bf16, compile
    python bench/bench.py --batch-size 32 --no-bias --steps 80 --format json
    python bench/bench.py --model-type gpt2 --trainer-only   # transformers' GPT2LMHeadModel, template only
    python bench/bench.py --trainer-only --sdpa-backend cudnn   # one lever at a time (or --max-autotune, ...)
    python bench/bench.py --tiny                  # CPU, tiny shapes, seconds: the same code (run by the tests)
MFU = tokens/s x (6 x parameters + 12 x layers x seq x width) / peak FLOP/s (989e12 for H100/H200 SXM in bf16).
"""

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import json
import math
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "templates"))  # the templates are files to copy; import them by name here
import causal_lm  # noqa: E402
import image_classifier  # noqa: E402
import tabular  # noqa: E402
import transformers_finetune  # noqa: E402
import lightning_support  # noqa: E402
import lightning as L  # noqa: E402
from lightning.fabric.utilities.data import suggested_max_num_workers  # noqa: E402
from lightning.fabric.utilities.throughput import get_available_flops  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.trainer.states import RunningStage  # noqa: E402
from transformers import get_cosine_with_min_lr_schedule_with_warmup  # noqa: E402

GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50304}
TINY_GPT = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "vocab_size": 512}
# The template's defaults for weight decay (0.1), betas (0.9, 0.95) and the minimum learning rate (10%) apply to both.
LM_HPARAMS = {"learning_rate": 6e-4, "warmup_steps": 10}
WEIGHT_DECAY, BETAS, MIN_LR_RATIO = 0.1, (0.9, 0.95), 0.1


class UsageError(ValueError):
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing:
    """Wall time of the steps after the warm-up (one device sync at each end) and the loss of every step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.seconds, self.steps, self.losses = warmup, None, None, 0, []

    def step_done(self, step: int, loss: torch.Tensor, device: torch.device, last: bool) -> None:
        self.losses.append(loss.detach())  # read after the run: no per-step sync
        if step == self.warmup:
            sync(device)
            self.start = time.perf_counter()
        elif step > self.warmup:
            self.steps += 1
            if last:
                sync(device)
                self.seconds = time.perf_counter() - self.start

    def loss_values(self) -> list:
        return [float(v) for v in self.losses]


class TrainerTiming(Callback):
    def __init__(self, timing: Timing, total: int):
        self.timing, self.total = timing, total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.timing.step_done(step, outputs["loss"], pl_module.device, last=step == self.total)


def write_corpus(path: Path, n_bytes: int) -> None:
    """Random printable text: the template's byte tokenizer turns it into as many tokens as needed, no epoch ends."""
    rng = random.Random(0)
    path.write_text("".join(rng.choices(string.ascii_letters + string.digits + " .,\n", k=n_bytes)))


def peak_memory(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "-"


def lm_cli_args(opt, corpus: Path, root: Path, config: dict) -> list:
    return ["--data.data_path", str(corpus), "--data.block_size", str(opt.seq_len), "--data.batch_size",
            str(opt.batch_size), "--data.num_workers", str(opt.workers), "--model.model_type", opt.model_type,
            "--model.model_config", json.dumps(config), "--model.compile", str(opt.compile).lower(),
            *(["--model.sdpa_backend", opt.sdpa_backend] if opt.sdpa_backend else []),
            "--model.learning_rate", str(LM_HPARAMS["learning_rate"]), "--model.warmup_steps",
            str(LM_HPARAMS["warmup_steps"]), "--trainer.max_steps", str(opt.steps), "--trainer.precision",
            opt.precision, "--trainer.accelerator", opt.accelerator, "--trainer.devices", "1",
            "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
            *(["--throughput.peak_tflops", str(opt.peak)] if opt.peak else [])]  # one peak for both MFUs


def run_lm_trainer(opt, corpus: Path, root: Path, config: dict):
    timing = Timing(opt.warmup)
    cli = causal_lm.main(lm_cli_args(opt, corpus, root, config), run=False,
                         callbacks=(TrainerTiming(timing, opt.steps),))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, lightning_support.Throughput))
    reported = monitor._throughputs[RunningStage.TRAINING].compute().get("device/mfu")
    n_params = sum(p.numel() for p in cli.model.parameters())
    return timing, cli.model.flops_per_batch, reported, n_params


def run_lm_plain(opt, corpus: Path, config: dict) -> Timing:
    """The loop a careful engineer writes by hand around the same module, data and optimizer settings."""
    device = torch.device("cuda" if opt.accelerator == "gpu" else "cpu")
    L.seed_everything(42, verbose=False)  # as the template does before it builds the model (and data order)
    data = causal_lm.TextData(data_path=str(corpus), block_size=opt.seq_len, batch_size=opt.batch_size,
                              num_workers=opt.workers)
    data.setup("fit")
    module = causal_lm.CausalLM(vocab_size=data.vocab_size, model_type=opt.model_type, model_config=config,
                                compile=opt.compile, sdpa_backend=opt.sdpa_backend, **LM_HPARAMS)
    module.configure_model()  # as under the Trainer: load_or_build draws the weights on the CPU, then they move
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LM_HPARAMS["learning_rate"], betas=BETAS,
                                  fused=device.type in ("cuda", "cpu"))  # as the template (no fp16 scaler here)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, LM_HPARAMS["warmup_steps"], opt.steps,
                                                            min_lr_rate=MIN_LR_RATIO)
    dtype = torch.bfloat16 if opt.precision.startswith("bf16") else torch.float32
    timing, step, epoch, loader = Timing(opt.warmup), 0, 0, data.train_dataloader()
    module.train()
    while step < opt.steps:
        loader.sampler.set_epoch(epoch)  # as Lightning does: the template's order, seed + epoch
        epoch += 1
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = module.loss(x, y)  # the template's forward and loss (one compiled graph with compile)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            timing.step_done(step, loss, device, last=step == opt.steps)
            if step == opt.steps:
                break
    return timing


class StepClock(Callback):
    """Time after every training step, per epoch (CPU only: no device to wait for)."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epochs[-1].append(time.perf_counter())


def median_step_ms(epochs: list) -> float:
    """Median time between consecutive steps of an epoch: the steady per-step cost, without per-epoch work."""
    return 1000 * statistics.median(b - a for times in epochs for a, b in zip(times, times[1:]))


def run_tabular(opt, root: Path):
    """tabular.py on the embedded digits as shipped (validation, checkpoints and logging every epoch) against a plain
    loop that trains and validates the same module on the same data."""
    epochs = 3 if opt.tiny else 10
    clock = StepClock()
    cli = tabular.main(["--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.devices",
                        "1", "--trainer.default_root_dir", str(root)], run=False, callbacks=(clock,))
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    trainer_run = {"ms_per_step": median_step_ms(clock.epochs), "fit_seconds": time.perf_counter() - start,
                   "val_acc": float(cli.trainer.callback_metrics["val_acc"])}

    torch.manual_seed(42)
    data = tabular.TableData()
    data.setup("fit")
    model = tabular.TabularModel(features=data.features, target=data.target)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": model.hparams.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=model.hparams.lr, fused=True)  # as the template's adamw()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 + math.cos(math.pi * e / epochs)) / 2)
    start, times = time.perf_counter(), []
    for _ in range(epochs):
        model.train()
        times.append([])
        for numeric, codes, y in data.train_dataloader():
            loss = model.loss(model(numeric, codes), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[-1].append(time.perf_counter())
        model.eval()
        with torch.no_grad():
            correct = sum((model(n, c).argmax(-1) == y).sum().item() for n, c, y in data.val_dataloader())
        scheduler.step()
    plain_run = {"ms_per_step": median_step_ms(times), "fit_seconds": time.perf_counter() - start,
                 "val_acc": correct / len(data.datasets["val"])}
    return plain_run, trainer_run


BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
FINETUNE_BATCH = 32


class HFTiming:
    """Wall time of transformers.Trainer's steps after the warm-up (a TrainerCallback: one device sync at each end)."""

    def __init__(self, timing: Timing, device: torch.device, total: int):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timing.step_done(state.global_step, torch.zeros(()), device, last=state.global_step == total)

        self.callback = Clock()


def accuracy(model, loader, device: torch.device) -> float:
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        right = sum((model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)
                           ).logits.argmax(-1).cpu() == b["labels"]).sum().item() for b in loader)
    return right / len(loader.dataset)


def run_finetune_peers(opt, root: Path) -> dict:
    """transformers_finetune.py against transformers.Trainer, each with its own recipe, on the same BERT shape (random
    init: base, or tiny on CPU), data (the embedded reviews through the template's word vocabulary, batches padded
    to their longest text), batch, steps, learning rate, linear warm-up (10%), clipping and precision."""
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, set_seed

    shape, device = ({} if opt.tiny else BERT_BASE), torch.device("cpu" if opt.tiny else "cuda")
    results, steps, lr = {}, opt.steps, 1e-3 if opt.tiny else 1e-4  # from scratch: a tiny model takes more
    timing = Timing(opt.warmup)
    cli = transformers_finetune.main(
        ["--model.model_config", json.dumps(shape), "--model.learning_rate", str(lr),
         "--data.batch_size", str(FINETUNE_BATCH), "--data.num_workers", str(opt.workers), "--trainer.max_steps",
         str(steps), "--trainer.precision", opt.precision, "--trainer.accelerator", opt.accelerator,
         "--trainer.devices", "1", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root)],
        run=False, callbacks=(TrainerTiming(timing, steps),))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    data = cli.datamodule
    results["transformers_finetune.py (Lightning)"] = (timing, accuracy(cli.model.model.to(device),
                                                                       data.val_dataloader(), device))
    set_seed(42)
    model = AutoModelForSequenceClassification.from_config(lightning_support.transformers_config(
        "bert", transformers_finetune.TINY_BERT, shape, vocab_size=data.vocab_size, num_labels=data.num_labels))
    timing = Timing(opt.warmup)
    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=FINETUNE_BATCH, max_steps=steps,
                             learning_rate=lr, weight_decay=0.01, warmup_steps=int(0.1 * steps), max_grad_norm=1.0,
                             lr_scheduler_type="linear", bf16=not opt.tiny, use_cpu=opt.tiny, report_to=[],
                             save_strategy="no", logging_strategy="no", optim="adamw_torch_fused",
                             dataloader_num_workers=opt.workers, remove_unused_columns=False, disable_tqdm=True)
    hf = Trainer(model=model, args=args, train_dataset=data.train_set, data_collator=data.collate,
                 callbacks=[HFTiming(timing, device, steps).callback])
    hf.train()
    results[f"transformers.Trainer {importlib.metadata.version('transformers')}"] = (
        timing, accuracy(model, data.val_dataloader(), device))
    return results


LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "intermediate_size": 5632, "vocab_size": 32000}  # TinyLlama-1.1B's shape
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 512}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}  # causal_lm.py's defaults, given to both


def save_random_llama(folder: Path, shape: dict, corpus: Path) -> None:
    """A randomly initialised Llama saved with save_pretrained (bf16), and a word-level tokenizer of its vocabulary
    size; `corpus` gets random words of it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(shape["vocab_size"] - 3))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False))
    model.to(torch.bfloat16).save_pretrained(folder)
    rng = random.Random(0)
    corpus.write_text(" ".join(rng.choices(words[3:], k=400_000 if shape is LLAMA_1B else 40_000)))


def run_lora_peers(opt, root: Path) -> dict:
    """causal_lm.py --model.finetune lora against peft + transformers.Trainer, each its own recipe, on the same saved
    Llama (1.1B shape, or tiny on CPU), tokens (the template's blocks of seq tokens), adapters (r 16 on q, k, v, o,
    gate, up, down), batch, steps, learning rate and precision. ms/step after the warm-up and peak memory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    shape, device = (TINY_LLAMA if opt.tiny else LLAMA_1B), torch.device("cpu" if opt.tiny else "cuda")
    folder, corpus, results = root / "model", root / "corpus.txt", {}
    save_random_llama(folder, shape, corpus)
    batch, seq = (4, 64) if opt.tiny else (opt.lora_batch_size, 2048)
    timing = Timing(opt.warmup)
    cli = causal_lm.main(["--model.name_or_path", str(folder), "--model.finetune", "lora", "--model.learning_rate",
                          "2e-4", "--model.compile", "false", "--data.data_path", str(corpus), "--data.block_size",
                          str(seq), "--data.batch_size", str(batch), "--trainer.max_steps", str(opt.steps),
                          "--trainer.precision", opt.precision, "--trainer.accelerator", opt.accelerator,
                          "--trainer.devices", "1", "--trainer.limit_val_batches", "0",
                          "--trainer.default_root_dir", str(root / "run")],
                         run=False, callbacks=(TrainerTiming(timing, opt.steps),))
    reset_peak(device)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    results["causal_lm.py --model.finetune lora (Lightning)"] = (timing, peak_memory(device))
    train_set = cli.datamodule.train_dataloader().dataset
    del cli
    gc.collect()
    reset_peak(device)
    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if not opt.tiny else torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA, target_modules=lightning_support.LORA_TARGETS["llama"],
                                             task_type="CAUSAL_LM"))
    timing = Timing(opt.warmup)
    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=batch, max_steps=opt.steps,
                             learning_rate=2e-4, bf16=not opt.tiny, use_cpu=opt.tiny, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)

    def collate(items):  # the template's (input, next token) blocks; transformers shifts the labels itself
        inputs = torch.stack([x for x, _ in items])
        return {"input_ids": inputs, "labels": inputs}

    Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate,
            callbacks=[HFTiming(timing, device, opt.steps).callback]).train()
    results[f"peft {importlib.metadata.version('peft')} + transformers.Trainer"] = (timing, peak_memory(device))
    return {"results": results, "batch x seq": f"{batch} x {seq}", "tokens": batch * seq}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def image_backbone(folder: Path, tiny: bool) -> Path:
    """A random ResNet-50 (its shape, no download) or a tiny ResNet, saved with save_pretrained beside a processor
    config (224 px, or 32 px tiny; resize to size / 0.875, center crop; ImageNet statistics)."""
    from transformers import AutoModelForImageClassification, ResNetConfig

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic") \
        if tiny else ResNetConfig()  # transformers' defaults are ResNet-50's
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    processor = {"size": {"shortest_edge": 32 if tiny else 224}, "crop_pct": 0.875, "resample": 2,
                 "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


class StepWindow(Callback):
    """Wall time from the end of step `start` to the end of step `end` (the device synchronized at both), and every
    step's loss as a device tensor (read after the run: no per-step sync)."""

    def __init__(self, start: int, end: int):
        self.start, self.end, self.times, self.losses = start, end, {}, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())
        if trainer.global_step in (self.start, self.end):
            sync(pl_module.device)
            self.times[trainer.global_step] = time.perf_counter()


def run_image(opt, root: Path) -> dict:
    """image_classifier.py (ResNet-50 shape, 224 px, bf16-mixed, channels-last; tiny: a small ResNet at 32 px on
    CPU) against a plain loop around the same module, loader, optimizer groups and schedule, and the loader alone
    (the data-loading bound). Validation is off in all three: only training steps are timed."""
    batch, steps, warmup = (8, 20, 5) if opt.tiny else (128, 60, 15)
    workers = 0 if opt.tiny else min(12, suggested_max_num_workers(1))
    images = image_classifier.make_shapes(root / "images", image_classifier.SHAPES, per_class=16 if opt.tiny else 128,
                                          size=48 if opt.tiny else 256)
    backbone = str(image_backbone(root / "backbone", opt.tiny))
    device = torch.device("cuda" if opt.accelerator == "gpu" else "cpu")
    data_args = {"data_path": str(images), "processor": backbone, "batch_size": batch, "num_workers": workers,
                 "val_fraction": 0.05, "test_fraction": 0.0}
    window = StepWindow(warmup, steps)
    cli = image_classifier.main(
        [*[a for k, v in data_args.items() if k != "processor" for a in (f"--data.{k}", str(v))],
         "--model.backbone", backbone, "--model.freeze_epochs", "0", "--trainer.max_steps", str(steps),
         "--trainer.accelerator", opt.accelerator, "--trainer.devices", "1", "--trainer.precision", opt.precision,
         "--trainer.check_val_every_n_epoch", "1000", "--trainer.num_sanity_val_steps", "0",
         "--trainer.default_root_dir", str(root / "run")], run=False, callbacks=(window,))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    timed = {"trainer": window.times[steps] - window.times[warmup]}
    trainer_losses = [float(v) for v in window.losses]

    torch.manual_seed(42)  # as the template's seed_everything: the same head and the same augmentation seeds
    data = image_classifier.ImageData(**data_args)
    data.setup("fit")
    model = image_classifier.ImageClassifier(backbone=backbone, freeze_epochs=0, class_names=data.classes,
                                             processing=data.processing)
    model.use_network(image_classifier.build_network(backbone, True, data.classes))  # as configure_model does
    model.to(device).train()
    groups: dict = {}  # as the support module's adamw(): backbone at lr x 0.1, no decay on 1-D parameters
    for name, p in model.named_parameters():
        scale = model.hparams.backbone_lr_scale if name.startswith(f"net.{model.net.base_model_prefix}.") else 1.0
        decay = model.hparams.weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((scale, decay), {"params": [], "weight_decay": decay, "lr": model.hparams.lr * scale}
                          )["params"].append(p)
    optimizer = torch.optim.AdamW(list(groups.values()), lr=model.hparams.lr, fused=True)
    epochs = cli.trainer.max_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 + math.cos(math.pi * min(e, epochs) /
                                                                                    epochs)) / 2)
    loader, epoch = data._loader("train", train=True), [0]
    loader.sampler.epoch = lambda: epoch[0]
    plain_losses, step = [], 0
    while step < steps:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=opt.precision.startswith("bf16")):
                loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=model.hparams.label_smoothing)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            plain_losses.append(loss.detach())
            step += 1
            if step in (warmup, steps):
                sync(device)
                timed[step] = time.perf_counter()
            if step == steps:
                break
        epoch[0] += 1
        scheduler.step()
    timed["plain"] = timed[steps] - timed[warmup]

    # The data-loading bound: the same training loader (workers, decoding, augmentation, the copy to the device)
    # with no model: the images/s no model can exceed with this loader on this machine.
    seen, start = 0, time.perf_counter()
    for _ in range(2):
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            seen += len(x)
    sync(device)
    timed["loader"] = (time.perf_counter() - start) / (seen / batch) * (steps - warmup)
    return {"timed": timed, "steps": steps - warmup, "batch": batch, "size": data.processing["size"],
            "workers": workers, "plain_losses": [float(v) for v in plain_losses], "trainer_losses": trainer_losses}


def sdpa_kernel_for(opt, config: dict, device: torch.device) -> str:
    """The attention kernel PyTorch picks for these shapes and switches: the choice compile also bakes in."""
    if opt.model_type != "gpt":
        return "-"  # transformers' GPT-2 may reshape q/k/v differently
    heads, width = config["n_head"], config["n_embd"]
    dtype = torch.bfloat16 if opt.precision.startswith("bf16") else torch.float32
    qkv = torch.randn(opt.batch_size, opt.seq_len, 3 * width, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.view(opt.batch_size, opt.seq_len, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # as GPTBlock
    return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True)).name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, the same steps (seconds)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per variant, warm-up included")
    parser.add_argument("--warmup", type=int, default=15, help="steps left out of the timing (compilation)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager mode")
    parser.add_argument("--model-type", choices=["gpt", "gpt2"], default="gpt",
                        help="gpt: the template's built-in GPT-2; gpt2: transformers' GPT2LMHeadModel")
    parser.add_argument("--no-bias", dest="bias", action="store_false", help="gpt without biases in linears/norms")
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="inductor's coordinate-descent kernel tuning (longer compilation)")
    parser.add_argument("--sdpa-backend", choices=["cudnn", "flash", "efficient"],
                        help="the template's --model.sdpa_backend, for both variants (default: PyTorch's choice)")
    parser.add_argument("--max-autotune", action="store_true",
                        help="inductor's max-autotune: Triton matmul templates with fused epilogues (long compile)")
    parser.add_argument("--trainer-only", action="store_true",
                        help="the causal LM template alone: no plain loop, no tabular run (to compare levers)")
    parser.add_argument("--peak-tflops", type=float,
                        help="dense peak of the card, for both MFUs (default: from its name; on CPU none)")
    parser.add_argument("--lora-batch-size", type=int, default=8, help="LoRA rows: sequences of 2048 a step")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    opt = parser.parse_args(argv)
    try:
        if opt.tiny:
            # Same steps as on a GPU: the template's throughput window (5 logging steps of 10) fills the same way.
            opt.batch_size, opt.seq_len, opt.workers, opt.compile = 4, 64, 0, False
        if opt.warmup >= opt.steps - 1:
            raise UsageError(f"--warmup {opt.warmup} leaves no timed steps out of --steps {opt.steps}")
        if not opt.tiny and not torch.cuda.is_available():
            raise UsageError("no CUDA GPU here: run with --tiny for the CPU check")
        for flag in ("coordinate_descent", "max_autotune"):
            if getattr(opt, flag) and not opt.compile:
                raise UsageError(f"--{flag.replace('_', '-')} tunes compiled kernels: not with --no-compile or --tiny")
        if not opt.bias and opt.model_type != "gpt":
            raise UsageError("--no-bias needs --model-type gpt (GPT2LMHeadModel always has biases)")
    except UsageError as err:
        print(f"bench.py: error: {err}", file=sys.stderr)
        return 2
    opt.accelerator, opt.precision = ("cpu", "32-true") if opt.tiny else ("gpu", "bf16-mixed")
    torch.set_float32_matmul_precision("high")  # what the templates' main() sets, for both variants
    config = {**(TINY_GPT if opt.tiny else GPT2_SMALL), **({} if opt.bias else {"bias": False})}
    inductor = importlib.import_module("torch._inductor.config")
    inductor.coordinate_descent_tuning = opt.coordinate_descent or inductor.coordinate_descent_tuning
    inductor.max_autotune = opt.max_autotune or inductor.max_autotune  # mode "max-autotune-no-cudagraphs"
    device = torch.device("cuda" if opt.accelerator == "gpu" else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = opt.peak_tflops
    if peak is None and device.type == "cuda":  # the template's table for cards Lightning lacks, then Lightning's
        peak = lightning_support.missing_peak_tflops(card, opt.precision) or (get_available_flops(device, torch.bfloat16)
                                                                       or 0) / 1e12 or None
    opt.peak = peak

    rows, checks = [], {}
    # Lightning's own output (model summary, progress bar) goes to stderr: stdout holds only the report.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        corpus = Path(tmp) / "corpus.txt"
        write_corpus(corpus, (opt.steps + 2) * opt.batch_size * (opt.seq_len + 1) * 21 // 20)
        results = {}
        levers = [("no bias", not opt.bias), (f"{opt.sdpa_backend} attention", opt.sdpa_backend),
                  ("max-autotune", opt.max_autotune), ("coordinate descent", opt.coordinate_descent)]
        model = ", ".join([opt.model_type] + [name for name, on in levers if on])
        plain_name, trainer_name = f"plain PyTorch loop ({model})", f"causal_lm.py ({model}, Trainer)"
        for variant in ([] if opt.trainer_only else [plain_name]) + [trainer_name]:
            gc.collect()
            torch._dynamo.reset()  # each variant compiles its own graphs
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if variant == plain_name:
                timing, extra = run_lm_plain(opt, corpus, config), {}
            else:
                timing, flops_per_batch, reported, n_params = run_lm_trainer(opt, corpus, Path(tmp) / "run", config)
                extra = {"template_flops_per_batch": flops_per_batch, "template_mfu": reported, "params": n_params}
            results[variant] = (timing, peak_memory(device), extra)

        extra = results[trainer_name][2]
        per_token = 6 * extra["params"] + 12 * config["n_layer"] * opt.seq_len * config["n_embd"]
        plain_ms = None if opt.trainer_only else 1000 * results[plain_name][0].seconds / results[plain_name][0].steps
        for variant, (timing, memory, _) in results.items():
            ms = 1000 * timing.seconds / timing.steps
            tokens = opt.batch_size * opt.seq_len / (ms / 1000)
            mfu = tokens * per_token / (peak * 1e12) if peak else None
            rows.append({"variant": variant, "card": card, "batch x seq": f"{opt.batch_size} x {opt.seq_len}",
                         "ms/step": round(ms, 2), "tokens/s": round(tokens), "MFU": mfu,
                         "ratio": ms / plain_ms if plain_ms else None, "peak memory": memory})
        trainer_mfu = next(r["MFU"] for r in rows if r["variant"] == trainer_name)
        trainer_losses = results[trainer_name][0].loss_values()
        plain_losses = trainer_losses if opt.trainer_only else results[plain_name][0].loss_values()
        tolerance = 1e-4 if opt.tiny else 2e-2  # float32 on CPU; bf16 on GPU
        # Step by step from the first step: a different initialisation or data order shows in the early losses.
        same = all(abs(a - b) <= tolerance * abs(a) for a, b in zip(plain_losses, trainer_losses))
        checks = {
            "loss_falls": statistics.mean(trainer_losses[-3:]) < statistics.mean(trainer_losses[:3]),
            "same_loss": None if opt.trainer_only else (same and len(plain_losses) == len(trainer_losses)
                                                        == opt.steps),
            "final_loss_plain": None if opt.trainer_only else plain_losses[-1],
            "final_loss_trainer": trainer_losses[-1],
            "flops_per_token_formula": per_token,
            "flops_per_token_template": extra["template_flops_per_batch"] / (opt.batch_size * opt.seq_len),
            "mfu_template_monitor": extra["template_mfu"],
            # Same run, two clocks: the monitor's last 4 logging intervals against the timed steps after warm-up.
            "mfu_monitor_over_bench": extra["template_mfu"] / trainer_mfu if extra["template_mfu"] and trainer_mfu
            else None,
        }
        if not opt.trainer_only:
            plain, trainer = run_tabular(opt, Path(tmp) / "tabular")
            for variant, run in (("tabular plain loop (CPU)", plain), ("tabular.py (Trainer, CPU)", trainer)):
                rows.append({"variant": variant, "card": "CPU", "batch x seq": "64 x 64 features",
                             "ms/step": round(run["ms_per_step"], 3), "tokens/s": None, "MFU": None,
                             "ratio": run["ms_per_step"] / plain["ms_per_step"], "peak memory": "-"})
            checks.update({f"tabular_{key}_{name}": round(run[key], 4) for name, run in
                           (("plain", plain), ("trainer", trainer)) for key in ("val_acc", "fit_seconds")})
            image = run_image(opt, Path(tmp) / "image")
            name = "tiny ResNet" if opt.tiny else "ResNet-50"
            plain_ms = 1000 * image["timed"]["plain"] / image["steps"]
            for variant, key in ((f"image plain loop ({name})", "plain"),
                                 (f"image_classifier.py ({name}, Trainer)", "trainer"),
                                 ("image loader alone (no model)", "loader")):
                ms = 1000 * image["timed"][key] / image["steps"]
                rows.append({"variant": variant, "card": card, "batch x seq": f"{image['batch']} x {image['size']} px",
                             "ms/step": round(ms, 2), "tokens/s": round(image["batch"] / ms * 1000), "MFU": None,
                             "ratio": ms / plain_ms, "peak memory": "-"})
            plain, trainer = image["plain_losses"], image["trainer_losses"]
            if opt.tiny:  # float32 on a CPU: the same computation, so the same loss at every step
                same = all(abs(a - b) <= tolerance * abs(a) for a, b in zip(plain, trainer))
            else:  # cuDNN's kernels are not deterministic and early AdamW steps amplify that: single steps differ by
                # up to 13% (measured); the same training shows as the last 10 steps' mean loss within 3%
                same = abs(statistics.mean(plain[-10:]) - statistics.mean(trainer[-10:])) <= 0.03 * statistics.mean(
                    plain[-10:])
            checks["image_same_loss"] = len(plain) == len(trainer) and same
            checks["image_loader_workers"] = image["workers"]
            peers = run_finetune_peers(opt, Path(tmp) / "finetune")
            name, hf_ms = "tiny BERT" if opt.tiny else "BERT-base", None
            for variant, (timing, val_acc) in reversed(peers.items()):  # the peer first: the ratio's reference
                ms = 1000 * timing.seconds / timing.steps
                hf_ms = hf_ms or ms
                rows.append({"variant": f"{variant}, {name}", "card": card, "batch x seq": f"{FINETUNE_BATCH} x"
                             " longest text", "ms/step": round(ms, 2), "tokens/s": round(FINETUNE_BATCH / ms * 1000),
                             "MFU": None, "ratio": ms / hf_ms, "peak memory": "-"})
                checks[f"finetune_val_acc {variant}"] = round(val_acc, 4)
            lora = run_lora_peers(opt, Path(tmp) / "lora")
            name, peer_ms = "tiny Llama" if opt.tiny else "Llama 1.1B", None
            for variant, (timing, memory) in reversed(lora["results"].items()):
                ms = 1000 * timing.seconds / timing.steps
                peer_ms = peer_ms or ms
                rows.append({"variant": f"{variant}, {name}", "card": card, "batch x seq": lora["batch x seq"],
                             "ms/step": round(ms, 2), "tokens/s": round(lora["tokens"] / ms * 1000), "MFU": None,
                             "ratio": ms / peer_ms, "peak memory": memory})

    checks["sdpa_kernel"] = sdpa_kernel_for(opt, config, device)
    checks["cudnn"] = torch.backends.cudnn.version()
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows, "checks": checks,
              "command": " ".join(["python", "bench/bench.py", *(argv if argv is not None else sys.argv[1:])])}
    if opt.format == "json":
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"{report['date']}, torch {report['torch']}: {report['command']}")
        print("| variant | card | batch x seq | ms/step | tokens/s (images/s, samples/s) | MFU | ratio to reference"
              " | peak memory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            mfu = f"{r['MFU']:.1%}" if r["MFU"] is not None else "-"
            tokens = f"{r['tokens/s']:,}" if r["tokens/s"] is not None else "-"
            ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
            print(f"| {r['variant']} | {r['card']} | {r['batch x seq']} | {r['ms/step']} | {tokens} | {mfu} |"
                  f" {ratio} | {r['peak memory']} |")
        for key, value in checks.items():
            print(f"{key}: {value}")
    return 0 if checks["loss_falls"] and checks["same_loss"] is not False and checks.get("image_same_loss") is not \
        False else 1


if __name__ == "__main__":
    sys.exit(main())
