"""Causal language model template: GPT-style pre-training or fine-tuning on a text corpus, one GPU to many nodes.

Out of the box it trains a tiny Llama-style model on byte-level tokens of this skill's references/ folder on a CPU
(a minute or two). The same file scales by configuration alone:

    python causal_lm.py fit                                          # tiny model, CPU, this skill's docs as corpus
    python causal_lm.py fit --config configs/gpu.yaml --model.compile true
    python causal_lm.py fit --config configs/gpu.yaml --model.compile true --data.data_path tokens.npy \
        --data.block_size 1024 --data.batch_size 32 --data.num_workers 2 --model.model_type gpt \
        --model.model_config '{"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304, "bias": false}'
                                 # GPT-2-small from scratch: 532,000 tokens/s on one H200 (references/performance.md)
    python causal_lm.py fit --config configs/ddp.yaml                # every GPU of the machine
    python causal_lm.py fit --config configs/fsdp.yaml               # shard weights/grads/optimizer state (FSDP)
    python causal_lm.py fit --config configs/fsdp2.yaml              # ModelParallelStrategy: FSDP2 per block
    python causal_lm.py fit --config configs/deepspeed_stage_2.yaml  # or deepspeed_stage_3_offload.yaml
    python causal_lm.py fit --ckpt_path last                         # resume where the run stopped
    python causal_lm.py fit --print_config > my_config.yaml          # every setting
    python causal_lm.py validate --ckpt_path best                    # val_loss of the best checkpoint
    python -c "from causal_lm import sample; print(sample('runs/causal_lm/checkpoints/best.ckpt', 'Once'))"  # text

Your data and model (config values, no code change):
    --data.data_path corpus.txt | corpus.jsonl | folder/    # .txt/.md files, or JSONL with --data.text_field
    --data.data_path tokens.npy                             # large corpora: token ids tokenized once, memory-mapped
    --model.name_or_path gpt2 (or a local save_pretrained folder) # fine-tune; the tokenizer follows the model
    --model.model_type gpt --model.model_config '{"n_layer": 12, "n_head": 12, "n_embd": 768}'    # from scratch:
                                                            # built-in GPT-2, or a transformers type (llama, gpt2)
    --model.activation_checkpointing true                   # trade compute for activation memory
    --model.sdpa_backend cudnn                              # the fused attention kernel (flash, efficient, cudnn)
    --throughput.peak_tflops 989                            # MFU on GPUs missing from Lightning's table

Validation: the last val_fraction of the corpus (files in path order), at most limit_val_batches batches, every
val_check_interval batches (batches, not optimizer steps, under accumulate_grad_batches; a run shorter than that
validates once, at its end). A run resumed with another max_steps follows the warm-up + cosine schedule of the new
total from its current step, so the learning rate can jump.

Logged: train_loss, val_loss, learning rate, and train/device/{batches,samples,items}_per_sec (items = tokens) and
train/device/mfu from a ThroughputMonitor. Checkpoints: <default_root_dir>/checkpoints/{best,last}.ckpt.
"""

import ast
import difflib
import inspect
import json
import itertools
import math
import os
import re
import signal
import sys
import time
import warnings
import zipfile
from argparse import ArgumentError
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import (AttentionInterface, get_constant_schedule_with_warmup,
                          get_cosine_with_min_lr_schedule_with_warmup)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "references"
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".jsonl"}  # in any letter case
TINY_CONFIG = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 1024}
# Dense bf16/fp16 peak FLOP/s of GPUs that Lightning's table lacks (it has no "H200", bare "H100" or "B200" entry).
PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "b200": 2250.0, "gb200": 2500.0}


class ConfigError(ValueError):
    """Bad data, model or strategy input: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class GPTBlock(torch.nn.Module):
    """GPT-2's pre-norm block: one fused q/k/v projection, PyTorch's fused causal attention, a tanh-GELU MLP."""

    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(n_embd, bias=bias), torch.nn.LayerNorm(n_embd, bias=bias)
        self.qkv = torch.nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.attn_out = torch.nn.Linear(n_embd, n_embd, bias=bias)
        self.fc = torch.nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.mlp_out = torch.nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(torch.nn.Module):
    """A minimal GPT-2 (model_type "gpt", GPT-2's config names), for training from scratch: this design ran a third
    faster than transformers' GPT2LMHeadModel (references/performance.md)."""

    _no_split_modules = ["GPTBlock"]  # what FSDP shards one at a time, as transformers models declare it

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int, n_positions: int, bias: bool = True):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab_size, n_embd), torch.nn.Embedding(n_positions, n_embd)
        self.blocks = torch.nn.ModuleList(GPTBlock(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = torch.nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = torch.nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings, as in GPT-2
        self.activation_checkpointing = False
        residual = {id(layer) for block in self.blocks for layer in (block.attn_out, block.mlp_out)}

        def init(module: torch.nn.Module) -> None:  # GPT-2's: residual projections scaled down by depth
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                std = 0.02 / math.sqrt(2 * n_layer) if id(module) in residual else 0.02
                torch.nn.init.normal_(module.weight, std=std)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)

        self.apply(init)  # through apply(): DeepSpeed ZeRO-3 gathers each module's partitioned weights for it

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.wte

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)  # recomputed in backward
            else:
                x = block(x)
        return self.lm_head(self.ln_f(x))


def build_gpt(model_config, vocab_size) -> GPT:
    sizes = {"n_layer": TINY_CONFIG["num_hidden_layers"], "n_head": TINY_CONFIG["num_attention_heads"],
             "n_embd": TINY_CONFIG["hidden_size"], "n_positions": TINY_CONFIG["max_position_embeddings"], "bias": True}
    user = dict(model_config or {})
    vocab_size = max(vocab_size, user.pop("vocab_size", 0))  # a larger value pads the vocabulary
    unknown = sorted(set(user) - set(sizes))
    if unknown:
        raise ConfigError(f"unknown model_config key(s) {unknown} for model_type 'gpt': use {sorted(sizes)}")
    sizes.update(user)
    if sizes["n_embd"] % sizes["n_head"]:
        raise ConfigError(f"n_embd {sizes['n_embd']} is not a multiple of n_head {sizes['n_head']}")
    return GPT(vocab_size, **sizes)


def load_or_build(name_or_path, model_type, model_config, vocab_size, trust_remote_code, meta=False):
    """A transformers causal LM with SDPA attention (pretrained weights from a name/folder, or a fresh config), or
    the built-in GPT for model_type "gpt"."""
    if model_type == "gpt" and not name_or_path:
        with torch.device("meta") if meta else torch.device("cpu"):
            return build_gpt(model_config, vocab_size)
    return use_causal_sdpa(load_or_build_transformers(name_or_path, model_type, model_config, vocab_size,
                                                      trust_remote_code, meta))


# transformers' own SDPA function under a name with no mask function: transformers then builds no attention mask and
# SDPA runs with is_causal=True. Its mask code would otherwise read a value from the GPU every forward (a wait), and
# under torch.compile pass a batch x 1 x seq x seq mask that rules out the flash kernels (transformers 5.x).
CAUSAL_SDPA = "sdpa_causal"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
# Decoder-only types whose attention is causal, windowed only where the config says so (a sweep over tiny models gave
# the logits of transformers' eager attention). Not: multimodal wrappers (gemma3), own masks (doge), remote code.
CAUSAL_SDPA_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox", "olmo", "olmo2",
                     "phi", "phi3", "granite", "starcoder2", "opt"}


def use_causal_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """Switches a model of CAUSAL_SDPA_TYPES with neither sliding-window nor chunked layers to CAUSAL_SDPA: right for
    this template's unpadded blocks. A later forward given attention_mask or position_ids (padding, generate(),
    packed documents) raises instead of ignoring them."""
    config = model.config
    if (config.model_type in CAUSAL_SDPA_TYPES and type(model).__module__.startswith("transformers.")
            and set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
            and not getattr(config, "sliding_window", None) and not getattr(config, "attention_chunk_size", None)):
        model.set_attn_implementation(CAUSAL_SDPA)
        model.register_forward_pre_hook(refuse_masks, with_kwargs=True)
    return model


def refuse_masks(model, args, kwargs) -> None:
    if model.config._attn_implementation == CAUSAL_SDPA and any(
            kwargs.get(name) is not None for name in ("attention_mask", "position_ids")):
        raise ValueError("this model attends causally with no mask (causal_lm.py's sdpa_causal, for unpadded"
                         " training): call model.set_attn_implementation('sdpa') before passing attention_mask or"
                         " position_ids")


def load_or_build_transformers(name_or_path, model_type, model_config, vocab_size, trust_remote_code, meta):
    from transformers import AutoConfig, AutoModelForCausalLM

    # The weights' dtype is Lightning's, not the one the checkpoint was saved in (transformers 5 would load a float16
    # model as float16): float32 under -mixed precisions and 32-true, which keeps the optimizer state float32; the
    # named dtype under -true (the precision plugin makes it the default while configure_model runs).
    dtype = torch.get_default_dtype()
    if name_or_path:
        local = Path(name_or_path).expanduser()
        if name_or_path.startswith((".", "/", "~")) and not local.exists():
            raise ConfigError(f"folder not found: {name_or_path}: pass a folder saved with save_pretrained")
        try:
            if meta:
                config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
                with torch.device("meta"):
                    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype,
                                                            trust_remote_code=trust_remote_code)
            return AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation="sdpa", dtype=dtype,
                                                        trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            fix = ("it ships its own Python code: read it, and only if you trust it pass --model.trust_remote_code"
                   " true") if "custom code" in str(err) else ("offline, pass a local folder saved with"
                                                                " save_pretrained or a name already in the cache")
            raise ConfigError(f"cannot load model {name_or_path!r} ({str(err).splitlines()[0]}): {fix}")
    try:
        user = dict(model_config or {})
        # A larger vocab_size in model_config pads the tokenizer's (GPT-2: 50257 -> 50304, a multiple of 64, is faster).
        user["vocab_size"] = max(vocab_size, user.get("vocab_size", 0))
        # Tiny defaults fill only what model_config leaves out, under either name (GPT-2's n_embd is hidden_size).
        aliases = AutoConfig.for_model(model_type).attribute_map
        given = {aliases.get(key, key) for key in user}
        tiny = {key: value for key, value in TINY_CONFIG.items() if aliases.get(key, key) not in given}
        config = AutoConfig.for_model(model_type, **tiny, **user)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"cannot build a {model_type!r} config: {err}")
    with torch.device("meta") if meta else torch.device("cpu"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits  # transformers models return an output object


def position_limit(model: torch.nn.Module) -> tuple:
    """(positions the model was built for or None, whether a learned position table holds them)."""
    if isinstance(model, GPT):
        return model.wpe.num_embeddings, True
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    learned = any(isinstance(m, torch.nn.Embedding) and ("pos" in name.split(".")[-1] or name.endswith("wpe"))
                  for name, m in model.named_modules())
    return positions, learned


def transformer_blocks(model: torch.nn.Module) -> list:
    """The repeated decoder blocks (what FSDP shards one at a time and activation checkpointing recomputes)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class CausalLM(L.LightningModule):
    def __init__(
        self,
        vocab_size: int = 256,
        name_or_path: Optional[str] = None,
        model_type: str = "llama",
        model_config: Optional[dict] = None,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        activation_checkpointing: bool = False,
        sdpa_backend: Optional[Literal["cudnn", "flash", "efficient", "math"]] = None,
        trust_remote_code: bool = False,
    ):
        """name_or_path: pretrained model (fine-tuning); else a fresh `model_type` model with `model_config`
        overriding the tiny default. sdpa_backend: the one fused attention kernel PyTorch may use (math stays as the
        fallback); None leaves the choice to PyTorch. trust_remote_code runs Python code shipped with a model: off
        unless you trust it."""
        super().__init__()
        self.save_hyperparameters()
        self.model: Optional[torch.nn.Module] = None

    def configure_model(self) -> None:
        # Built here, not in __init__: FSDP/DeepSpeed can then create it sharded, and compile sees the final module.
        if self.model is not None:
            return
        hp = self.hparams
        self.model = load_or_build(hp.name_or_path, hp.model_type, hp.model_config, hp.vocab_size,
                                   hp.trust_remote_code)
        self.model.train()  # from_pretrained returns eval mode (no dropout) and Lightning 2.6 keeps a module's mode
        if self.model.get_input_embeddings().num_embeddings < hp.vocab_size:
            raise ConfigError(f"the tokenizer has {hp.vocab_size} tokens but the model only"
                              f" {self.model.get_input_embeddings().num_embeddings}: use the model's own tokenizer")
        if isinstance(self.model, GPT):
            self.model.activation_checkpointing = hp.activation_checkpointing
        else:
            self.model.config.use_cache = False
            if hp.activation_checkpointing:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hp.sdpa_backend:  # process-wide: compiled graphs and checkpointing's recomputation see the same kernel
            torch.backends.cuda.enable_flash_sdp(hp.sdpa_backend == "flash")
            torch.backends.cuda.enable_mem_efficient_sdp(hp.sdpa_backend == "efficient")
            torch.backends.cuda.enable_cudnn_sdp(hp.sdpa_backend == "cudnn")
        strategy = self.trainer.strategy if self._trainer is not None else None
        blocks = transformer_blocks(self.model)
        if isinstance(strategy, FSDPStrategy) and "auto_wrap_policy" not in strategy.kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            # Without a policy FSDP wraps the whole model as one unit and gathers every weight at once.
            strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy({type(b) for b in blocks})
        if isinstance(strategy, ModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard

            # No tensor-parallel plan here: with tensor_parallel_size 1, shard over all data-parallel ranks; with
            # "auto" sizes (nodes x GPUs per node) shard within each node and replicate across nodes (HSDP).
            dp, tp = self.device_mesh["data_parallel"].size(), self.device_mesh["tensor_parallel"].size()
            mesh = self.device_mesh["data_parallel"] if tp == 1 else (
                self.device_mesh["tensor_parallel"] if dp == 1 else self.device_mesh)
            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            local = sum(p.to_local().numel() for p in self.model.parameters())
            total = sum(p.numel() for p in self.model.parameters())
            sys.stdout.write(f"[rank {self.global_rank}] FSDP2: this rank holds {local:,} of {total:,} parameter"
                             " elements\n")  # one write: the ranks' lines do not interleave
        if hp.compile:  # checkpoint keys keep their names (no "_orig_mod."): modules compile in place
            if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
                for block in blocks:
                    block.compile()
            else:  # model and loss in one graph: the float32 loss fuses into one kernel, no float32 logits stored
                self.loss = torch.compile(self.loss)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model, input_ids)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(input_ids).flatten(0, 1), targets.flatten())  # float32 under autocast

    def _loss(self, batch) -> torch.Tensor:
        return self.loss(*batch)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)  # to the logger every log_every_n_steps; no per-step progress-bar sync
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def on_fit_start(self) -> None:
        self._check_positions()

    def on_validation_start(self) -> None:  # also `validate`, which has no fit start
        self._check_positions()

    def _check_positions(self) -> None:
        """A block longer than a learned position table fails deep in an embedding lookup (IndexError): refuse it in
        one line. Rotary positions run past the model's max_position_embeddings: warn."""
        block = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("block_size")
        positions, learned = position_limit(self.model)
        if block is None or positions is None or block <= positions:
            return
        if learned:
            raise ConfigError(f"--data.block_size {block} is longer than the model's {positions} positions: use at"
                              " most that, or build the model with more (--model.model_config n_positions or"
                              " max_position_embeddings)")
        rank_zero_warn(f"--data.block_size {block} is longer than max_position_embeddings {positions}: rotary"
                       " positions run past what the model was built or trained for")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if not hasattr(self, "flops_per_batch"):  # read by ThroughputMonitor to compute MFU
            self.flops_per_batch = self._measure_flops(batch[0].shape)

    def _measure_flops(self, shape) -> int:
        hp = self.hparams
        meta = load_or_build(hp.name_or_path, hp.model_type, hp.model_config, hp.vocab_size, hp.trust_remote_code,
                             meta=True)
        x = torch.randint(0, hp.vocab_size, tuple(shape), device="meta")
        with torch.autograd.set_detect_anomaly(False):  # anomaly checks read values, which meta tensors lack
            return measure_flops(meta, lambda: logits_of(meta, x), loss_fn=torch.Tensor.sum)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # no decay on norms/biases
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) and strategy.config.get("zero_optimization", {}).get(
                "offload_optimizer"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # DeepSpeed requires its own optimizer when offloading

            optimizer = DeepSpeedCPUAdam(groups, lr=hp.learning_rate, betas=hp.betas)
        else:
            # fused: one kernel for all parameters; not under fp16's gradient scaler, which must unscale first
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            fused = self.device.type in ("cuda", "cpu") and scaler is None
            optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=hp.betas, fused=fused)
        total = self.trainer.estimated_stepping_batches  # inf when neither max_steps nor max_epochs is set
        if math.isfinite(total):
            scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, hp.warmup_steps, int(total),
                                                                    min_lr_rate=hp.min_lr_ratio)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, hp.warmup_steps)
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
        else:  # DDP's gradients are already averaged; FSDP2's are DTensors, whose norm covers all shards
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)


# ----------------------------------------------------------------------------------------------------------------
# Data: packed sequences of block_size + 1 tokens from .txt/.md files or JSONL records
# ----------------------------------------------------------------------------------------------------------------
class TokenFile:
    """Token ids in a .npy file (a 1-D integer array), memory-mapped: read one slice at a time, shared by all the
    processes of a machine through the page cache, and never copied into DataLoader workers (a spawned one gets the
    path and maps the file itself)."""

    def __init__(self, path: Path):
        self.path, self.tokens, found = path, None, ""
        try:
            tokens = self.map()
        except (OSError, ValueError, EOFError) as err:  # empty, cut short, not .npy, or Python objects (not loaded)
            tokens, found = None, "" if "pickle" in str(err) else f" ({str(err).splitlines()[0]})"
        if isinstance(tokens, np.ndarray) and (tokens.ndim != 1 or tokens.dtype.kind not in "iu"):
            found = f" (it holds {tokens.dtype} values of shape {tokens.shape})"
        if found or not isinstance(tokens, np.ndarray):  # np.load gives an archive of arrays for an .npz file
            raise ConfigError(f"cannot read {path} as token ids{found}: save a 1-D integer array with numpy.save"
                              " (uint16 for vocabularies up to 65,536, else uint32)")
        lowest, self.max_id = 0, -1
        for i in range(0, len(tokens), 1 << 24):  # one pass over the file, 16M tokens at a time
            chunk = tokens[i:i + (1 << 24)]
            self.max_id = max(self.max_id, int(chunk.max()))
            if tokens.dtype.kind == "i":
                lowest = min(lowest, int(chunk.min()))
        if lowest < 0:
            raise ConfigError(f"{path} holds negative token ids: save the tokenizer's ids unchanged")
        self.length = len(tokens)

    def map(self) -> np.ndarray:
        if self.tokens is None:
            self.tokens = np.load(self.path, mmap_mode="r")
        return self.tokens

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, window: slice) -> torch.Tensor:
        return torch.from_numpy(self.map()[window].astype(np.int64))  # a copy: nothing keeps the mapping alive

    def __getstate__(self) -> dict:
        return {**self.__dict__, "tokens": None}  # workers started by spawn map the file again


class PackedBlocks(Dataset):
    """Blocks of block_size + 1 consecutive tokens of ids[start:stop] (a tensor or a TokenFile): input and target."""

    def __init__(self, ids, block_size: int, start: int, stop: int):
        self.ids, self.block_size, self.start, self.stop = ids, block_size, start, stop

    def __len__(self) -> int:
        return (self.stop - self.start - 1) // self.block_size

    def __getitem__(self, i):
        begin = self.start + i * self.block_size
        chunk = self.ids[begin: begin + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class ResumableSampler(DistributedSampler):
    """Shuffles every epoch with seed + epoch, as Lightning's DDP sampler does, on one process too; the first epoch
    after a resume starts at the checkpoint's epoch and skips the samples it had trained on. A resumed run then sees
    the data an uninterrupted one would; Lightning alone starts the epoch over, in a new order."""

    def __init__(self, dataset: Dataset, resume: dict, **kwargs):
        super().__init__(dataset, shuffle=True, seed=int(os.getenv("PL_GLOBAL_SEED", 0)), **kwargs)  # Lightning's
        self.resume, self.started = resume, False  # TextData's: load_state_dict may fill it after this is built

    def order(self) -> list:
        return [len(self.dataset), self.num_replicas, self.seed]  # what decides each process's samples

    def __iter__(self):
        skip, resume, self.started = 0, dict(self.resume), True
        self.resume.clear()
        if resume and resume["order"] != self.order():
            rank_zero_warn("the training data, seed or number of processes differ from the checkpoint's: the resumed"
                           " epoch starts over in a new order")
        elif resume and self.epoch <= resume["epoch"]:  # lower: workers began before Lightning's set_epoch
            self.epoch, skip = resume["epoch"], resume["samples"]
        return itertools.islice(super().__iter__(), skip, None)


class TextData(L.LightningDataModule):
    def __init__(
        self,
        data_path: Optional[str] = None,
        tokenizer: Optional[str] = None,
        text_field: str = "text",
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        trust_remote_code: bool = False,
    ):
        """data_path: a .txt/.md file, a JSONL file (one record per document, text in `text_field`) or a folder of
        them; default: this skill's references/. Or a .npy file of token ids, tokenized once (references/
        performance.md): memory-mapped, for corpora larger than memory. tokenizer: a Hugging Face name or folder;
        None = UTF-8 bytes (256 tokens; for a .npy file, its largest id + 1), or the model's own tokenizer when
        --model.name_or_path is set."""
        super().__init__()
        self.save_hyperparameters()
        self.path = Path(data_path).expanduser() if data_path else DEFAULT_CORPUS
        if not self.path.exists():
            raise ConfigError(f"data not found: {self.path}: set --data.data_path to a text/JSONL file or folder,"
                              " or a .npy file of token ids")
        if not 0 < val_fraction < 1:
            raise ConfigError("val_fraction must be between 0 and 1")
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and not any(
            part.startswith(".") for part in p.relative_to(self.path).parts)) if self.path.is_dir() else [self.path]
        if not self.files:
            raise ConfigError(f"{self.path} holds no {', '.join(sorted(TEXT_SUFFIXES))} files (or pass one .npy file"
                              " of token ids)")
        self.token_file = TokenFile(self.path) if self.path.suffix == ".npy" else None
        self.tokenizer, self.train_sampler, self.resume = None, None, {}
        if tokenizer:
            from transformers import AutoTokenizer

            if tokenizer.startswith((".", "/", "~")) and not Path(tokenizer).expanduser().exists():
                raise ConfigError(f"folder not found: {tokenizer}: pass a folder saved with save_pretrained")
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as err:
                fix = ("it ships its own Python code: read it, and only if you trust it pass"
                       " --model.trust_remote_code true") if "custom code" in str(err) else (
                    "offline, pass a local folder saved with save_pretrained or a name already in the cache")
                raise ConfigError(f"cannot load tokenizer {tokenizer!r} ({str(err).splitlines()[0]}): {fix}")
            top, size = (self.token_file.max_id if self.token_file else -1), len(self.tokenizer)
            if top >= size:
                raise ConfigError(f"{self.path} holds token id {top}, outside the {size} tokens of {tokenizer!r}:"
                                  " pass the tokenizer the file was made with")

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer)
        return 256 if self.token_file is None else self.token_file.max_id + 1

    def documents(self):
        import json

        for file in self.files:
            try:  # strictly: a file in another encoding would otherwise train as replacement characters
                text = file.read_text(encoding="utf-8-sig")  # -sig: without a leading byte-order mark
            except UnicodeDecodeError as err:
                raise ConfigError(f"{file} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}):"
                                  " convert it, e.g. iconv -f cp1252 -t utf-8 (Windows text) or -f utf-16, or move"
                                  " it out") from None
            if file.suffix.lower() != ".jsonl":
                yield text
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if self.hparams.text_field not in record:
                        raise ConfigError(f"{file}:{n} has no field {self.hparams.text_field!r} (fields:"
                                          f" {', '.join(record)}): set --data.text_field")
                    yield record[self.hparams.text_field]

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            return torch.tensor(list(text.encode("utf-8")) + [10], dtype=torch.long)  # a newline ends a document
        # Pieces of about 1 MB, cut after a newline: a tokenizer's output for a whole large file (offsets, Python
        # ints) takes hundreds of bytes per token; this keeps setup near the 8 bytes per token it ends with. Only
        # the first piece gets special tokens (a BOS once per document, as for the whole text).
        pieces, start = [], 0
        while start < len(text):
            end = len(text) if len(text) - start <= 1 << 20 else (text.rfind("\n", start, start + (1 << 20)) + 1 or
                                                                     start + (1 << 20))
            ids = self.tokenizer(text[start:end], add_special_tokens=not pieces)["input_ids"]
            pieces.append(torch.tensor(ids, dtype=torch.long))
            start = end
        return torch.cat([*pieces, torch.tensor([self.tokenizer.eos_token_id or 0])])

    def setup(self, stage: str) -> None:
        if self.token_file is not None:
            ids = self.token_file
        else:  # one tensor per document, then one copy
            ids = torch.cat([self.encode(doc) for doc in self.documents()] or
                            [torch.zeros(0, dtype=torch.long)])
        n_val = int(len(ids) * self.hparams.val_fraction)
        block = self.hparams.block_size
        if n_val < block + 1 or len(ids) - n_val < block + 1:
            raise ConfigError(f"the corpus has {len(ids)} tokens: too few for block_size {block} with val_fraction"
                              f" {self.hparams.val_fraction}; lower --data.block_size or add text")
        self.train_set = PackedBlocks(ids, block, 0, len(ids) - n_val)
        self.val_set = PackedBlocks(ids, block, len(ids) - n_val, len(ids))

    def _loader(self, dataset, **kwargs) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self):
        trainer = self.trainer  # None outside a Trainer (bench.py's plain loop)
        # Every process trains on its own share, whatever the strategy: Lightning's distributed_sampler_kwargs would
        # split by the data-parallel mesh only, but FSDP2 here shards over the "tensor_parallel" mesh as well (no
        # tensor-parallel plan), so with "auto" sizes all GPUs of a node would train on the same batches.
        ranks = {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer else {
            "num_replicas": 1, "rank": 0}
        self.train_sampler = ResumableSampler(self.train_set, self.resume, **ranks)
        return self._loader(self.train_set, sampler=self.train_sampler, drop_last=True)

    def val_dataloader(self):
        return self._loader(self.val_set)

    def state_dict(self) -> dict:
        """Stored in every checkpoint: the training data's epoch and the samples each process has trained on in it
        (the batches in the weights; a checkpoint at the end of an epoch points at the next one)."""
        trainer, sampler = self.trainer, self.train_sampler
        if trainer is None or sampler is None:
            return {}
        epoch, batches = sampler.epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= trainer.num_training_batches:
            epoch, batches = epoch + 1, 0
        batches -= unfinished_batches(trainer)  # redone on resume, as ResumeAtUnfinishedBatch records
        return {"epoch": epoch, "samples": batches * self.hparams.batch_size, "order": sampler.order()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume.clear()  # the sampler may exist already: it reads this dict when its next epoch starts
        self.resume.update(state_dict)
        if self.train_sampler is not None and self.train_sampler.started:
            # FSDP, DeepSpeed and ModelParallel restore after configure_optimizers, whose estimated_stepping_batches
            # (under max_epochs) started the loader: its workers hold this epoch's first samples already
            rank_zero_warn("the resumed epoch's data starts over: DataLoader workers took their samples before the"
                           " checkpoint was restored; use --data.num_workers 0 or --trainer.max_steps")


# ----------------------------------------------------------------------------------------------------------------
# Sampling text from a trained checkpoint
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(checkpoint: str, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: Optional[int] = 50, seed: int = 0) -> str:
    """The prompt and a continuation sampled from a single-file checkpoint, with the tokenizer it was trained with.
    temperature 0 takes the most likely token each time; top_k keeps the k likeliest. No KV cache: each token reruns
    the last block_size tokens, fine for the small models trained here (a large transformers model: export it,
    references/transformers.md, and use its generate()). From the folder that holds this file:
        python -c "from causal_lm import sample; print(sample('runs/causal_lm/checkpoints/best.ckpt', 'Once'))"
    """
    data = torch.load(checkpoint, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters", {})
    module = CausalLM.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    module.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = None
    if data.get("tokenizer"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"], trust_remote_code=data.get("trust_remote_code"))
    ids = tokenizer(prompt)["input_ids"] if tokenizer else list(prompt.encode("utf-8"))
    ids = torch.tensor([ids or [10]], device=module.device)  # byte 10 (newline) separates documents
    generator = torch.Generator(module.device).manual_seed(seed)
    block = data.get("block_size", 128)
    for _ in range(max_new_tokens):
        logits = module(ids[:, -block:])[0, -1].float()
        if temperature <= 0:
            token = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if top_k:
                logits[logits < torch.topk(logits, min(top_k, logits.numel())).values[-1]] = float("-inf")
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    out = ids[0].tolist()
    return tokenizer.decode(out) if tokenizer else bytes(t for t in out if t < 256).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------------
# Throughput: tokens/s and MFU, also on GPUs missing from Lightning's peak-FLOPs table
# ----------------------------------------------------------------------------------------------------------------
def missing_peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOP/s for GPUs Lightning's table lacks; a bare "H100" is taken as the SXM part."""
    words = device_name.lower().split()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in words), None)
    if peak is not None and precision.startswith(("32", "64")):  # TF32 tensor cores: half the bf16 rate
        peak /= 2
    return peak


class Throughput(ThroughputMonitor):
    """ThroughputMonitor that (1) supplies the peak FLOP/s Lightning lacks for some GPUs (or the one you pass) and
    (2) times training only at logging steps and when validation starts (on CPUs as on GPUs): the stock callback
    calls torch.cuda.synchronize() after every batch. window_size counts these timings, not batches."""

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
        new, self._timed[stage] = self._batches[stage] - self._timed[stage], self._batches[stage]
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


class CausalLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_argument("--matmul_precision", choices=["highest", "high", "medium"], default="high",
                            help="torch.set_float32_matmul_precision: high uses TF32 tensor cores for float32"
                            " matmuls on Ampere and newer GPUs; scaffold.py sets what detect_hardware.py recommends")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
        parser.set_defaults({"best_checkpoint.monitor": "val_loss", "best_checkpoint.mode": "min",
                             "best_checkpoint.filename": "best"})
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")  # unmonitored: last.ckpt at every save
        parser.set_defaults({"last_checkpoint.save_last": True})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(CheckpointOnException, "exception_checkpoint")

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(with_nearest_keys(parser, err)) from None
        # Before LightningCLI reads hyperparameters from --ckpt_path and before anything is built or written.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if subcommand in ("test", "predict"):
            raise ConfigError(f"causal_lm.py has no {subcommand} step: score a checkpoint with validate --ckpt_path"
                              " CKPT (val_loss on the held-out end of the corpus)")
        if subcommand == "validate" and config.get("ckpt_path") == "best":
            config.ckpt_path = best_checkpoint_file(config)  # a new process has no fit's best_model_path
        check_run_inputs(config)
        for group, key in (("model", "name_or_path"), ("data", "tokenizer")):  # stored in checkpoints: a later run
            value = config[group][key]                                          # may start in another folder
            if value and Path(value).expanduser().exists():
                config[group][key] = str(Path(value).expanduser().resolve())
        model = (self.config[self.config.subcommand] if self.config.get("subcommand") else self.config).model
        if model.model_type != "gpt" and not model.name_or_path:
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

    def instantiate_trainer(self, **kwargs):
        config = (self.config[self.subcommand] if self.subcommand else self.config).trainer
        batches = (config.max_steps or 0) * (config.accumulate_grad_batches or 1)  # what val_check_interval counts
        if isinstance(config.val_check_interval, int) and config.check_val_every_n_epoch is None and \
                0 < batches < config.val_check_interval:  # here, not in the config: the saved config.yaml keeps 50
            kwargs["val_check_interval"] = batches  # a short run still validates (and saves best.ckpt) at its end
        try:
            trainer = without_unused_lr_monitor(super().instantiate_trainer(**kwargs))
        except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as err:  # FSDP on CPU
            raise ConfigError(f"cannot build the Trainer: {err}") from None
        if isinstance(trainer.strategy, ModelParallelStrategy):  # a size mismatch only fails later, inside fit
            sizes = (self.config[self.subcommand] if self.subcommand else self.config).trainer.strategy.init_args
            dp, tp = sizes.data_parallel_size, sizes.tensor_parallel_size
            world = trainer.num_devices * trainer.num_nodes
            if isinstance(dp, int) and isinstance(tp, int) and dp * tp != world:
                raise ConfigError(f"data_parallel_size x tensor_parallel_size = {dp * tp} must equal devices x"
                                  f" num_nodes = {world}: set --trainer.strategy.init_args.data_parallel_size {world}")
        return trainer

    def after_fit(self) -> None:
        val = self.trainer.callback_metrics.get("val_loss")
        if val is not None:  # every rank prints: multi-process tests compare them
            sys.stdout.write(f"rank {self.trainer.global_rank}: step {self.trainer.global_step}"
                             f" val_loss={val.item():.4f}\n")  # one write: the ranks' lines do not interleave
        best = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and best is not None and best.best_model_score is not None:
            print(kept_checkpoint(self.trainer))


def main(args=None, run: bool = True, callbacks: tuple = ()):
    """Command line. run=False builds model, data and trainer without running a subcommand and returns the CLI;
    callbacks are always added (hpo_optuna.py and bench/bench.py pass theirs this way)."""
    # Lightning looks for a state_dict on the DataLoader; TextData keeps the position in its own (ResumableSampler).
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    # configure_gradient_clipping leaves clipping to DeepSpeed, which clips by trainer.gradient_clip_val itself
    warnings.filterwarnings("ignore", "Since DeepSpeed handles gradient clipping internally")
    try:
        return CausalLMCLI(
            CausalLM,
            TextData,
            seed_everything_default=42,
            auto_configure_optimizers=False,  # the model's configure_optimizers decides; --optimizer would be ignored
            trainer_defaults={"max_steps": 200, "val_check_interval": 50, "check_val_every_n_epoch": None,
                              "limit_val_batches": 20, "log_every_n_steps": 10, "gradient_clip_val": 1.0,
                              "default_root_dir": "runs/causal_lm",
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
