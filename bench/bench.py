"""Benchmark: the templates through Lightning's Trainer against plain PyTorch loops and the tools users would pick
instead, side by side on the same card, one table a run.

Row groups (--rows, in the order given): lm: causal_lm.py against a plain loop with the same GPT-2 model, data,
optimizer, schedule, clipping and precision, step by step the same losses. tabular: tabular.py against a plain loop on
CPU. image: image_classifier.py (ResNet-50 shape, 224 px, bf16-mixed, channels-last, 128 a batch) against a plain
loop and the loader alone. finetune: transformers_finetune.py against transformers.Trainer (BERT-base shape). lora:
causal_lm.py --model.finetune lora against peft + transformers.Trainer (TinyLlama-1.1B's shape). litgpt: causal_lm.py
against litgpt's pretrain recipe (the same 1.1B Llama, random tokens, seq 2048; litgpt in its own environment). Peers
run with their own recipes; their versions are in the rows, litgpt's command in the checks. Columns: ms/step, tokens/s
(images/s, samples/s), MFU, ratio of ms/step to the reference (the plain loop, or the peer), peak memory.

Usage:
    python bench/bench.py                         # GPU: every row group but litgpt
    python bench/bench.py --batch-size 32 --no-bias --steps 80 --format json
    python bench/bench.py --trainer-only --sdpa-backend cudnn   # one lever at a time (or --max-autotune, ...)
    python bench/bench.py --tiny                  # CPU, tiny shapes, seconds: the same code (run by the tests)
The device run, most valuable rows first (litgpt pins huggingface-hub<1.4 and jsonargparse<=4.41, which conflict with
transformers 5: its own environment, from wheels fetched here and carried to the device):
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform any \
        -d bench/wheels litgpt==0.5.13 jsonargparse==4.41.0 huggingface_hub==1.3.7 typeshed_client==2.15.0 \
        docstring_parser==0.18.0 peft==0.21.2 accelerate==1.16.0    # and the rest of `pip freeze` of a litgpt venv
    python -m venv --system-site-packages /tmp/lit && /tmp/lit/bin/pip install --no-index -f bench/wheels litgpt
    pip install --no-index -f bench/wheels peft accelerate
    python bench/bench.py --rows litgpt,finetune,lora --litgpt-python /tmp/lit/bin/python --keep-going
    python bench/bench.py --trainer-only --batch-size 64 --no-bias --coordinate-descent    # GPT-2 past 560k tokens/s
MFU = tokens/s x (6 x parameters + 12 x layers x seq x width) / peak FLOP/s (989e12 for H100/H200 SXM in bf16).
"""

import argparse
import contextlib
import gc
import json
import math
import random
import re
import statistics
import string
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
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
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
FINETUNE_BATCH = 32
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "intermediate_size": 5632, "vocab_size": 32000}  # TinyLlama-1.1B's shape
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 512}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}  # causal_lm.py's defaults, given to both


class UsageError(ValueError):
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "-"


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

    @property
    def ms(self) -> float:
        return 1000 * self.seconds / self.steps

    def loss_values(self) -> list:
        return [float(v) for v in self.losses]


class TrainerTiming(Callback):
    def __init__(self, timing: Timing, total: int):
        self.timing, self.total = timing, total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.timing.step_done(step, outputs["loss"], pl_module.device, last=step == self.total)


def flags(**groups) -> list:
    """flags(data={"batch_size": 4}) -> ["--data.batch_size", "4"]; dicts and booleans as JSON."""
    return [a for group, values in groups.items() for key, value in values.items()
            for a in (f"--{group}.{key}", json.dumps(value) if isinstance(value, (dict, bool)) else str(value))]


def fit_timed(template, opt, args: list, peak: bool = False, **trainer) -> tuple:
    """A template's CLI on one device for --steps steps without validation, fitted with its steps timed."""
    timing = Timing(opt.warmup)
    trainer = {"max_steps": opt.steps, "precision": opt.precision, "accelerator": opt.accelerator, "devices": 1,
               "limit_val_batches": 0, **trainer}
    args = [*args, *flags(trainer=trainer, **({"throughput": {"peak_tflops": opt.peak}} if peak and opt.peak else {}))]
    cli = template.main(args, run=False, callbacks=(TrainerTiming(timing, opt.steps),))
    reset_peak(opt.device)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, timing


def hf_train(opt, root: Path, model, train_set, collate, batch: int, lr: float, **extra) -> Timing:
    """transformers.Trainer for --steps steps (no saving, logging or progress bar), timed as the template is."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    timing = Timing(opt.warmup)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timing.step_done(state.global_step, torch.zeros(()), opt.device, last=state.global_step == opt.steps)

    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=batch, max_steps=opt.steps,
                             learning_rate=lr, bf16=not opt.tiny, use_cpu=opt.tiny, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, **extra)
    Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate, callbacks=[Clock()]).train()
    return timing


def decay_groups(params: list, weight_decay: float) -> list:
    """As the templates' adamw(): no weight decay on 1-D parameters (biases, norms)."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_token(params: int, layers: int, seq: int, width: int) -> int:
    return 6 * params + 12 * layers * seq * width


def mfu_of(opt, per_s: float, per_token: int):
    return per_s * per_token / (opt.peak * 1e12) if opt.peak else None


def same_steps(a: list, b: list, tolerance: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance * abs(x) for x, y in zip(a, b))


def row(variant: str, card: str, shape: str, ms: float, per_s, ratio, mfu=None, memory: str = "-") -> dict:
    return {"variant": variant, "card": card, "batch x seq": shape, "ms/step": round(ms, 3 if ms < 10 else 2),
            "tokens/s": None if per_s is None else round(per_s), "MFU": mfu, "ratio": ratio, "peak memory": memory}


def add_rows(rows: list, card: str, shape: str, runs: list) -> None:
    """runs: (variant, ms/step, items/s, MFU, peak memory), the ratio's reference (plain loop or peer) first."""
    rows += [row(variant, card, shape, ms, per_s, ms / runs[0][1], mfu, memory)
             for variant, ms, per_s, mfu, memory in runs]


def write_corpus(path: Path, n_bytes: int) -> None:
    """Random printable text: the template's byte tokenizer turns it into as many tokens as needed, no epoch ends."""
    path.write_text("".join(random.Random(0).choices(string.ascii_letters + string.digits + " .,\n", k=n_bytes)))


def lm_kwargs(opt, corpus: Path) -> tuple:
    """The data and model arguments causal_lm.py gets on its command line and the plain loop as keywords."""
    data = {"data_path": str(corpus), "block_size": opt.seq_len, "batch_size": opt.batch_size,
            "num_workers": opt.workers}
    model = {"model_type": opt.model_type, "model_config": opt.config, "compile": opt.compile,
             **({"sdpa_backend": opt.sdpa_backend} if opt.sdpa_backend else {}), **LM_HPARAMS}
    return data, model


def run_lm_trainer(opt, corpus: Path, root: Path) -> tuple:
    data, model = lm_kwargs(opt, corpus)
    cli, timing = fit_timed(causal_lm, opt, flags(data=data, model=model), peak=True,  # one peak for both MFUs
                            default_root_dir=root)
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, lightning_support.Throughput))
    reported = monitor._throughputs[RunningStage.TRAINING].compute().get("device/mfu")
    return timing, cli.model.flops_per_batch, reported, n_params(cli.model)


def run_lm_plain(opt, corpus: Path) -> Timing:
    """The loop a careful engineer writes by hand around the same module, data and optimizer settings."""
    device, (data_kwargs, model_kwargs) = opt.device, lm_kwargs(opt, corpus)
    L.seed_everything(42, verbose=False)  # as the template does before it builds the model (and data order)
    data = causal_lm.TextData(**data_kwargs)
    data.setup("fit")
    module = causal_lm.CausalLM(vocab_size=data.vocab_size, **model_kwargs)
    module.configure_model()  # as under the Trainer: load_or_build draws the weights on the CPU, then they move
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(decay_groups(params, WEIGHT_DECAY), lr=LM_HPARAMS["learning_rate"], betas=BETAS,
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


def rows_lm(opt, root: Path, rows: list, checks: dict) -> None:
    """GPT-2 small (tiny on CPU): causal_lm.py against the plain loop, step by step the same losses."""
    root.mkdir(parents=True)
    corpus, config = root / "corpus.txt", opt.config
    write_corpus(corpus, (opt.steps + 2) * opt.batch_size * (opt.seq_len + 1) * 21 // 20)
    levers = [("no bias", not opt.bias), (f"{opt.sdpa_backend} attention", opt.sdpa_backend),
              ("max-autotune", opt.max_autotune), ("coordinate descent", opt.coordinate_descent)]
    model = ", ".join([opt.model_type] + [name for name, on in levers if on])
    runs = []  # (variant, timing, peak memory): the plain loop (the reference) first
    for plain in [False] if opt.trainer_only else [True, False]:
        gc.collect()
        torch._dynamo.reset()  # each variant compiles its own graphs
        reset_peak(opt.device)
        if plain:
            runs.append((f"plain PyTorch loop ({model})", run_lm_plain(opt, corpus), peak_memory(opt.device)))
        else:
            timing, flops_per_batch, monitor_mfu, params = run_lm_trainer(opt, corpus, root / "run")
            runs.append((f"causal_lm.py ({model}, Trainer)", timing, peak_memory(opt.device)))
    per_token = flops_per_token(params, config["n_layer"], opt.seq_len, config["n_embd"])
    for variant, run, memory in runs:
        tokens = opt.batch_size * opt.seq_len / (run.ms / 1000)
        rows.append(row(variant, opt.card, f"{opt.batch_size} x {opt.seq_len}", run.ms, tokens,
                        None if opt.trainer_only else run.ms / runs[0][1].ms, mfu_of(opt, tokens, per_token), memory))
    trainer_mfu, trainer_losses = rows[-1]["MFU"], timing.loss_values()
    plain_losses = trainer_losses if opt.trainer_only else runs[0][1].loss_values()
    tolerance = 1e-4 if opt.tiny else 2e-2  # float32 on CPU; bf16 on GPU
    checks.update({
        "loss_falls": statistics.mean(trainer_losses[-3:]) < statistics.mean(trainer_losses[:3]),
        # Step by step from the first step: a different initialisation or data order shows in the early losses.
        "same_loss": None if opt.trainer_only else (same_steps(plain_losses, trainer_losses, tolerance)
                                                    and len(trainer_losses) == opt.steps),
        "final_loss_plain": None if opt.trainer_only else plain_losses[-1],
        "final_loss_trainer": trainer_losses[-1],
        "flops_per_token_formula": per_token,
        "flops_per_token_template": flops_per_batch / (opt.batch_size * opt.seq_len),
        "mfu_template_monitor": monitor_mfu,
        # Same run, two clocks: the monitor's last 4 logging intervals against the timed steps after warm-up.
        "mfu_monitor_over_bench": monitor_mfu / trainer_mfu if monitor_mfu and trainer_mfu else None,
        "sdpa_kernel": sdpa_kernel_for(opt)})


def sdpa_kernel_for(opt) -> str:
    """The attention kernel PyTorch picks for these shapes and switches: the choice compile also bakes in."""
    if opt.model_type != "gpt":
        return "-"  # transformers' GPT-2 may reshape q/k/v differently
    heads, width = opt.config["n_head"], opt.config["n_embd"]
    dtype = torch.bfloat16 if opt.precision.startswith("bf16") else torch.float32
    qkv = torch.randn(opt.batch_size, opt.seq_len, 3 * width, device=opt.device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.view(opt.batch_size, opt.seq_len, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # as GPTBlock
    return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True)).name


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


def rows_tabular(opt, root: Path, rows: list, checks: dict) -> None:
    """tabular.py on the embedded digits as shipped (validation, checkpoints and logging every epoch) against a plain
    loop that trains and validates the same module on the same data."""
    epochs, clock = 3 if opt.tiny else 10, StepClock()
    cli = tabular.main(flags(trainer={"max_epochs": epochs, "accelerator": "cpu", "devices": 1,
                                      "default_root_dir": root}), run=False, callbacks=(clock,))
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    trainer_run = {"ms_per_step": median_step_ms(clock.epochs), "fit_seconds": time.perf_counter() - start,
                   "val_acc": float(cli.trainer.callback_metrics["val_acc"])}

    torch.manual_seed(42)
    data = tabular.TableData()
    data.setup("fit")
    model = tabular.TabularModel(features=data.features, target=data.target)
    groups = decay_groups([p for p in model.parameters() if p.requires_grad], model.hparams.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=model.hparams.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 + math.cos(math.pi * e / epochs)) / 2)
    start, times = time.perf_counter(), []
    for _ in range(epochs):
        model.train()
        times.append([])
        for numeric, codes, y in data.train_dataloader():
            model.loss(model(numeric, codes), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[-1].append(time.perf_counter())
        model.eval()
        with torch.no_grad():
            correct = sum((model(n, c).argmax(-1) == y).sum().item() for n, c, y in data.val_dataloader())
        scheduler.step()
    plain_run = {"ms_per_step": median_step_ms(times), "fit_seconds": time.perf_counter() - start,
                 "val_acc": correct / len(data.datasets["val"])}
    add_rows(rows, "CPU", "64 x 64 features", [(variant, run["ms_per_step"], None, None, "-") for variant, run in (
        ("tabular plain loop (CPU)", plain_run), ("tabular.py (Trainer, CPU)", trainer_run))])
    checks.update({f"tabular_{key}_{name}": round(run[key], 4) for name, run in
                   (("plain", plain_run), ("trainer", trainer_run)) for key in ("val_acc", "fit_seconds")})


def accuracy(model, loader, device: torch.device) -> float:
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        right = sum((model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)
                           ).logits.argmax(-1).cpu() == b["labels"]).sum().item() for b in loader)
    return right / len(loader.dataset)


def rows_finetune(opt, root: Path, rows: list, checks: dict) -> None:
    """transformers_finetune.py against transformers.Trainer, each with its own recipe, on the same BERT shape (random
    init: base, or tiny on CPU), data (the embedded reviews through the template's word vocabulary, batches padded
    to their longest text), batch, steps, learning rate, linear warm-up (10%), clipping and precision."""
    from transformers import AutoModelForSequenceClassification, set_seed

    shape, lr = ({}, 1e-3) if opt.tiny else (BERT_BASE, 1e-4)  # from scratch: a tiny model takes more
    cli, timing = fit_timed(transformers_finetune, opt, flags(
        model={"model_config": shape, "learning_rate": lr},
        data={"batch_size": FINETUNE_BATCH, "num_workers": opt.workers}), default_root_dir=root)
    data, device = cli.datamodule, opt.device
    val_acc = accuracy(cli.model.model.to(device), data.val_dataloader(), device)
    set_seed(42)
    model = AutoModelForSequenceClassification.from_config(lightning_support.transformers_config(
        "bert", transformers_finetune.TINY_BERT, shape, vocab_size=data.vocab_size, num_labels=data.num_labels))
    hf = hf_train(opt, root, model, data.train_set, data.collate, FINETUNE_BATCH, lr, weight_decay=0.01,
                  warmup_steps=int(0.1 * opt.steps), max_grad_norm=1.0, lr_scheduler_type="linear",
                  optim="adamw_torch_fused", dataloader_num_workers=opt.workers)
    runs = [(f"transformers.Trainer {version('transformers')}", hf, accuracy(model, data.val_dataloader(), device)),
            ("transformers_finetune.py (Lightning)", timing, val_acc)]
    name = "tiny BERT" if opt.tiny else "BERT-base"
    add_rows(rows, opt.card, f"{FINETUNE_BATCH} x longest text",
             [(f"{variant}, {name}", t.ms, FINETUNE_BATCH / t.ms * 1000, None, "-") for variant, t, _ in runs])
    checks.update({f"finetune_val_acc {variant}": round(acc, 4) for variant, _, acc in runs})


def save_random_llama(folder: Path, shape: dict, corpus: Path) -> None:
    """A random Llama saved with save_pretrained (bf16), a word-level tokenizer of its vocabulary size, and `corpus`
    of random words of it."""
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
    corpus.write_text(" ".join(random.Random(0).choices(words[3:], k=400_000 if shape is LLAMA_1B else 40_000)))


def rows_lora(opt, root: Path, rows: list, checks: dict) -> None:
    """causal_lm.py --model.finetune lora against peft + transformers.Trainer, each its own recipe, on the same saved
    Llama (1.1B shape, or tiny on CPU), tokens (the template's blocks of seq tokens), adapters (r 16 on q, k, v, o,
    gate, up, down), batch, steps, learning rate and precision. ms/step after the warm-up and peak memory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    folder, corpus = root / "model", root / "corpus.txt"
    save_random_llama(folder, TINY_LLAMA if opt.tiny else LLAMA_1B, corpus)
    batch, seq = (4, 64) if opt.tiny else (opt.lora_batch_size, 2048)
    cli, timing = fit_timed(causal_lm, opt, flags(
        model={"name_or_path": folder, "finetune": "lora", "learning_rate": "2e-4", "compile": False},
        data={"data_path": corpus, "block_size": seq, "batch_size": batch}), default_root_dir=root / "run")
    runs = [("causal_lm.py --model.finetune lora (Lightning)", timing, peak_memory(opt.device))]
    train_set = cli.datamodule.train_dataloader().dataset
    del cli
    gc.collect()
    reset_peak(opt.device)
    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if opt.tiny else torch.bfloat16)
    model = get_peft_model(model, LoraConfig(**LORA, target_modules=lightning_support.LORA_TARGETS["llama"],
                                             task_type="CAUSAL_LM"))

    def collate(items):  # the template's (input, next token) blocks; transformers shifts the labels itself
        inputs = torch.stack([x for x, _ in items])
        return {"input_ids": inputs, "labels": inputs}

    timing = hf_train(opt, root, model, train_set, collate, batch, 2e-4)
    runs.insert(0, (f"peft {version('peft')} + transformers.Trainer", timing, peak_memory(opt.device)))
    name = "tiny Llama" if opt.tiny else "Llama 1.1B"
    add_rows(rows, opt.card, f"{batch} x {seq}",
             [(f"{variant}, {name}", t.ms, batch * seq / t.ms * 1000, None, memory) for variant, t, memory in runs])


# litgpt's pretrain reads its data through a litgpt DataModule named on its command line: this one serves the same
# random token blocks (a .npy file) that causal_lm.py reads, in blocks of max_seq_length + 1 (input and next token).
LITGPT_DATA = """from dataclasses import dataclass
import numpy as np, torch
from litgpt.data import DataModule
from torch.utils.data import DataLoader, Dataset

class Blocks(Dataset):
    def __init__(self, path, n):
        self.ids, self.n = np.load(path, mmap_mode="r"), n
    def __len__(self):
        return (len(self.ids) - 1) // self.n
    def __getitem__(self, i):
        return torch.from_numpy(self.ids[i * self.n: (i + 1) * self.n + 1].astype(np.int64))

@dataclass
class TokenFile(DataModule):
    path: str = ""
    num_workers: int = 2
    def connect(self, tokenizer=None, batch_size=1, max_seq_length=-1):
        self.batch_size, self.seq_length = batch_size, max_seq_length
    def train_dataloader(self):
        return DataLoader(Blocks(self.path, self.seq_length), self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, pin_memory=True)
    def val_dataloader(self):
        return DataLoader(Blocks(self.path, self.seq_length), self.batch_size)
"""


def litgpt_config(shape: dict, seq: int) -> dict:
    """The same Llama in litgpt's names (TinyLlama-1.1B's shape is litgpt's "tiny-llama-1.1b")."""
    return {"name": "bench-llama", "block_size": seq, "vocab_size": shape["vocab_size"],
            "padded_vocab_size": shape["vocab_size"], "n_layer": shape["num_hidden_layers"],
            "n_head": shape["num_attention_heads"], "n_embd": shape["hidden_size"],
            "n_query_groups": shape["num_key_value_heads"], "intermediate_size": shape["intermediate_size"],
            "rotary_percentage": 1.0, "parallel_residual": False, "bias": False, "norm_class_name": "RMSNorm",
            "mlp_class_name": "LLaMAMLP", "norm_eps": 1e-5}


def litgpt_tokens_per_s(out_dir: Path, warmup: int) -> tuple:
    """Median tokens/s (and MFU, where Lightning knows the card) of litgpt's ThroughputMonitor windows (5 steps each)
    that start after the warm-up, from its CSV log."""
    import csv

    rows = [r for f in out_dir.rglob("metrics.csv") for r in csv.DictReader(f.open())]
    timed = [r for r in rows if r.get("device/items_per_sec") and float(r["iter"]) > warmup + 5]
    if not timed:
        raise RuntimeError(f"litgpt logged no throughput after step {warmup + 5} under {out_dir}")
    mfu = [float(r["device/mfu"]) for r in timed if r.get("device/mfu")]
    return (statistics.median(float(r["device/items_per_sec"]) for r in timed),
            statistics.median(mfu) if mfu else None)


def rows_litgpt(opt, root: Path, rows: list, checks: dict) -> None:
    """causal_lm.py against litgpt's pretrain recipe (its own environment: --litgpt-python), pretraining the same
    randomly initialised Llama (TinyLlama-1.1B's shape, or tiny on CPU) on the same random tokens, batch, sequence
    length, steps and precision; both compile (litgpt always does). tokens/s after the warm-up."""
    import numpy as np

    shape = TINY_LLAMA if opt.tiny else LLAMA_1B
    batch, seq = (4, 64) if opt.tiny else (opt.llama_batch_size, 2048)
    root.mkdir(parents=True)
    tokens = root / "tokens.npy"
    ids = np.random.default_rng(0).integers(0, shape["vocab_size"], (opt.steps + 2) * batch * (seq + 1) * 2)
    ids[0] = shape["vocab_size"] - 1  # the template sizes its vocabulary from the largest id
    np.save(tokens, ids.astype(np.uint16))
    config = {k: v for k, v in shape.items() if k != "vocab_size"} | {"max_position_embeddings": seq}
    cli, timing = fit_timed(causal_lm, opt, flags(
        model={"model_type": "llama", "model_config": config, "compile": not opt.tiny},
        data={"data_path": tokens, "block_size": seq, "batch_size": batch, "num_workers": opt.workers}),
        peak=True, default_root_dir=root / "run")
    per_token = flops_per_token(n_params(cli.model), shape["num_hidden_layers"], seq, shape["hidden_size"])
    runs = [("causal_lm.py (Lightning Trainer)", batch * seq * timing.steps / timing.seconds, peak_memory(opt.device))]
    del cli
    gc.collect()
    reset_peak(opt.device)
    (root / "bench_litgpt_data.py").write_text(LITGPT_DATA)
    command = [opt.litgpt_python, "-m", "litgpt", "pretrain", "bench-llama", "--model_config",
               json.dumps(litgpt_config(shape, seq)), "--data", "bench_litgpt_data.TokenFile",
               *flags(data={"path": tokens, "num_workers": opt.workers},
                      train={"micro_batch_size": batch, "global_batch_size": batch, "max_seq_length": seq,
                             "max_tokens": opt.steps * batch * seq, "lr_warmup_steps": 10,
                             "save_interval": 10 * opt.steps},
                      eval={"interval": 10 * opt.steps, "final_validation": False}),
               "--precision", opt.precision, "--devices", "1", "--logger_name", "csv", "--out_dir", str(root / "lit")]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)  # -m: the DataModule imports from cwd
    if done.returncode:
        raise RuntimeError(f"litgpt pretrain failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    litgpt = subprocess.run([opt.litgpt_python, "-c", "import importlib.metadata as m; print(m.version('litgpt'))"],
                            capture_output=True, text=True).stdout.strip()
    tokens_per_s, litgpt_mfu = litgpt_tokens_per_s(root / "lit", opt.warmup)
    used = re.search(r"Memory Used\s*:\s*([\d.]+) GB", done.stdout)  # its max_memory_allocated, in 1e9 bytes
    runs.insert(0, (f"litgpt {litgpt} pretrain", tokens_per_s, f"{float(used[1]) * 1e9 / 2**30:.1f} GiB" if used
                    else "-"))
    name = "tiny Llama" if opt.tiny else "Llama 1.1B"
    add_rows(rows, opt.card, f"{batch} x {seq}", [
        (f"{variant}, {name} pretraining", 1000 * batch * seq / per_s, per_s, mfu_of(opt, per_s, per_token), memory)
        for variant, per_s, memory in runs])
    checks.update({"litgpt_mfu_reported": litgpt_mfu, "litgpt_command": " ".join(command[1:])})


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


def rows_image(opt, root: Path, rows: list, checks: dict) -> None:
    """image_classifier.py (ResNet-50 shape, 224 px, bf16-mixed, channels-last; tiny: a small ResNet at 32 px on
    CPU) against a plain loop around the same module, loader, optimizer groups and schedule, and the loader alone
    (the data-loading bound). Validation is off in all three: only training steps are timed."""
    batch, steps, warmup = (8, 20, 5) if opt.tiny else (128, 60, 15)
    workers, device = 0 if opt.tiny else min(12, suggested_max_num_workers(1)), opt.device
    images = image_classifier.make_shapes(root / "images", image_classifier.SHAPES, per_class=16 if opt.tiny else 128,
                                          size=48 if opt.tiny else 256)
    backbone = str(image_backbone(root / "backbone", opt.tiny))
    data_args = {"data_path": str(images), "batch_size": batch, "num_workers": workers, "val_fraction": 0.05,
                 "test_fraction": 0.0}
    trainer = Timing(warmup)
    cli = image_classifier.main(flags(
        data=data_args, model={"backbone": backbone, "freeze_epochs": 0},
        trainer={"max_steps": steps, "accelerator": opt.accelerator, "devices": 1, "precision": opt.precision,
                 "check_val_every_n_epoch": 1000, "num_sanity_val_steps": 0, "default_root_dir": root / "run"}),
        run=False, callbacks=(TrainerTiming(trainer, steps),))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    torch.manual_seed(42)  # as the template's seed_everything: the same head and the same augmentation seeds
    data = image_classifier.ImageData(processor=backbone, **data_args)
    data.setup("fit")
    model = image_classifier.ImageClassifier(backbone=backbone, freeze_epochs=0, class_names=data.classes,
                                             processing=data.processing)
    model.use_network(image_classifier.build_network(backbone, True, data.classes))  # as configure_model does
    model.to(device).train()
    hp, groups = model.hparams, {}  # as the support module's adamw(): backbone at lr x 0.1, no decay on 1-D
    for name, p in model.named_parameters():
        scale = hp.backbone_lr_scale if name.startswith(f"net.{model.net.base_model_prefix}.") else 1.0
        decay = hp.weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((scale, decay), {"params": [], "weight_decay": decay, "lr": hp.lr * scale}
                          )["params"].append(p)
    optimizer = torch.optim.AdamW(list(groups.values()), lr=hp.lr, fused=True)
    epochs = cli.trainer.max_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 + math.cos(math.pi * min(e, epochs) /
                                                                                    epochs)) / 2)
    loader, epoch = data._loader("train", train=True), [0]
    loader.sampler.epoch = lambda: epoch[0]
    plain, step = Timing(warmup), 0
    while step < steps:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=opt.precision.startswith("bf16")):
                loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=hp.label_smoothing)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            plain.step_done(step, loss, device, last=step == steps)
            if step == steps:
                break
        epoch[0] += 1
        scheduler.step()

    # The data-loading bound: the same training loader (workers, decoding, augmentation, the copy to the device)
    # with no model: the images/s no model can exceed with this loader on this machine.
    seen, start = 0, time.perf_counter()
    for _ in range(2):
        for x, _ in loader:
            seen += len(x.to(device, non_blocking=True))
    sync(device)
    loader_ms, name = 1000 * (time.perf_counter() - start) / (seen / batch), "tiny ResNet" if opt.tiny else "ResNet-50"
    runs = [(f"image plain loop ({name})", plain.ms), (f"image_classifier.py ({name}, Trainer)", trainer.ms),
            ("image loader alone (no model)", loader_ms)]
    add_rows(rows, opt.card, f"{batch} x {data.processing['size']} px",
             [(variant, ms, batch / ms * 1000, None, "-") for variant, ms in runs])
    plain, trainer = plain.loss_values(), trainer.loss_values()
    if opt.tiny:  # float32 on a CPU: the same computation, so the same loss at every step
        same = same_steps(plain, trainer, 1e-4)
    else:  # cuDNN's kernels are not deterministic and early AdamW steps amplify that: single steps differ by up to
        # 13% (measured); the same training shows as the last 10 steps' mean loss within 3%
        mean = statistics.mean(plain[-10:])
        same = len(plain) == len(trainer) and abs(mean - statistics.mean(trainer[-10:])) <= 0.03 * mean
    checks.update({"image_same_loss": same, "image_loader_workers": workers})


ROW_GROUPS = {"lm": rows_lm, "tabular": rows_tabular, "image": rows_image, "finetune": rows_finetune,
              "lora": rows_lora, "litgpt": rows_litgpt}


def shown(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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
    parser.add_argument("--llama-batch-size", type=int, default=8, help="litgpt rows: sequences of 2048 a step")
    parser.add_argument("--litgpt-python", help="the Python of an environment with litgpt (it pins packages that"
                        " conflict with transformers 5): adds the litgpt pretraining rows")
    parser.add_argument("--rows", type=lambda text: text.split(","), help="row groups, in this order: any of"
                        f" {','.join(ROW_GROUPS)} (default: all; litgpt with --litgpt-python; lm alone with"
                        " --trainer-only)")
    parser.add_argument("--keep-going", action="store_true", help="a failing row group is reported, the rest run")
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
        if opt.rows is None:
            opt.rows = ["lm"] if opt.trainer_only else [g for g in ROW_GROUPS if g != "litgpt" or opt.litgpt_python]
        unknown = [g for g in opt.rows if g not in ROW_GROUPS]
        if unknown:
            raise UsageError(f"--rows {','.join(unknown)}: choose from {','.join(ROW_GROUPS)}")
        if "litgpt" in opt.rows and not opt.litgpt_python:
            raise UsageError("--rows litgpt needs --litgpt-python: the Python of litgpt's own environment")
        if not opt.bias and opt.model_type != "gpt":
            raise UsageError("--no-bias needs --model-type gpt (GPT2LMHeadModel always has biases)")
    except UsageError as err:
        print(f"bench.py: error: {err}", file=sys.stderr)
        return 2
    opt.accelerator, opt.precision = ("cpu", "32-true") if opt.tiny else ("gpu", "bf16-mixed")
    torch.set_float32_matmul_precision("high")  # what the templates' main() sets, for both variants
    opt.config = {**(TINY_GPT if opt.tiny else GPT2_SMALL), **({} if opt.bias else {"bias": False})}
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = opt.coordinate_descent or inductor.coordinate_descent_tuning
    inductor.max_autotune = opt.max_autotune or inductor.max_autotune  # mode "max-autotune-no-cudagraphs"
    opt.device = torch.device("cpu" if opt.tiny else "cuda")
    opt.card = torch.cuda.get_device_name(opt.device) if opt.device.type == "cuda" else "CPU"
    opt.peak = opt.peak_tflops
    if opt.peak is None and not opt.tiny:  # the template's table for cards Lightning lacks, then Lightning's
        opt.peak = (lightning_support.missing_peak_tflops(opt.card, opt.precision)
                    or (get_available_flops(opt.device, torch.bfloat16) or 0) / 1e12 or None)

    rows, checks = [], {}
    # Lightning's own output (model summary, progress bar) goes to stderr: stdout holds only the report.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for group in opt.rows:  # in the order asked: on a device with little time, the most valuable first
            try:
                ROW_GROUPS[group](opt, Path(tmp) / group, rows, checks)
            except Exception as err:  # one failed group (a peer's install, memory) leaves the others' rows
                if not opt.keep_going:
                    raise
                checks[f"{group}_failed"] = f"{type(err).__name__}: {str(err)[-300:]}"

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
            cells = [r["variant"], r["card"], r["batch x seq"], r["ms/step"], shown(r["tokens/s"], ","),
                     shown(r["MFU"], ".1%"), shown(r["ratio"], ".3f"), r["peak memory"]]
            print(f"| {' | '.join(map(str, cells))} |")
        for key, value in checks.items():
            print(f"{key}: {value}")
    failed = [k for k, v in checks.items() if v is False and k in ("loss_falls", "same_loss", "image_same_loss")
              or k.endswith("_failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
