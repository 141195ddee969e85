"""Causal language model template: GPT-style pre-training or fine-tuning on a text corpus, one GPU to many nodes.

Out of the box it trains a tiny Llama-style model on byte-level tokens of this skill's references/ folder on a CPU
(a minute or two). scaffold.py copies it into your project with lightning_support.py (the run machinery:
checkpoints, exact resume, NaN stop, one-line errors, tokens/s and MFU) and configs/. The same file scales by
configuration alone:

    python causal_lm.py fit                                          # tiny model, CPU, this skill's docs as corpus
    python causal_lm.py fit --config configs/gpu.yaml --model.compile true
    python causal_lm.py fit --config configs/gpu.yaml --model.compile true --data.data_path tokens.npy \
        --data.block_size 1024 --data.batch_size 32 --data.num_workers 2 --model.model_type gpt \
        --model.model_config '{"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304, "bias": false}'
                                 # GPT-2-small from scratch: 532,000 tokens/s on one H200 (references/performance.md)
    python causal_lm.py fit --config configs/ddp.yaml                # every GPU of the machine
    python causal_lm.py fit --config configs/fsdp.yaml               # shard weights/grads/optimizer state (FSDP)
    python causal_lm.py fit --config configs/fsdp2.yaml              # ModelParallelStrategy: FSDP2 per block
    python causal_lm.py fit --config configs/deepspeed.yaml          # ZeRO-2 (ZeRO-3 + offload: see the file)
    python causal_lm.py fit --ckpt_path last                         # resume where the run stopped
    python causal_lm.py fit --print_config > my_config.yaml          # every setting
    python causal_lm.py validate --ckpt_path best                    # val_loss and val_ppl of the best checkpoint
    python causal_lm.py generate --prompt "Once upon a time"         # text from the best checkpoint
    python causal_lm.py export --out my_model                        # a Hugging Face folder (from_pretrained)

Fine-tune a pretrained model with LoRA (adapters of a frozen model; checkpoints of megabytes), on your instructions:
    python causal_lm.py fit --config configs/gpu.yaml --model.name_or_path meta-llama/Llama-3.2-1B-Instruct \
        --model.finetune lora --model.learning_rate 2e-4 --data.data_path chat.jsonl --data.block_size 1024
    --model.finetune qlora       # the frozen model in 4 bits (bitsandbytes, CUDA): 7B weights in about 4 GB
    chat.jsonl: {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}, ...]}; answers learned

Your data and model (config values, no code change):
    --data.data_path corpus.txt | corpus.jsonl | folder/    # .txt/.md files, or JSONL with --data.text_field
    --data.data_path tokens.npy                             # large corpora: token ids tokenized once, memory-mapped
    --model.name_or_path gpt2 (or a local save_pretrained folder) # fine-tune; the tokenizer follows the model
    --model.model_type gpt --model.model_config '{"n_layer": 12, "n_head": 12, "n_embd": 768}'    # from scratch:
                                                            # built-in GPT-2, or a transformers type (llama, gpt2)
    --model.activation_checkpointing true                   # trade compute for activation memory
    --model.sdpa_backend cudnn                              # the fused attention kernel (flash, efficient, cudnn)
    --throughput.peak_tflops 989                            # MFU on GPUs missing from Lightning's table
Your own architecture: edit the built-in GPT (EDIT HERE below) and train it with --model.model_type gpt.

Validation: the last val_fraction of the corpus (files in path order), at most limit_val_batches batches, every
val_check_interval batches (batches, not optimizer steps, under accumulate_grad_batches; a run shorter than that
validates once, at its end). A run resumed with another max_steps follows the warm-up + cosine schedule of the new
total from its current step, so the learning rate can jump.

Logged: train_loss, val_loss, learning rate, and train/device/{batches,samples,items}_per_sec (items = tokens) and
train/device/mfu from a ThroughputMonitor. Checkpoints: <default_root_dir>/checkpoints/{best,last}.ckpt.
"""

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import torchmetrics
from torch.utils.data import DataLoader, Dataset
from transformers import (AttentionInterface, get_constant_schedule_with_warmup,
                          get_cosine_with_min_lr_schedule_with_warmup)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lightning as L
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

try:
    from lightning_support import (EXPORT_OPTIONS, ConfigError, Conversations, ResumableSampler, TemplateCLI,
                                   Throughput, adamw, add_lora, chat_tokens, clip_gradients, four_bit_device,
                                   log_train_loss, pad_rows, pretrained, run_cli, run_tool, save_hf_folder,
                                   shard_blocks, sharded, stop_tokens, trainable_keys, transformers_config,
                                   unfinished_batches)
except ModuleNotFoundError as missing:  # copied without its support module: one line on how to get both
    sys.exit(f"{Path(sys.argv[0]).name}: error: lightning_support.py is missing next to this file: copy both with"
             f" python scripts/scaffold.py causal_lm DEST" if missing.name == "lightning_support" else missing)

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "references"
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".jsonl"}  # in any letter case
TINY_CONFIG = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 1024}

# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
# EDIT HERE: your own architecture. GPT takes input_ids [batch, seq] and returns logits [batch, seq, vocab]; its sizes
# come from --model.model_config (--model.model_type gpt). Keep _no_split_modules naming the repeated block: FSDP
# shards, and activation checkpointing recomputes, one block at a time.
class GPTBlock(torch.nn.Module):
    """GPT-2's pre-norm block: one fused q/k/v projection, PyTorch's fused causal attention, a tanh-GELU MLP."""

    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = torch.nn.LayerNorm(n_embd, bias=bias)
        self.ln_2 = torch.nn.LayerNorm(n_embd, bias=bias)
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
        self.wte = torch.nn.Embedding(vocab_size, n_embd)
        self.wpe = torch.nn.Embedding(n_positions, n_embd)
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


def load_or_build(name_or_path, model_type, model_config, vocab_size, trust_remote_code, meta=False, four_bit=None,
                  dtype=None):
    """A transformers causal LM with SDPA attention (pretrained weights from a name/folder, or a fresh config), or
    the built-in GPT for model_type "gpt". four_bit: a device to load the pretrained weights on in 4 bits (QLoRA);
    dtype: the pretrained weights' (default: torch's default dtype)."""
    if model_type == "gpt" and not name_or_path:
        with torch.device("meta") if meta else torch.device("cpu"):
            return build_gpt(model_config, vocab_size)
    return use_causal_sdpa(load_or_build_transformers(name_or_path, model_type, model_config, vocab_size,
                                                      trust_remote_code, meta, four_bit, dtype))


# transformers' own SDPA function under a name with no mask function: transformers then builds no attention mask and
# SDPA runs with is_causal=True. Its mask code would otherwise read a value from the GPU every forward (a wait), and
# under torch.compile pass a batch x 1 x seq x seq mask that rules out the flash kernels (transformers 5.x).
CAUSAL_SDPA = "sdpa_causal"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
# Decoder-only types whose attention is causal, windowed only where the config says so (a sweep over tiny models gave
# the logits of transformers' eager attention). Not: multimodal wrappers (gemma3), own masks (doge), remote code.
CAUSAL_SDPA_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox", "olmo", "olmo2",
                     "phi", "phi3", "granite", "starcoder2", "opt"}
# Types whose attention mask follows position_ids, so packed conversations stay apart (a test checks each against
# the conversations alone); OPT builds its mask without them.
PACKABLE_TYPES = CAUSAL_SDPA_TYPES - {"opt"}


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


def load_or_build_transformers(name_or_path, model_type, model_config, vocab_size, trust_remote_code, meta,
                               four_bit=None, dtype=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    # The weights' dtype is Lightning's, not the one the checkpoint was saved in (transformers 5 would load a float16
    # model as float16): float32 under -mixed precisions and 32-true, which keeps the optimizer state float32; the
    # named dtype under -true (the precision plugin makes it the default while configure_model runs).
    dtype = dtype or torch.get_default_dtype()
    if name_or_path and meta:
        config = pretrained(AutoConfig.from_pretrained, name_or_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    if name_or_path and four_bit is not None:  # QLoRA: Linear weights in NF4 on the GPU, the rest in `dtype`
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype)
        return pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, attn_implementation="sdpa",
                          dtype=dtype, quantization_config=quantization, device_map={"": four_bit},
                          trust_remote_code=trust_remote_code)
    if name_or_path:
        return pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, attn_implementation="sdpa", dtype=dtype,
                          trust_remote_code=trust_remote_code)
    config = model_config_of(model_type, model_config, vocab_size)
    with torch.device("meta") if meta else torch.device("cpu"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def model_config_of(model_type: str, model_config, vocab_size: int):
    """A transformers config: the tiny defaults, then model_config (under either name of a key). A larger vocab_size
    in model_config pads the tokenizer's (GPT-2: 50257 -> 50304, a multiple of 64, is faster)."""
    user = dict(model_config or {})
    vocab = max(vocab_size, user.pop("vocab_size", 0))
    return transformers_config(model_type, TINY_CONFIG, user, vocab_size=vocab)


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor, position_ids=None) -> torch.Tensor:
    if position_ids is None:
        out = model(input_ids=input_ids)
    else:  # packed conversations: positions restart at each one, and transformers attends within each only
        out = model(input_ids=input_ids, position_ids=position_ids)
    return out if isinstance(out, torch.Tensor) else out.logits  # transformers models return an output object


def transformers_model(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The transformers model inside (under LoRA adapters too), or None for the built-in GPT."""
    inner = model.get_base_model() if hasattr(model, "peft_config") else model
    return None if isinstance(inner, GPT) else inner


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
        finetune: Literal["full", "lora", "qlora"] = "full",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_targets: Optional[list[str]] = None,
    ):
        """name_or_path: pretrained model (fine-tuning); else a fresh `model_type` model with `model_config`
        overriding the tiny default. sdpa_backend: the one fused attention kernel PyTorch may use (math stays as the
        fallback); None leaves the choice to PyTorch. trust_remote_code runs Python code shipped with a model: off
        unless you trust it. finetune: "full" trains every weight; "lora" freezes the pretrained model and trains
        low-rank adapters (peft) of rank lora_r on lora_targets (None: the attention and MLP projections,
        lightning_support.LORA_TARGETS), and checkpoints hold the adapters only; "qlora" also loads the frozen model
        in 4 bits (bitsandbytes, CUDA). Fine-tuning wants a lower learning_rate: about 2e-4 for LoRA, 2e-5 full."""
        super().__init__()
        self.save_hyperparameters()
        self.model: Optional[torch.nn.Module] = None
        self.strict_loading = finetune == "full"  # adapter checkpoints lack the frozen weights (on_load_checkpoint)
        self.val_nll = torchmetrics.MeanMetric()  # per token, for val_ppl

    def configure_model(self) -> None:
        # Built here, not in __init__: FSDP/DeepSpeed can then create it sharded, and compile sees the final module.
        if self.model is not None:
            return
        hp = self.hparams
        if hp.finetune != "full" and not hp.name_or_path:
            raise ConfigError(f"--model.finetune {hp.finetune} adapts a pretrained model: set --model.name_or_path")
        four_bit = four_bit_device(self) if hp.finetune == "qlora" else None
        # LoRA's frozen weights in the autocast dtype: 2 bytes each, no copy cast at each use (not under FSDP: it
        # flattens each block's weights and adapters into one tensor of one dtype)
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        frozen = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        if hp.finetune == "qlora":
            frozen = frozen or torch.bfloat16  # generate and export on a GPU, outside a Trainer
        elif hp.finetune == "full" or isinstance(getattr(self._trainer, "strategy", None), FSDPStrategy):
            frozen = None
        self.model = load_or_build(hp.name_or_path, hp.model_type, hp.model_config, hp.vocab_size,
                                   hp.trust_remote_code, four_bit=four_bit, dtype=frozen)
        self.model.train()  # from_pretrained returns eval mode (no dropout) and Lightning 2.6 keeps a module's mode
        if self.model.get_input_embeddings().num_embeddings < hp.vocab_size:
            raise ConfigError(f"the tokenizer has {hp.vocab_size} tokens but the model only"
                              f" {self.model.get_input_embeddings().num_embeddings}: use the model's own tokenizer")
        if isinstance(self.model, GPT):
            self.model.activation_checkpointing = hp.activation_checkpointing
        else:
            self.model.config.use_cache = False
            if hp.activation_checkpointing:  # transformers renamed it; the old name warns and goes in v6
                enable = getattr(self.model, "activation_checkpointing_enable", None)
                if enable is not None:
                    enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hp.finetune != "full":  # adapters on the blocks' projections; everything else frozen
            self.model = add_lora(self.model, hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.lora_targets)
            self.strict_loading = sharded(self)  # sharded checkpoints keep every weight (on_save_checkpoint)
        if hp.sdpa_backend:  # process-wide: compiled graphs and checkpointing's recomputation see the same kernel
            torch.backends.cuda.enable_flash_sdp(hp.sdpa_backend == "flash")
            torch.backends.cuda.enable_mem_efficient_sdp(hp.sdpa_backend == "efficient")
            torch.backends.cuda.enable_cudnn_sdp(hp.sdpa_backend == "cudnn")
        # ---- Strategy wiring: shard the repeated blocks (FSDP, FSDP2) and compile ----
        blocks = transformer_blocks(self.model)
        shard_blocks(self, self.model, blocks)
        if hp.compile:  # checkpoint keys keep their names (no "_orig_mod."): modules compile in place
            if sharded(self):
                for block in blocks:
                    block.compile()
            else:  # model and loss in one graph: the float32 loss fuses into one kernel, no float32 logits stored
                self.loss = torch.compile(self.loss)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return logits_of(self.model, input_ids, position_ids)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids=None) -> torch.Tensor:
        # float32 under autocast; targets -100 (a conversation's prompt, padding) are not learned
        return F.cross_entropy(self(input_ids, position_ids).flatten(0, 1), targets.flatten())

    def training_step(self, batch, batch_idx):
        loss = self.loss(*batch)
        log_train_loss(self, loss, len(batch[0]))  # no per-step device sync
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.loss(*batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.val_nll.update(loss.detach(), (batch[1] != -100).sum())  # weighted by the tokens it scored

    def on_validation_epoch_end(self) -> None:
        # perplexity: exp of the mean loss per token. The metric has synced the ranks' sums already: sync_dist
        # averages equal values (and keeps Lightning's distributed-logging warning away)
        self.log("val_ppl", self.val_nll.compute().exp(), sync_dist=True)
        self.val_nll.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # LoRA: the adapters only, megabytes rather than gigabytes. Sharded checkpoints keep every weight: torch's
        # distributed checkpoint loads only a complete state.
        if self.hparams.finetune != "full" and "state_dict" in checkpoint and not sharded(self):
            keep = trainable_keys(self)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.finetune == "full" or "state_dict" not in checkpoint or sharded(self):
            return  # loaded strictly
        found, wanted = set(checkpoint["state_dict"]), trainable_keys(self)
        missing, unknown = wanted - found, found - set(self.state_dict())
        if missing or unknown:  # loading is not strict here: refuse what would leave adapters untrained or unused
            raise ConfigError(f"the checkpoint lacks {len(missing)} of this model's {len(wanted)} LoRA tensors and"
                              f" holds {len(unknown)} it does not have: pass the options it was trained with (its"
                              " run's config.yaml: finetune, lora_r, lora_targets, name_or_path)")

    def on_fit_start(self) -> None:
        self._check_positions()
        self._attend_as_the_data_needs()

    on_validation_start = on_fit_start  # also `validate`, which has no fit start

    def _attend_as_the_data_needs(self) -> None:
        """Packed conversations pass position_ids, which transformers' sdpa follows (CAUSAL_SDPA refuses them)."""
        data = getattr(self.trainer, "datamodule", None)
        if not getattr(data, "packed_conversations", False):
            return
        inner = transformers_model(self.model)
        if inner is None or inner.config.model_type not in PACKABLE_TYPES:
            raise ConfigError(f"--data.packing keeps conversations apart for the model types {sorted(PACKABLE_TYPES)}"
                              " only (their attention follows position_ids): drop --data.packing")
        if inner.config._attn_implementation == CAUSAL_SDPA:
            inner.set_attn_implementation("sdpa")

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
            if hp.finetune != "full":  # frozen weights get no gradient: forward + the activations' backward
                return 2 * measure_flops(meta, lambda: logits_of(meta, x))
            return measure_flops(meta, lambda: logits_of(meta, x), loss_fn=torch.Tensor.sum)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = adamw(self, hp.learning_rate, hp.weight_decay, hp.betas)  # no decay on norms and biases
        total = self.trainer.estimated_stepping_batches  # inf when neither max_steps nor max_epochs is set
        if math.isfinite(total):
            scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, hp.warmup_steps, int(total),
                                                                    min_lr_rate=hp.min_lr_ratio)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, hp.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, gradient_clip_val, gradient_clip_algorithm)  # under every strategy and precision


# ----------------------------------------------------------------------------------------------------------------
# Data: packed sequences of block_size + 1 tokens from .txt/.md files or JSONL records
# ----------------------------------------------------------------------------------------------------------------
class TokenFile:
    """Token ids in a .npy file (a 1-D integer array), memory-mapped: read one slice at a time, shared by all the
    processes of a machine through the page cache, and never copied into DataLoader workers (a spawned one gets the
    path and maps the file itself)."""

    def __init__(self, path: Path):
        self.path = path
        self.tokens = None
        found = ""
        try:
            tokens = self.map()
        except (OSError, ValueError, EOFError) as err:  # empty, cut short, not .npy, or Python objects (not loaded)
            tokens, found = None, "" if "pickle" in str(err) else f" ({str(err).splitlines()[0]})"
        if isinstance(tokens, np.ndarray) and (tokens.ndim != 1 or tokens.dtype.kind not in "iu"):
            found = f" (it holds {tokens.dtype} values of shape {tokens.shape})"
        if found or not isinstance(tokens, np.ndarray):  # np.load gives an archive of arrays for an .npz file
            raise ConfigError(f"cannot read {path} as token ids{found}: save a 1-D integer array with numpy.save"
                              " (uint16 for vocabularies up to 65,536, else uint32)")
        lowest = 0
        self.max_id = -1
        for i in range(0, len(tokens), 1 << 24):  # one pass over the file, 16M tokens at a time
            chunk = tokens[i:i + (1 << 24)]
            self.max_id = max(self.max_id, int(chunk.max()))
            if tokens.dtype.kind == "i":
                lowest = min(lowest, int(chunk.min()))
        if lowest < 0 or self.max_id >= 1 << 24:  # ids are embedding rows: id 2**40 would ask for terabytes
            raise ConfigError(f"{path} holds token id {min(lowest, 0) or self.max_id}: ids must be in 0..16,777,215")
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
        self.ids = ids
        self.block_size = block_size
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return (self.stop - self.start - 1) // self.block_size

    def __getitem__(self, i):
        begin = self.start + i * self.block_size
        chunk = self.ids[begin: begin + self.block_size + 1]
        return chunk[:-1], chunk[1:]


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
        data_format: Literal["auto", "text", "instruction"] = "auto",
        prompt_field: str = "prompt",
        response_field: str = "response",
        packing: bool = False,
    ):
        """data_path: a .txt/.md file, a JSONL file (one record per document, text in `text_field`) or a folder of
        them; default: this skill's references/. Or a .npy file of token ids, tokenized once (references/
        performance.md): memory-mapped, for corpora larger than memory. tokenizer: a Hugging Face name or folder;
        None = UTF-8 bytes (256 tokens; for a .npy file, its largest id + 1), or the model's own tokenizer when
        --model.name_or_path is set.
        data_format "instruction" (auto: a JSONL whose first record has `messages`, or prompt_field and
        response_field): a conversation per record, {"messages": [{"role": "user", "content": ...}, ...]} or
        {"prompt": ..., "response": ...}, through the tokenizer's chat template; only the assistant's tokens are
        learned. One row of at most block_size tokens each (cut), or with packing several, each seeing only itself."""
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
        if data_format == "instruction" and any(f.suffix.lower() != ".jsonl" for f in self.files):
            raise ConfigError(f"--data.data_format instruction reads JSONL files; {self.path} holds others")
        if data_format == "auto":  # stored resolved: generate renders prompts as the fit did
            self.hparams.data_format = "instruction" if self.token_file is None and all(
                f.suffix.lower() == ".jsonl" for f in self.files) and self.looks_like_conversations() else "text"
        self.packed_conversations = packing and self.hparams.data_format == "instruction"  # read by the model
        self.tokenizer = None
        self.train_sampler = None
        self.resume = {}
        if tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = pretrained(AutoTokenizer.from_pretrained, tokenizer, what="tokenizer",
                                        trust_remote_code=trust_remote_code)
            top, size = (self.token_file.max_id if self.token_file else -1), len(self.tokenizer)
            if top >= size:
                raise ConfigError(f"{self.path} holds token id {top}, outside the {size} tokens of {tokenizer!r}:"
                                  " pass the tokenizer the file was made with")

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer)
        return 256 if self.token_file is None else self.token_file.max_id + 1

    @staticmethod
    def read(file: Path) -> str:
        try:  # strictly: a file in another encoding would otherwise train as replacement characters
            return file.read_text(encoding="utf-8-sig")  # -sig: without a leading byte-order mark
        except UnicodeDecodeError as err:
            raise ConfigError(f"{file} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}):"
                              " convert it, e.g. iconv -f cp1252 -t utf-8 (Windows text) or -f utf-16, or move"
                              " it out") from None

    @staticmethod
    def records(file: Path, text: str):
        """(line number, record) of each non-empty line of a JSONL file."""
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{file}:{n} is not JSON ({err.msg}, column {err.colno}): one JSON object"
                                      " per line") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{file}:{n} is a JSON {type(record).__name__}, not an object with fields")
                yield n, record

    def looks_like_conversations(self) -> bool:
        with open(self.files[0], encoding="utf-8-sig", errors="replace") as f:
            first = next((line for line in f if line.strip()), "{}")
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            return False  # documents() names the line
        fields = self.hparams.prompt_field, self.hparams.response_field
        return isinstance(record, dict) and ("messages" in record or all(k in record for k in fields))

    def documents(self):
        for file in self.files:
            text = self.read(file)
            if file.suffix.lower() != ".jsonl":
                yield text
                continue
            for n, record in self.records(file, text):
                if not isinstance(record.get(self.hparams.text_field), str):
                    raise ConfigError(f"{file}:{n} has no text field {self.hparams.text_field!r} (fields:"
                                      f" {', '.join(record)}): set --data.text_field, or --data.data_format"
                                      " instruction for prompt/response records")
                yield record[self.hparams.text_field]

    def conversations(self):
        """(file:line, messages) of every record, as a list of {"role", "content"} turns."""
        prompt, response = self.hparams.prompt_field, self.hparams.response_field
        for file in self.files:
            for n, record in self.records(file, self.read(file)):
                where = f"{file}:{n}"
                if "messages" in record:
                    messages = record["messages"]
                elif prompt in record and response in record:
                    messages = [{"role": "user", "content": record[prompt]},
                                {"role": "assistant", "content": record[response]}]
                else:
                    raise ConfigError(f"{where} has neither 'messages' nor {prompt!r} and {response!r} (fields:"
                                      f" {', '.join(record)}): set --data.prompt_field and --data.response_field")
                if not (isinstance(messages, list) and messages and all(
                        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in messages)):
                    raise ConfigError(f"{where}: a conversation is a list of {{\"role\": ..., \"content\": text}}"
                                      " turns, and prompt and response are text")
                if not any(m["role"] == "assistant" for m in messages):
                    raise ConfigError(f"{where} has no assistant turn: nothing to learn")
                yield where, messages

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            return torch.tensor(list(text.encode("utf-8")) + [10], dtype=torch.long)  # a newline ends a document
        # Pieces of about 1 MB, cut after a newline: a tokenizer's output for a whole large file (offsets, Python
        # ints) takes hundreds of bytes per token; this keeps setup near the 8 bytes per token it ends with. Only
        # the first piece gets special tokens (a BOS once per document, as for the whole text).
        pieces = []
        start = 0
        while start < len(text):
            end = len(text) if len(text) - start <= 1 << 20 else (text.rfind("\n", start, start + (1 << 20)) + 1 or
                                                                     start + (1 << 20))
            ids = self.tokenizer(text[start:end], add_special_tokens=not pieces)["input_ids"]
            pieces.append(torch.tensor(ids, dtype=torch.long))
            start = end
        return torch.cat([*pieces, torch.tensor([self.tokenizer.eos_token_id or 0])])

    def setup(self, stage: str) -> None:
        if self.hparams.data_format == "instruction":
            return self.setup_conversations()
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

    def setup_conversations(self) -> None:
        block, cut, empty = self.hparams.block_size, 0, 0
        examples = []
        for where, messages in self.conversations():
            ids, labels = chat_tokens(self.tokenizer, messages, where=where)
            if len(ids) > block + 1:
                ids, labels, cut = ids[:block + 1], labels[:block + 1], cut + 1
            if all(label == -100 for label in labels[1:]):  # its answer starts after block_size tokens
                empty += 1
                continue
            examples.append((torch.tensor(ids[:-1]), torch.tensor(labels[1:])))  # input and target
        if cut or empty:
            rank_zero_warn(f"{cut} of {len(examples) + empty} conversations are longer than block_size {block}: cut"
                           f" at its end{f', and {empty} of them dropped (no answer left)' if empty else ''}; raise"
                           " --data.block_size to keep them whole")
        n_val = max(1, int(len(examples) * self.hparams.val_fraction))
        if len(examples) - n_val < 1:
            raise ConfigError(f"{len(examples)} usable conversations: too few for a training and a validation part")
        packing = self.hparams.packing
        self.train_set = Conversations(examples[:-n_val], block, packing)
        self.val_set = Conversations(examples[-n_val:], block, packing)
        processes = self.trainer.world_size if self.trainer is not None else 1
        if len(self.train_set) < self.hparams.batch_size * processes:  # full batches only: none would train
            raise ConfigError(f"{len(self.train_set)} training rows ({len(examples) - n_val} conversations"
                              f"{', packed' if packing else ''}) fill no batch of {self.hparams.batch_size} x"
                              f" {processes} process(es): lower --data.batch_size or add conversations")

    def _loader(self, dataset, **kwargs) -> DataLoader:
        workers = self.hparams.num_workers
        collate = pad_rows if isinstance(dataset, Conversations) else None
        # generator: each new iterator draws its workers' seed from it, not from the global random state, whose
        # sequence then holds dropout's draws only, as ResumableRandomState restores it mid-epoch (LoRA dropout)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=workers, collate_fn=collate,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(0), **kwargs)

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
        trainer = self.trainer
        sampler = self.train_sampler
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
# After training: text from a checkpoint (generate) and a Hugging Face folder (export)
# ----------------------------------------------------------------------------------------------------------------
def load_trained(checkpoint: str, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> tuple:
    """(module in eval mode, tokenizer or None for UTF-8 bytes, the fit's data options) of a single-file checkpoint,
    frozen weights in `dtype` (default float32); a QLoRA model in 4 bits again on a GPU with bitsandbytes."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    data = saved.get("datamodule_hyper_parameters", {})
    four_bit = device != "cpu" and importlib.util.find_spec("bitsandbytes") is not None
    lora = {"finetune": "lora"} if saved.get("hyper_parameters", {}).get("finetune") == "qlora" and not four_bit else {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default)  # what configure_model builds and loads the frozen weights in
    try:
        with warnings.catch_warnings():  # an adapter checkpoint lacks the frozen weights: on_load_checkpoint checks
            warnings.filterwarnings("ignore", "Found keys that are in the model state dict but not in the checkpoint")
            module = CausalLM.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True, **lora)
    finally:
        torch.set_default_dtype(default)
    tokenizer = None
    if data.get("tokenizer"):
        from transformers import AutoTokenizer

        tokenizer = pretrained(AutoTokenizer.from_pretrained, data["tokenizer"], what="tokenizer",
                               trust_remote_code=data.get("trust_remote_code"))
    return module.to(device).eval(), tokenizer, data


@torch.no_grad()
def generate(checkpoint: str, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: Optional[int] = 50, seed: int = 0) -> str:
    """Text generated by a single-file checkpoint from `prompt`, with the tokenizer it was trained with: after an
    instruction fit, the answer to the prompt as a user turn (rendered as in training); else the prompt and its
    continuation. temperature 0 takes the most likely token each time; top_k keeps the k likeliest. Transformers
    models use their generate() (KV cache, LoRA applied); the built-in GPT reruns its last block_size tokens."""
    cuda = torch.cuda.is_available()
    module, tokenizer, data = load_trained(checkpoint, "cuda" if cuda else "cpu",
                                           torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None)
    chat = data.get("data_format") == "instruction"
    if chat:
        ids = chat_tokens(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)[0]
    else:
        ids = tokenizer(prompt)["input_ids"] if tokenizer else list(prompt.encode("utf-8"))
    ids = torch.tensor([ids or [10]], device=module.device)  # byte 10 (newline) separates documents
    inner = transformers_model(module.model)
    ends = stop_tokens(tokenizer, inner, chat)
    torch.manual_seed(seed)
    if inner is not None:
        inner.set_attn_implementation("sdpa")  # generate() passes masks and positions, which CAUSAL_SDPA refuses
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else {
            "do_sample": False}
        pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else (
            ends or [0])[0]
        out = module.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad,
                                    max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=ends or None,
                                    **sampling)  # the mask: a prompt token equal to pad_token_id is not padding
    else:
        out, block = ids, data.get("block_size", 128)
        for _ in range(max_new_tokens):
            logits = module(out[:, -block:])[0, -1].float()
            if temperature <= 0:
                token = logits.argmax().view(1)
            else:
                logits = logits / temperature
                if top_k:
                    logits[logits < torch.topk(logits, min(top_k, logits.numel())).values[-1]] = float("-inf")
                token = torch.multinomial(logits.softmax(-1), 1)
            out = torch.cat([out, token.view(1, 1)], dim=1)
            if token.item() in ends:
                break
    tokens = out[0, ids.shape[1]:].tolist() if chat else out[0].tolist()
    if chat and tokens and tokens[-1] in ends:
        tokens = tokens[:-1]
    if tokenizer is not None:
        return tokenizer.decode(tokens, skip_special_tokens=chat)
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


def export(checkpoint: str, folder: str, adapter: bool = False, dtype: Optional[str] = None) -> Path:
    """Writes a Hugging Face folder of a single-file checkpoint (model config, weights, tokenizer) that
    AutoModelForCausalLM.from_pretrained loads: LoRA adapters merged into the weights, or with adapter=True kept as
    a peft adapter folder on the base model. dtype: the saved weights' (default float32)."""
    module, tokenizer, data = load_trained(checkpoint, dtype=getattr(torch, dtype) if dtype else None)
    inner = transformers_model(module.model)
    if inner is None:
        raise ConfigError("the built-in GPT (model_type gpt) has no Hugging Face format: train a transformers type"
                          " (--model.model_type gpt2 or llama) to export, or save module.model.state_dict()")
    inner.config.use_cache = True  # what generate() wants; training switched it off
    if data.get("data_format") == "instruction" and tokenizer is not None:  # generate() and pipeline() stop there
        inner.generation_config.eos_token_id = stop_tokens(tokenizer, inner, chat=True)
    out = save_hf_folder(module.model, tokenizer, folder, adapter, dtype)
    if tokenizer is None:
        rank_zero_warn(f"{out} has no tokenizer: this model was trained on UTF-8 bytes (token = byte value)")
    return out


TOOLS = {  # python causal_lm.py NAME --help
    "export": ("A Hugging Face folder of a trained checkpoint: config, weights (LoRA merged in) and tokenizer, for"
               " AutoModelForCausalLM.from_pretrained(FOLDER). Example: python causal_lm.py export --out my_model",
               EXPORT_OPTIONS, lambda ckpt, o: print(f"exported {ckpt} to {export(ckpt, o.out, o.adapter, o.dtype)}")),
    "generate": ("Text from a trained checkpoint. Example: python causal_lm.py generate --prompt 'Once upon a time'", [
        (["--prompt"], {"default": "\n", "help": "the text to continue (after an instruction fit: the question)"}),
        (["--max_new_tokens"], {"type": int, "default": 200}),
        (["--temperature"], {"type": float, "default": 0.8, "help": "0: the likeliest token each time"}),
        (["--top_k"], {"type": int, "default": 50}),
        (["--seed"], {"type": int, "default": 0})],
        lambda ckpt, o: print(generate(ckpt, o.prompt, o.max_new_tokens, o.temperature, o.top_k, o.seed))),
}


# ----------------------------------------------------------------------------------------------------------------
# Command line: TemplateCLI (lightning_support.py) adds the checkpoints and checks every run gets
# ----------------------------------------------------------------------------------------------------------------
class CausalLMCLI(TemplateCLI):
    absolute_paths = (("model", "name_or_path"), ("data", "tokenizer"))  # stored in checkpoints
    then = ("generate --prompt TEXT", "export --out hf_model")  # fit's next: lines (no predict step)

    def add_template_arguments(self, parser):
        self.link(parser, "data.vocab_size", "model.vocab_size")
        parser.add_lightning_class_args(Throughput, "throughput")

    def check_config(self, subcommand, config) -> None:
        if subcommand in ("test", "predict"):
            raise ConfigError(f"causal_lm.py has no {subcommand} step: score a checkpoint with validate --ckpt_path"
                              " CKPT (val_loss and val_ppl on the held-out end of the corpus), or generate text"
                              " with generate --prompt TEXT")
        model = config.model
        if model.finetune != "full" and not model.name_or_path:
            raise ConfigError(f"--model.finetune {model.finetune} adapts a pretrained model: set --model.name_or_path")
        if model.name_or_path:
            return
        if model.model_type == "gpt":  # its sizes checked now, not after the data is read
            with torch.device("meta"):
                build_gpt(model.model_config, 256)
        else:
            model_config_of(model.model_type, model.model_config, 256)

    def instantiate_trainer(self, **kwargs):
        config = (self.config[self.subcommand] if self.subcommand else self.config).trainer
        batches = (config.max_steps or 0) * (config.accumulate_grad_batches or 1)  # what val_check_interval counts
        if isinstance(config.val_check_interval, int) and config.check_val_every_n_epoch is None and \
                0 < batches < config.val_check_interval:  # here, not in the config: the saved config.yaml keeps 50
            kwargs["val_check_interval"] = batches  # a short run still validates (and saves best.ckpt) at its end
        trainer = super().instantiate_trainer(**kwargs)
        if isinstance(trainer.strategy, ModelParallelStrategy):  # a size mismatch only fails later, inside fit
            sizes = config.strategy.init_args
            dp = sizes.data_parallel_size
            tp = sizes.tensor_parallel_size
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
        super().after_fit()


def main(args=None, run: bool = True, callbacks: tuple = ()):
    """The command line (see the docstring). run=False builds model, data and trainer and returns the CLI."""
    # Lightning looks for a state_dict on the DataLoader; TextData keeps the position in its own (ResumableSampler).
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")  # peft 0.21 asks transformers 5.25
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] in (["export"], ["generate"]):  # beside LightningCLI's subcommands
        return run_tool(argv, TOOLS, "runs/causal_lm")
    return run_cli(CausalLMCLI, CausalLM, TextData, args, run, callbacks,
                   trainer_defaults={"max_steps": 200, "val_check_interval": 50, "check_val_every_n_epoch": None,
                                     "limit_val_batches": 20, "log_every_n_steps": 10, "gradient_clip_val": 1.0,
                                     "default_root_dir": "runs/causal_lm"})


if __name__ == "__main__":
    main()
