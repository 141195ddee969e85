"""Detect the hardware and turn it into Lightning Trainer settings, each with its reason; with a model, a memory plan.

Usage:
    python scripts/detect_hardware.py                               # this machine: table of settings and reasons
    python scripts/detect_hardware.py --model meta-llama/Llama-2-7b-hf --finetune lora   # plus a memory plan
    python scripts/detect_hardware.py --model ./my_model --seq-len 1024 --batch-size 8   # a folder with config.json
    python scripts/detect_hardware.py --params 350M --format json   # a bare parameter count, for agents
    python scripts/detect_hardware.py --format yaml > hardware.yaml # a `trainer:` section for any template:
    python templates/tabular.py fit --config hardware.yaml
    python scripts/detect_hardware.py --profile machine.json --model meta-llama/Llama-2-7b-hf --batch-size 4
                                    # plan for a machine described in a file (--precision to choose one)

--model: a folder holding config.json, a config.json, a name of the built-in table (Llama 2/3, TinyLlama, Mistral,
Qwen2.5, GPT-2), or a name in the local Hugging Face cache (read offline). The parameter count then comes from the
shape; --params alone assumes a typical shape and a 50,304-token vocabulary.

--profile FILE.json describes a machine instead of detecting this one (per node; one entry per accelerator):
    {"cpu_count": 16, "ram_gb": 64, "accelerator": "cuda",
     "gpus": [{"name": "NVIDIA GeForce RTX 4090", "memory_gb": 25.4, "capability": [8, 9]}],
     "num_nodes": 1, "launcher": null, "packages": ["deepspeed"]}
memory_gb is torch.cuda.get_device_properties(i).total_memory / 1e9 (decimal GB, as torch reports it: 25.4 for a
"24 GB" RTX 4090, 85.0 for an "80 GB" H100); ram_gb is decimal GB too. An Apple machine: {"cpu_count": 10,
"ram_gb": 32, "accelerator": "mps"} (one device sharing system memory).

The memory plan (AdamW; any precision; full, LoRA or QLoRA) adds per device the peak of one step: weights, gradients,
optimizer state, autocast's 16-bit weight copies, DDP buckets or FSDP gather buffers, activations (calibrated per
architecture by counting the tensors saved for backward) and logits, for DDP, FSDP, and CPU offload, and picks the
cheapest set-up that fits in 90% of device memory less 1 GB (the CUDA context and allocator). When nothing fits it
lists every option that does, with its numbers and causal_lm.py flags.
Exit codes: 0 ok; 1 with --format yaml when no set-up fits (nothing is printed to stdout); 2 bad input.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import sys

HEADROOM, RESERVED_GB = 0.9, 1.0  # usable share of device memory, and what the CUDA context and allocator keep
CPU_RAM_SHARE = 0.8  # share of RAM a CPU/offload plan may use
VOCAB = 50304  # --params alone: logits are estimated for a 50k vocabulary
DEFAULT_LORA_R = 16
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
ACCELERATORS = ("cuda", "mps", "tpu", "cpu")
LAUNCHERS = (None, "slurm", "torchrun")
OPTIONAL_PACKAGES = ("deepspeed", "transformer_engine", "flash_attn")


class UsageError(ValueError):
    """Bad input: one line on stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line is easier to act on
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --- Inputs ---
def parse_size(text: str) -> int:
    """'7e9', '7B', '350M', '1.5b', '125000000' -> number of parameters."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", str(text), re.I)
    if not match:
        raise UsageError(f"cannot read parameter count {text!r}: use a number such as 7e9, 7B or 350M")
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    if not 1 <= value < math.inf:
        raise UsageError(f"parameter count must be positive and finite, got {text!r}")
    return int(value)


def read_json(path: str, what: str):
    """A JSON file, or one UsageError line naming it (and the line and column of a syntax error)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except OSError as err:
        problem = f"cannot read {what} {path} ({err.strerror}); pass a readable JSON file"
    except UnicodeDecodeError as err:
        problem = f"{what} {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSON"
    except json.JSONDecodeError as err:
        problem = f"{what} {path} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno})"
    except RecursionError:
        problem = f"{what} {path} is nested too deeply to be a JSON description"
    raise UsageError(problem)


def load_profile(path: str) -> dict:
    return validate_machine(read_json(path, "profile"), source=f"profile {path}")


def _positive(value) -> bool:
    """A finite number above zero (JSON allows NaN and Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _whole(value, low=1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def validate_machine(data, source: str) -> dict:
    def bad(what):
        raise UsageError(f"{source}: {what}")

    if not isinstance(data, dict):
        bad("must be a JSON object")
    accelerator = data.get("accelerator")
    if accelerator not in ACCELERATORS:
        bad(f"unknown accelerator {accelerator!r}; use one of {', '.join(ACCELERATORS)}")
    if not _positive(data.get("ram_gb")):
        bad("ram_gb must be a positive number")
    for key in ("cpu_count", "num_nodes", "tasks_per_node"):  # whole numbers; the last two optional
        value = data.get(key)
        if (value is not None or key == "cpu_count") and not _whole(value):
            bad(f"{key} must be a positive number, a whole one (got {value!r})")
    gpus = data.get("gpus", [])
    if accelerator == "mps" and not gpus:  # Apple silicon: one device sharing the machine's memory
        gpus = [{"name": "Apple MPS", "memory_gb": data["ram_gb"]}]
    if not isinstance(gpus, list) or (accelerator != "cpu" and not gpus):
        bad(f"'gpus' must list one entry per {accelerator} device")
    for gpu in gpus:
        if not isinstance(gpu, dict) or not _positive(gpu.get("memory_gb")):
            bad("each gpus entry needs memory_gb, a positive number: torch.cuda.get_device_properties(i)"
                ".total_memory / 1e9")
        if "free_gb" in gpu and not _positive(gpu["free_gb"]):
            bad("free_gb must be a positive number")
        capability = gpu.get("capability", [0, 0] if accelerator != "cuda" else None)
        if not (isinstance(capability, list) and len(capability) == 2
                and all(isinstance(c, int) and c >= 0 for c in capability)):
            bad("each CUDA gpus entry needs capability [major, minor], e.g. [8, 0]")
    launcher = data.get("launcher")
    if launcher not in LAUNCHERS:
        bad(f"unknown launcher {launcher!r}; use null, \"slurm\" or \"torchrun\"")
    packages = data.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        bad("packages must be a list of names")
    return {
        "cpu_count": int(data["cpu_count"]), "ram_gb": float(data["ram_gb"]), "accelerator": accelerator,
        "gpus": [{"name": str(g.get("name", accelerator)), "memory_gb": float(g["memory_gb"]),
                  "free_gb": float(g.get("free_gb", g["memory_gb"])),
                  "capability": list(g.get("capability", [0, 0]))} for g in (gpus if accelerator != "cpu" else [])],
        "num_nodes": data.get("num_nodes", 1), "launcher": launcher,
        "tasks_per_node": data.get("tasks_per_node"), "packages": sorted(set(packages)),
    }


def detect_machine() -> dict:
    """Live detection of this node (needs torch)."""
    import torch

    cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        ram_gb = 8.0  # unknown (Windows): assume a modest machine
    gpus, accelerator = [], "cpu"
    if torch.cuda.is_available():
        accelerator = "cuda"
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)  # memory_gb: the unit --profile uses (decimal GB)
            free, _ = torch.cuda.mem_get_info(i)
            gpus.append({"name": props.name, "memory_gb": props.total_memory / 1e9, "free_gb": free / 1e9,
                         "capability": [props.major, props.minor]})
    elif importlib.util.find_spec("torch_xla") is not None and (tpus := _xla_devices()):
        accelerator = "tpu"
        gpus = [{"name": "TPU", "memory_gb": 16.0} for _ in range(tpus)]
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        accelerator = "mps"  # unified memory
        gpus = [{"name": "Apple MPS", "memory_gb": ram_gb}]
    packages = [name for name in OPTIONAL_PACKAGES if _imports(name, accelerator)]
    machine = {"cpu_count": cpu_count, "ram_gb": round(ram_gb, 1), "accelerator": accelerator, "gpus": gpus,
               "num_nodes": 1, "launcher": None, "packages": packages, **detect_launcher()}
    return validate_machine(machine, source="detected machine")


def _xla_devices() -> int:
    try:
        import torch_xla.runtime as xr

        return int(xr.global_runtime_device_count())
    except Exception:  # torch_xla present but unusable: treat as no TPU
        return 0


def _imports(module: str, accelerator: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    if accelerator != "cuda":  # they only matter with CUDA: skip their slow imports
        return True
    try:
        importlib.import_module(module)
        return True
    except Exception:  # installed but broken (e.g. built for another CUDA): not usable
        return False


def detect_launcher() -> dict:
    """SLURM (srun, not an interactive allocation) or torchrun, from the variables they set."""
    if os.getenv("SLURM_NTASKS") and os.getenv("SLURM_JOB_NAME") not in ("bash", "interactive"):
        per_node = re.match(r"\d+", os.getenv("SLURM_NTASKS_PER_NODE", ""))  # e.g. "8" or "8(x2)"
        return {"launcher": "slurm", "num_nodes": int(os.getenv("SLURM_NNODES", "1")),
                "tasks_per_node": int(per_node.group(0)) if per_node else None}
    if os.getenv("TORCHELASTIC_RUN_ID"):
        world, local = int(os.getenv("WORLD_SIZE", "1")), int(os.getenv("LOCAL_WORLD_SIZE", "1"))
        return {"launcher": "torchrun", "num_nodes": max(1, world // max(1, local)), "tasks_per_node": local}
    return {}


# --- Models ---
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "tie_word_embeddings")
# Public config.json values (SHAPE_KEYS), then other names of the same shape.
KNOWN_MODELS = {
    "meta-llama/Llama-2-7b-hf": (("llama", 32000, 4096, 32, 32, 32, 11008, False),
                                 ["meta-llama/Llama-2-7b", "meta-llama/Llama-2-7b-chat-hf"]),
    "meta-llama/Llama-2-13b-hf": (("llama", 32000, 5120, 40, 40, 40, 13824, False),
                                  ["meta-llama/Llama-2-13b", "meta-llama/Llama-2-13b-chat-hf"]),
    "meta-llama/Meta-Llama-3-8B": (("llama", 128256, 4096, 32, 32, 8, 14336, False),
                                   ["meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Llama-3.1-8B",
                                    "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B",
                                    "meta-llama/Meta-Llama-3.1-8B-Instruct"]),
    "meta-llama/Llama-3.2-1B": (("llama", 128256, 2048, 16, 32, 8, 8192, True), ["meta-llama/Llama-3.2-1B-Instruct"]),
    "meta-llama/Llama-3.2-3B": (("llama", 128256, 3072, 28, 24, 8, 8192, True), ["meta-llama/Llama-3.2-3B-Instruct"]),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": (("llama", 32000, 2048, 22, 32, 4, 5632, False),
                                           ["TinyLlama/TinyLlama_v1.1", "TinyLlama/TinyLlama-1.1B"]),
    "mistralai/Mistral-7B-v0.1": (("mistral", 32000, 4096, 32, 32, 8, 14336, False),
                                  ["mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.2"]),
    "Qwen/Qwen2.5-0.5B": (("qwen2", 151936, 896, 24, 14, 2, 4864, True), ["Qwen/Qwen2.5-0.5B-Instruct"]),
    "Qwen/Qwen2.5-1.5B": (("qwen2", 151936, 1536, 28, 12, 2, 8960, True), ["Qwen/Qwen2.5-1.5B-Instruct"]),
    "Qwen/Qwen2.5-7B": (("qwen2", 152064, 3584, 28, 28, 4, 18944, False), ["Qwen/Qwen2.5-7B-Instruct"]),
    "openai-community/gpt2": (("gpt2", 50257, 768, 12, 12, 12, 3072, True), ["gpt2"]),
    "openai-community/gpt2-medium": (("gpt2", 50257, 1024, 24, 16, 16, 4096, True), ["gpt2-medium"]),
}
# LoRA's default targets per model_type, as templates/lightning_support.py's LORA_TARGETS (a test checks it); any
# other type: every Linear layer of each block (peft's "all-linear").
LORA_TARGETS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite"),
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj is in the attention and in the MLP: both are adapted
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
COUNTED_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                 "granite", "gpt2", "gpt_neox")  # parameter counts checked against transformers' models
NON_GATED = ("gpt2", "gpt_neox")  # LayerNorm + 4h GELU MLP; every other type is counted as a Llama-style block
LEARNED_POSITIONS = ("gpt2",)


def load_model(text: str) -> dict:
    """--model's shape: from a folder or config.json, the built-in table, or the Hugging Face cache (offline)."""
    if os.path.isdir(text) or os.path.isfile(text):
        path = os.path.join(text, "config.json") if os.path.isdir(text) else text
        config = read_json(path, f"--model {text} file")
        if not isinstance(config, dict):
            raise UsageError(f"--model {text}: {path} must hold a JSON object")
        return model_from_config(_with_defaults(config), text, f"config.json ({path})")
    key = text.strip().lower()
    for name, (shape, aliases) in KNOWN_MODELS.items():
        if key in {n.lower() for n in [name, *aliases]}:
            return model_from_config(dict(zip(SHAPE_KEYS, shape)), text, f"built-in table ({name})")
    config = _cached_config(text)
    if config is None:
        raise UsageError(f"unknown model {text!r}: not a folder or config.json here, not in the built-in table, not"
                         " in the local Hugging Face cache; pass the model's folder or its config.json, or --params N")
    return model_from_config(config, text, "local Hugging Face cache")


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # its notes on unusual configs are not this script's errors
    return transformers


def _with_defaults(config: dict) -> dict:
    """A config.json's keys completed with transformers' defaults for its model_type, where transformers knows it."""
    if not config.get("model_type"):
        return config
    try:
        merged = _transformers().AutoConfig.for_model(**config).to_dict()
    except Exception:  # not installed, or a model_type it does not know: the file's own keys
        return config
    for key, value in config.items():  # the file's values win, nested ones (text_config) key by key
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both else value
    return merged


def _cached_config(name: str):
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return None
    try:
        return _transformers().AutoConfig.from_pretrained(name, local_files_only=True).to_dict()  # the cache only
    except Exception:  # not installed, not cached, or not a model
        return None


def _get(config: dict, *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def model_from_config(config: dict, name: str, source: str) -> dict:
    """The shape the memory model needs."""
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    if hidden is None and isinstance(config.get("text_config"), dict):  # a multimodal config: its language model
        config = {"model_type": config.get("model_type"), **config["text_config"]}
        hidden = _get(config, "hidden_size", "n_embd", "d_model")
    model_type = str(config.get("model_type") or "unknown")
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(config, "num_attention_heads", "n_head")
    vocab = _get(config, "vocab_size")
    if not all(_whole(v) for v in (hidden, layers, heads, vocab)):
        raise UsageError(f"--model {name}: {source} lacks a positive hidden_size, num_hidden_layers,"
                         " num_attention_heads or vocab_size; pass --params N instead")
    for key, low in (("num_key_value_heads", 1), ("head_dim", 1), ("intermediate_size", 1), ("n_inner", 1),
                     ("num_local_experts", 0), ("num_experts_per_tok", 1)):
        value = config.get(key)
        if value is not None and not _whole(value, low):
            raise UsageError(f"--model {name}: {source}: {key} must be a whole number >= {low}, got {value!r}")
    kv_heads = _get(config, "num_key_value_heads", default=heads)
    head_dim = _get(config, "head_dim", default=hidden // heads)
    intermediate = _get(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    return {
        "name": name, "source": source, "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "intermediate_size": intermediate,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", model_type in LEARNED_POSITIONS)),
        "positions": _get(config, "n_positions", "max_position_embeddings", default=1024)
        if model_type in LEARNED_POSITIONS else 0,
        "attention_bias": bool(config.get("attention_bias", model_type in ("qwen2", "gpt_neox"))),
        "mlp_bias": bool(config.get("mlp_bias")), "experts": int(_get(config, "num_local_experts", default=0)),
        "experts_per_token": int(_get(config, "num_experts_per_tok", default=1)), "estimated": False,
    }


def model_from_params(params: int) -> dict:
    """--params alone: a typical Llama-style shape, a gated MLP of 8/3 hidden and a 50,304-token vocabulary whose
    embeddings the count is assumed to include."""
    hidden = (128 * params / 12) ** (1 / 3)  # params ~ 12 x layers x hidden^2, hidden/layers ~ 128
    layers, hidden = max(1, round(hidden / 128)), int(hidden)
    heads = max(1, round(hidden / 128))
    return {"name": None, "source": "--params", "model_type": "unknown", "vocab_size": VOCAB, "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "head_dim": hidden / heads, "intermediate_size": int(8 * hidden / 3), "tie_word_embeddings": False,
            "positions": 0, "attention_bias": False, "mlp_bias": False, "experts": 0, "experts_per_token": 1,
            "estimated": True, "params": params}


def block_linears(model: dict) -> list:
    """(name, in_features, out_features, bias) of the Linear layers of one block (Conv1D for GPT-2)."""
    h, i = model["hidden_size"], model["intermediate_size"]
    q, kv = model["num_attention_heads"] * model["head_dim"], model["num_key_value_heads"] * model["head_dim"]
    t, bias, qkv_bias = model["model_type"], model["mlp_bias"], model["attention_bias"]
    if t == "gpt2":
        return [("c_attn", h, 3 * h, True), ("c_proj", h, h, True), ("c_fc", h, i, True), ("c_proj", i, h, True)]
    if t == "gpt_neox":
        return [("query_key_value", h, 3 * h, qkv_bias), ("dense", h, h, qkv_bias), ("dense_h_to_4h", h, i, True),
                ("dense_4h_to_h", i, h, True)]
    if t == "phi3":
        return [("qkv_proj", h, q + 2 * kv, False), ("o_proj", q, h, False), ("gate_up_proj", h, 2 * i, False),
                ("down_proj", i, h, False)]
    attention = [("q_proj", h, q, qkv_bias), ("k_proj", h, kv, qkv_bias), ("v_proj", h, kv, qkv_bias),
                 ("o_proj", q, h, qkv_bias and t != "qwen2")]
    if model["experts"]:  # Mixtral-style: the experts are fused parameters in transformers 5, not Linear layers
        return attention
    return attention + [("gate_proj", h, i, bias), ("up_proj", h, i, bias), ("down_proj", i, h, bias)]


def param_counts(model: dict) -> dict:
    """Parameters: total, the blocks' Linear weights, the output layer (0 if tied) and the rest (embeddings, norms,
    biases, experts). Exact for COUNTED_TYPES, close for Llama-like others."""
    if model["estimated"]:
        return {"total": model["params"], "linear": model["params"], "lm_head": 0, "other": 0}
    h, layers, v = model["hidden_size"], model["num_hidden_layers"], model["vocab_size"]
    linears = block_linears(model)
    linear = layers * sum(n_in * n_out for _, n_in, n_out, _ in linears)
    biases = layers * sum(n_out for _, _, n_out, bias in linears if bias)
    t = model["model_type"]
    if t in NON_GATED:  # two LayerNorms (weight and bias) per block and a final one
        norms = layers * 4 * h + 2 * h
    else:  # RMSNorm weights: two per block (four in Gemma 2/3), a final one, q/k norms in Qwen 3 and Gemma 3
        per_block = 4 * h if t in ("gemma2", "gemma3", "gemma3_text") else 2 * h
        per_block += 2 * model["head_dim"] if t in ("qwen3", "gemma3", "gemma3_text") else 0
        if t == "olmo2":  # q/k norms over all heads
            per_block += (model["num_attention_heads"] + model["num_key_value_heads"]) * model["head_dim"]
        norms = layers * per_block + h
    experts = layers * model["experts"] * (3 * h * model["intermediate_size"] + h)
    embeddings = v * h + model["positions"] * h
    lm_head = 0 if model["tie_word_embeddings"] else v * h
    other = embeddings + norms + biases + experts
    return {"total": linear + other + lm_head, "linear": linear, "lm_head": lm_head, "other": other}


def lora_params(model: dict, r: int) -> int:
    """Trainable parameters of rank-r LoRA adapters on the targeted Linear layers of every block."""
    targets = LORA_TARGETS.get(model["model_type"])
    return model["num_hidden_layers"] * sum(r * (n_in + n_out) for name, n_in, n_out, _ in block_linears(model)
                                            if targets is None or name in targets)


# --- Memory model ---
# Bytes saved for backward per token by one block, counted with saved_tensors_hooks in transformers' LlamaDecoderLayer
# and GPT2Block (references/performance.md, "How detect_hardware.py estimates memory"): per hidden unit, per
# intermediate unit, per key/value width, per hidden unit with activation checkpointing; by precision mode (mixed:
# autocast over float32 weights; half: 16-true/bf16-true; fp32) and adapters (LoRA).
ACTIVATION_BYTES = {
    "llama": {("mixed", False): (30, 8, 4, 4), ("mixed", True): (24, 8, 4, 2), ("half", False): (20, 8, 4, 2),
              ("half", True): (16, 8, 4, 2), ("fp32", False): (32, 16, 8, 4), ("fp32", True): (24, 16, 8, 4)},
    "gpt2": {("mixed", False): (24, 10, 0, 4), ("mixed", True): (22, 10, 0, 2), ("half", False): (20, 10, 0, 2),
             ("half", True): (20, 10, 0, 2), ("fp32", False): (40, 20, 0, 4), ("fp32", True): (40, 20, 0, 4)},
}
HEAD_BYTES = {"mixed": 10, "half": 6, "fp32": 8}  # per token per hidden unit: the final norm and the head's input
# Peak bytes per token per vocabulary entry of the logits and the loss at the start of backward: the float32
# log-softmax saved for backward, its gradient and the gradient of the logits (16-bit in 16-true/bf16-true).
LOGIT_BYTES = {"mixed": 12, "half": 6, "fp32": 12}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA: 4-bit NF4, 8-bit absmax per 64 weights, fp32 absmax per 256 of those


def precision_mode(precision: str) -> str:
    return {"32-true": "fp32", "64-true": "fp32", "16-true": "half", "bf16-true": "half"}.get(precision, "mixed")


def layer_activation_bytes(model: dict, precision: str, finetune: str = "full", checkpointing: bool = False) -> float:
    """Bytes per token that one block keeps for backward (with checkpointing: its input only)."""
    mode = precision_mode(precision)
    family = "gpt2" if model["model_type"] in NON_GATED else "llama"
    per_hidden, per_inter, per_kv, checkpointed = ACTIVATION_BYTES[family][(mode, finetune != "full")]
    if checkpointing:
        return checkpointed * model["hidden_size"]
    inter = model["intermediate_size"] * (model["experts_per_token"] if model["experts"] else 1)
    kv = model["num_key_value_heads"] * model["head_dim"]
    return per_hidden * model["hidden_size"] + per_inter * inter + per_kv * kv


def memory_gb(model, finetune, precision, seq_len, batch, strategy, world, checkpointing, lora_r=16) -> dict:
    """Per-device memory (GB) of one training step, by term. model: a dict from load_model / model_from_params, or
    a bare parameter count. strategy: single|ddp|fsdp|offload (FSDP CPU offload)|zero3_offload (DeepSpeed)."""
    model = model if isinstance(model, dict) else model_from_params(model)
    counts = param_counts(model)
    n, mode = counts["total"], precision_mode(precision)
    trained_bytes = 8 if precision == "64-true" else 2 if mode == "half" else 4  # -mixed keeps float32 weights
    if finetune == "full":
        trainable, frozen = n, 0.0
    else:
        trainable = lora_params(model, lora_r)
        if finetune == "qlora":  # the blocks' Linear weights in NF4; embeddings, norms and the head in bfloat16
            frozen = counts["linear"] * NF4_BITS / 8 + (n - counts["linear"]) * 2
        else:  # the frozen model in bfloat16/float16 (float32 under 32-true)
            frozen = n * (4 if mode == "fp32" else 2)
    grads = trainable * trained_bytes
    weights, optimizer = grads + frozen, 2 * grads  # AdamW: two states in the parameter's dtype
    copies = 0.0
    if mode == "mixed":  # autocast keeps a 16-bit copy of each float32 weight a matmul uses, until backward
        copies = 2 * (counts["linear"] + model["vocab_size"] * model["hidden_size"]) if finetune == "full" \
            else 2 * trainable
    if finetune == "qlora":  # one layer's weight dequantized at a time
        copies += 2 * max(n_in * n_out for _, n_in, n_out, _ in block_linears(model))
    tokens = seq_len * batch
    layers, hidden = model["num_hidden_layers"], model["hidden_size"]
    per_layer = layer_activation_bytes(model, precision, finetune) * tokens
    if checkpointing:  # block inputs, and one block recomputed at a time during backward
        activations = layers * layer_activation_bytes(model, precision, finetune, True) * tokens + per_layer
    else:
        activations = layers * per_layer
    activations += HEAD_BYTES[mode] * hidden * tokens
    logits = LOGIT_BYTES[mode] * tokens * model["vocab_size"]
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "autocast_copies": copies,
             "ddp_buckets": 0.0, "gather_buffer": 0.0, "activations": activations, "logits": logits}
    gathered = 2 if mode != "fp32" else 4  # FSDP and DeepSpeed gather 16-bit weights under -mixed precision
    root = 0 if model["estimated"] else model["vocab_size"] * hidden * (1 if model["tie_word_embeddings"] else 2)
    gather = gathered * (2 * (n - root) / layers + root)  # the embeddings and head, one block in use, one prefetched
    host = 0.0
    if strategy == "ddp" and world > 1:
        parts["ddp_buckets"] = grads  # DDP keeps a flat copy of the gradients for all-reduce
    elif strategy == "fsdp":
        for key in ("weights", "gradients", "optimizer"):
            parts[key] /= world
        parts.update(autocast_copies=0.0, gather_buffer=gather)
    elif strategy in ("offload", "zero3_offload"):  # weights, gradients and optimizer state live in CPU memory
        host = weights + grads + optimizer + (2 * n if strategy == "zero3_offload" else 0)  # ZeRO-3: + 16-bit weights
        parts.update(weights=0.0, gradients=0.0, optimizer=0.0, autocast_copies=0.0, gather_buffer=gather)
    g = {k: v / 1e9 for k, v in parts.items()}
    kept = g["weights"] + g["optimizer"] + g["ddp_buckets"] + g["gather_buffer"]  # held through the whole step
    # The peak is the largest of three moments: the start of backward (activations and logits, no gradients yet;
    # autocast's copies unless checkpointing dropped them), the end of forward (the copies still cached, the loss at 10
    # of its 12 bytes per logit) and the optimizer step (every gradient, no activations: backward frees them).
    backward = kept + g["activations"] + g["logits"] + (0 if checkpointing else g["autocast_copies"])
    forward_end = kept + g["activations"] + g["logits"] * 10 / 12 + g["autocast_copies"]
    step = kept + g["gradients"]
    moments = {"optimizer step": step, "start of backward": backward, "end of forward": forward_end}
    peak_at = max(moments, key=moments.get)
    states = max(kept + g["autocast_copies"], step)  # what no micro-batch or checkpointing can shrink
    return {"per_device_gb": moments[peak_at], "breakdown": g, "states_gb": states, "host_gb": host / 1e9,
            "peak_at": peak_at, "trainable_params": trainable}


# --- Decisions ---
def choose_precision(machine: dict, params, finetune: str, reasons: list, warnings=None, requested=None) -> str:
    acc = machine["accelerator"]
    capability = tuple(min(g["capability"] for g in machine["gpus"])) if acc == "cuda" else None
    old_card = capability is not None and capability < (8, 0)
    sm = f"compute capability {capability[0]}.{capability[1]}" if capability else ""
    if requested:
        if requested.startswith("bf16") and old_card and warnings is not None:
            warnings.append(f"--precision {requested}: {sm} has no fast bf16; 16-mixed is the usual choice"
                            " before Ampere")
        reasons.append(f"precision {requested}: given with --precision")
        return requested
    if capability is None:
        why = {"cpu": "CPUs without bf16 matrix units run mixed precision slower, not faster",
               "mps": "Lightning maps 16-mixed on MPS to torch.autocast('mps'), but op coverage and speed-ups vary;"
                      " try 16-mixed and measure",
               "tpu": "XLA supports 32-true, 16-true and bf16-true (no -mixed); bf16-true halves weight memory at"
                      " some stability cost"}[acc]
        reasons.append(f"precision 32-true: {why}")
        return "32-true"
    if old_card:
        reasons.append(f"precision 16-mixed: {sm} is older than Ampere (no fast bf16); fp16 autocast with loss scaling")
        return "16-mixed"
    fp8 = capability >= (8, 9) and params and params >= 1e9  # Ada 8.9, Hopper 9.0, Blackwell 10.x/12.x
    if fp8 and "transformer_engine" in machine["packages"] and finetune == "full":
        reasons.append("precision transformer-engine: FP8 on an Ada/Hopper/Blackwell card with transformer_engine"
                       " installed, for a model large enough to gain from it")
        return "transformer-engine"
    note = " (transformer_engine would enable FP8 on this card)" if fp8 else ""
    reasons.append(f"precision bf16-mixed: Ampere or newer has bf16 tensor cores; no loss scaling needed{note}")
    return "bf16-mixed"


def offload_kind(machine: dict) -> tuple:
    """(Lightning strategy, memory-model strategy) of CPU offload on this machine."""
    if "deepspeed" in machine["packages"] and machine["accelerator"] == "cuda":
        return "deepspeed_stage_3_offload", "zero3_offload"
    return "fsdp_cpu_offload", "offload"


def candidates(machine: dict, world: int, finetune: str = "full") -> list:
    """(name, lightning strategy, memory strategy, activation checkpointing), cheapest in speed first."""
    acc, single = machine["accelerator"], world == 1
    if acc == "tpu":  # "auto" selects Lightning's XLAStrategy: one replica per TPU device
        return [("single" if single else "xla", "auto", "single", False)]
    replicas = ("single", "auto", "single") if single else ("ddp", "ddp", "ddp")
    plain, ckpt = (*replicas, False), (replicas[0] + "+ckpt", *replicas[1:], True)
    if acc == "cpu":
        return [plain]
    if acc == "mps":
        return [plain, (replicas[0] + "+ckpt", "auto", "single", True)]
    if finetune == "qlora":  # bitsandbytes' 4-bit weights: one replica per GPU
        return [plain, ckpt]
    offload, offload_memory = offload_kind(machine)
    fsdp = [("fsdp", "fsdp", "fsdp", False), ("fsdp+ckpt", "fsdp", "fsdp", True)]
    out = [plain, ckpt] if single else [plain, fsdp[0], ckpt, fsdp[1]]
    return out + [(offload, offload, offload_memory, False), (offload + "+ckpt", offload, offload_memory, True)]


def _size(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def finetune_label(finetune: str, lora_r: int) -> str:
    return {"full": "full fine-tune", "lora": f"LoRA (r={lora_r})", "qlora": f"QLoRA (r={lora_r})"}[finetune]


def describe_model(model: dict) -> str:
    size = _size(param_counts(model)["total"])
    if model["estimated"]:
        return (f"{size} parameters from --params; shape assumed: hidden {model['hidden_size']},"
                f" {model['num_hidden_layers']} layers, gated MLP, vocabulary {model['vocab_size']:,}")
    heads, kv = model["num_attention_heads"], model["num_key_value_heads"]
    return (f"{model['name']} from the {model['source']}: {size} parameters counted from the shape"
            f" ({model['model_type']}, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers,"
            f" {heads} heads" + (f" / {kv} key-value heads" if kv != heads else "")
            + f", MLP {model['intermediate_size']}, vocabulary {model['vocab_size']:,}"
            + (", tied embeddings" if model["tie_word_embeddings"] else "") + ")")


def plan(machine: dict, params=None, finetune="full", seq_len=2048, batch_size=1, precision=None,
         lora_r=DEFAULT_LORA_R) -> dict:
    """params: a parameter count, a model from load_model(), or None (no memory plan)."""
    reasons, warnings = [], []
    model = params if isinstance(params, dict) or params is None else model_from_params(params)
    n_params = param_counts(model)["total"] if model else None
    acc = machine["accelerator"]
    devices = len(machine["gpus"]) if acc in ("cuda", "tpu") else 1
    nodes = machine["num_nodes"]
    if machine["launcher"] in ("slurm", "torchrun") and machine.get("tasks_per_node") not in (None, devices):
        warnings.append(f"{machine['launcher']} starts {machine['tasks_per_node']} processes per node but this node has"
                        f" {devices} device(s): set --ntasks-per-node / --nproc-per-node to {devices}, or the run"
                        " stops with 'ValueError: You set devices=...' (DDP) or hangs (FSDP)")
    world = devices * nodes
    accelerator = "gpu" if acc == "cuda" else acc
    if acc == "cuda":
        what = f"{devices} CUDA device(s) per node: {machine['gpus'][0]['name']}"
    elif acc == "mps":
        what = "Apple GPU through Metal (MPS); one device, no multi-process strategies"
    elif acc == "tpu":
        what = f"{devices} TPU device(s) through torch_xla"
    else:
        what = "no GPU found" if not machine["gpus"] else "CPU requested"
    reasons.append(f"accelerator {accelerator}: {what}")
    precision = choose_precision(machine, n_params, finetune, reasons, warnings, precision)
    if finetune == "qlora" and acc != "cuda":
        warnings.append("QLoRA (bitsandbytes 4-bit weights) runs on CUDA GPUs only: use --finetune lora here")
    host_budget = machine["ram_gb"] * CPU_RAM_SHARE
    if acc == "cpu":
        budget = host_budget
    elif acc == "mps":
        budget = machine["ram_gb"] * 0.6  # unified memory shared with the OS and the CPU side of the program
    else:
        budget = min(min(g["memory_gb"] for g in machine["gpus"]) * HEADROOM - RESERVED_GB,
                     min(g["free_gb"] for g in machine["gpus"]) - RESERVED_GB)

    setups = candidates(machine, world, finetune)
    chosen, table, fits, options = setups[0], [], True, []
    memory = {"per_device_gb": None, "budget_gb": round(budget, 2), "breakdown": {}}
    info = None
    if model is not None:
        fits = False
        reasons.append("model: " + describe_model(model))
        if not model["estimated"] and model["model_type"] not in COUNTED_TYPES:
            warnings.append(f"model_type {model['model_type']!r} is not one whose layout this script knows: it is"
                            " counted as a Llama-style decoder; if the parameter count above is off, pass --params N")
        ranked = []
        for cand in setups:
            est = memory_gb(model, finetune, precision, seq_len, batch_size, cand[2], world, cand[3], lora_r)
            ok = est["per_device_gb"] <= budget and est["host_gb"] / nodes <= host_budget
            table.append({"name": cand[0], "strategy": cand[1], "per_device_gb": round(est["per_device_gb"], 2),
                          "host_gb_per_node": round(est["host_gb"] / nodes, 1), "fits": ok})
            ranked.append((est, cand))
            if ok and not fits:
                chosen, fits, best = cand, True, est
        if not fits:  # the closest: the first that fits the device but not the RAM, else the least device memory
            on_device = [(est, c) for est, c in ranked if est["per_device_gb"] <= budget]
            best, chosen = on_device[0] if on_device else min(ranked, key=lambda pair: pair[0]["per_device_gb"])
            options = fit_options(machine, model, finetune, precision, seq_len, batch_size, budget, lora_r, world)
        memory = {"per_device_gb": round(best["per_device_gb"], 2), "budget_gb": round(budget, 2),
                  "reserved_gb": RESERVED_GB if acc == "cuda" else 0.0,
                  "breakdown": {k: round(v, 3) for k, v in best["breakdown"].items()}, "peak_at": best["peak_at"],
                  "trainable_params": int(best["trainable_params"])}
        if best["host_gb"]:
            memory["host_gb_per_node"] = round(best["host_gb"] / nodes, 1)
        run = f"{finetune_label(finetune, lora_r)} at sequence {seq_len}, micro-batch {batch_size}"
        if fits:
            reasons.append(f"strategy {chosen[1]}: the cheapest set-up in which the {run} fits:"
                           f" {memory['per_device_gb']:.1f} of {budget:.1f} GB per device")
        else:
            closest, device = f"the closest set-up ({chosen[0]})", f"{best['per_device_gb']:.1f} of {budget:.1f} GB"
            if best["per_device_gb"] <= budget:
                closest += (f" fits the device ({device}) but needs {best['host_gb'] / nodes:.0f} GB of RAM per node,"
                            f" this machine has {machine['ram_gb']:.0f} GB")
            else:
                closest += f" needs {device} per device"
            reasons.append(f"strategy {chosen[1]}: no set-up fits the {run}; {closest}; see the options")
            warnings.append(no_fit_summary(model, finetune, precision, closest, options, machine, lora_r, world,
                                           budget))
        info = {"name": model["name"], "source": model["source"], "model_type": model["model_type"],
                "params": n_params, "params_from": "--params" if model["estimated"] else "shape",
                "trainable_params": int(best["trainable_params"]), **{k: model[k] for k in SHAPE_KEYS[1:]}}
    else:
        reasons.append(f"strategy {chosen[1]}: " + ("one device" if world == 1 else
                       f"{world} devices: DDP replicates the model; pass --model or --params to check that it fits"))
    if world > 1 and chosen[1] == "ddp":
        reasons.append("effective batch size = per-device batch x devices x num_nodes")

    capability = min(g["capability"] for g in machine["gpus"]) if acc == "cuda" else [0, 0]
    matmul, compile_ok = ("high" if capability >= [8, 0] else "highest"), capability >= [7, 0]
    reasons.append(f"torch.set_float32_matmul_precision('{matmul}'): " + (
        "TF32 tensor cores for the float32 matmuls left outside autocast" if matmul == "high"
        else "no TF32 tensor cores here; keep full float32 matmuls"))
    reasons.append("torch.compile: " + (
        "yes, Triton kernels need compute capability 7.0+; compile a submodule in configure_model" if compile_ok
        else "no, compile time rarely pays off off CUDA; enable it and measure"))
    workers = min(8, max(1, machine["cpu_count"] // max(1, devices)) - 1)
    reasons.append(f"num_workers {workers}: {machine['cpu_count']} CPUs shared by {devices} device process(es),"
                   " one CPU left for the training loop; 0 for data already in memory")
    checkpointing = bool(chosen[3])
    if checkpointing and fits:
        reasons.append("activation checkpointing: needed to fit activations; costs about one extra forward pass")
    if machine["launcher"]:
        reasons.append(f"num_nodes {nodes}: from the {machine['launcher']} launcher; devices must equal the processes"
                       " it starts per node")
    elif nodes > 1:
        warnings.append(f"{nodes} nodes but no launcher detected: start one process per device on every node"
                        " (SLURM srun or torchrun)")
    trainer = {"accelerator": accelerator, "devices": devices, "num_nodes": nodes, "strategy": chosen[1],
               "precision": precision}
    return {"trainer": trainer, "matmul_precision": matmul, "compile": compile_ok,
            "activation_checkpointing": checkpointing, "num_workers": workers, "fits": fits, "memory": memory,
            "model": info, "finetune": finetune, "seq_len": seq_len, "batch_size": batch_size, "lora_r": lora_r,
            "candidates": table, "options": options, "machine": machine, "reasons": reasons, "warnings": warnings}


# --- When nothing fits: the options that do ---
def _divisors(n: int) -> list:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _flags(machine, model, precision, config, finetune, lora_r, micro, accumulate, ckpt, extra=()) -> str:
    parts = ["python causal_lm.py fit"]
    if config:
        parts.append(f"--config {config}")
    parts += list(extra)
    if model["name"]:
        parts.append(f"--model.name_or_path {model['name']}")
    if machine["accelerator"] == "cuda" and precision != "bf16-mixed":
        parts.append(f"--trainer.precision {precision}")
    if finetune != "full":
        parts.append(f"--model.finetune {finetune} --model.lora_r {lora_r}")
    parts.append(f"--data.batch_size {micro} --trainer.accumulate_grad_batches {accumulate}")
    if ckpt:
        parts.append("--model.activation_checkpointing true")
    return " ".join(parts)


def _sharding(machine: dict, finetune: str, world: int) -> str:
    """The memory-model strategy that splits the states furthest on this machine's GPUs."""
    return "fsdp" if world > 1 and finetune != "qlora" and machine["accelerator"] == "cuda" else "single"


def fit_options(machine, model, finetune, precision, seq_len, batch_size, budget, lora_r, world=1) -> list:
    """Options for a run that fits no set-up of this machine; each entry says whether it fits and with what."""
    acc, ram = machine["accelerator"], machine["ram_gb"]
    config = {"cuda": "configs/gpu.yaml", "cpu": "configs/cpu.yaml"}.get(acc)
    out = []

    def estimate(kind, micro, strategy, n, ckpt):
        return memory_gb(model, kind, precision, seq_len, micro, strategy, n, ckpt, lora_r)

    def first_fit(kind, strategy, n, micro_batches=(1,), accumulate=None):
        for ckpt in (False, True):
            for micro in micro_batches:
                est = estimate(kind, micro, strategy, n, ckpt)
                if est["per_device_gb"] <= budget:
                    return micro, accumulate or max(1, batch_size // micro), ckpt, est  # same global batch
        return None

    def schedule(found, unit="device", note=""):
        micro, accumulate, ckpt, est = found
        return (f"micro-batch {micro} x {accumulate} accumulation{note}"
                + (" with activation checkpointing" if ckpt else "") + f": {est['per_device_gb']:.1f} GB per {unit}")

    def add(option, text, found, config, kind=finetune, flags=(), **extra):
        micro, accumulate, ckpt, est = found
        out.append({"option": option, "fits": True, "per_device_gb": round(est["per_device_gb"], 2),
                    "micro_batch": micro, "accumulate_grad_batches": accumulate, "activation_checkpointing": ckpt,
                    "trainable_params": int(est["trainable_params"]), "text": text, **extra,
                    "command": _flags(machine, model, precision, config, kind, lora_r, micro, accumulate, ckpt, flags)})

    sharding = _sharding(machine, finetune, world)
    smaller = _divisors(batch_size)[1:]
    # a smaller micro-batch helps only if the states fit
    if estimate(finetune, 1, sharding, world, True)["states_gb"] <= budget and batch_size > 1:
        found = first_fit(finetune, sharding, world, smaller)
        if found:
            larger = next((m for m in smaller if m > found[0]
                           and estimate(finetune, m, sharding, world, True)["per_device_gb"] <= budget), 0)
            text = schedule(found, note=" (the same global batch)") + (
                f" (with activation checkpointing, micro-batch {larger} x {batch_size // larger})" if larger else "")
            add("micro_batch", text, found, "configs/fsdp.yaml" if sharding == "fsdp" else config)
    adapters = [("lora", "LoRA")] if finetune == "full" else []
    if acc == "cuda" and finetune != "qlora":
        adapters.append(("qlora", "QLoRA (4-bit NF4 base, bitsandbytes)"))
    replica, replica_config = ("ddp", "configs/ddp.yaml") if world > 1 and acc == "cuda" else ("single", config)
    for kind, label in adapters:  # a replica of the adapted model on each device of this machine
        found = first_fit(kind, replica, world)
        if found:
            ckpt, est = found[2:]
            largest = next((m for m in _divisors(batch_size)
                            if estimate(kind, m, replica, world, ckpt)["per_device_gb"] <= budget), 1)
            text = (f"{label}, r={lora_r} ({_size(est['trainable_params'])} trainable parameters), {schedule(found)}"
                    + (f" (micro-batch up to {largest} fits)" if largest > 1 else ""))
            add(kind, text, found, replica_config, kind, max_micro_batch=largest)
    if acc != "cuda":
        return out
    if finetune != "qlora":
        node_size = max(8, len(machine["gpus"]))
        for n in [2, 4, 8] + list(range(16, 1025, 8)):
            if n <= len(machine["gpus"]) * machine["num_nodes"]:
                continue
            found = first_fit(finetune, "fsdp", n, accumulate=max(1, batch_size // n))
            if found:
                devices, nodes = (n, 1) if n <= node_size else (node_size, -(-n // node_size))
                where = f"{n} GPUs like these" + (f" ({nodes} nodes of {devices})" if nodes > 1 else "")
                flags = [f"--trainer.devices {devices}"] + ([f"--trainer.num_nodes {nodes}"] if nodes > 1 else [])
                add("fsdp", f"FSDP on {where}, {schedule(found, 'GPU')} (global batch {n * found[1]})", found,
                    "configs/fsdp.yaml", flags=flags, devices=n)
                break
        strategy, memory_strategy = offload_kind(machine)
        zero3 = memory_strategy == "zero3_offload"  # DeepSpeed is installed
        found = first_fit(finetune, memory_strategy, 1)
        if found:
            accumulate, ckpt, est = found[1:]
            need, zero3_host = est["host_gb"], estimate(finetune, 1, "zero3_offload", 1, ckpt)["host_gb"]
            ok = need <= ram * CPU_RAM_SHARE
            text = (f"CPU offload ({'DeepSpeed ZeRO-3 offload' if zero3 else 'FSDP CPU offload'}),"
                    f" {schedule(found, 'GPU')}, and it needs {need:.0f} GB RAM, this machine has {ram:.0f} GB: "
                    f"{'fits' if ok else 'does not fit'} (at most {CPU_RAM_SHARE:.0%} of RAM is planned for it; runs"
                    " several times slower than on the GPU)")
            if not zero3:
                text += f"; DeepSpeed ZeRO-3 offload (pip install deepspeed) needs {zero3_host:.0f} GB"
            add("cpu_offload", text, found, "configs/deepspeed.yaml" if zero3 else "configs/fsdp.yaml",
                flags=[f"--trainer.strategy {strategy}"], strategy=strategy, host_ram_needed_gb=round(need, 1),
                ram_gb=ram, fits=ok)
            if zero3:
                text = (f"NVMe offload (DeepSpeed ZeRO-Infinity), micro-batch 1 x {accumulate} accumulation: about"
                        f" {est['per_device_gb']:.1f} GB per GPU and {zero3_host:.0f} GB on a fast local NVMe disk,"
                        " a few GB of RAM for its buffers; slower still than CPU offload")
                flags = ["--trainer.strategy lightning.pytorch.strategies.DeepSpeedStrategy",
                         "--trainer.strategy.stage 3 --trainer.strategy.offload_optimizer true",
                         "--trainer.strategy.offload_parameters true --trainer.strategy.offload_params_device nvme",
                         "--trainer.strategy.offload_optimizer_device nvme --trainer.strategy.nvme_path /local_nvme"]
                add("nvme_offload", text, found, "configs/deepspeed.yaml", flags=flags, nvme_gb=round(zero3_host, 1))
    need = estimate(finetune, 1, "single", 1, True)["per_device_gb"]
    if need <= budget:  # this card is large enough at micro-batch 1: the options above say how
        return out
    card = (need + RESERVED_GB) / HEADROOM
    out.append({"option": "larger_gpu", "fits": True, "memory_gb": round(card, 1), "micro_batch": 1,
                "accumulate_grad_batches": batch_size, "activation_checkpointing": True,
                "text": f"one GPU with at least {card:.0f} GB (memory_gb as torch reports it) runs this"
                        f" {finetune_label(finetune, lora_r)} at micro-batch 1 x {batch_size} accumulation with"
                        " activation checkpointing",
                "command": _flags(machine, model, precision, config, finetune, lora_r, 1, batch_size, True)})
    return out


def no_fit_summary(model, finetune, precision, closest, options, machine, lora_r, world, budget) -> str:
    """One line: why nothing fits, which levers cannot help, and the options that fit."""
    parts = [f"no set-up fits: {closest}"]
    states = memory_gb(model, finetune, precision, 1, 1, _sharding(machine, finetune, world), world, True, lora_r)
    if states["states_gb"] > budget:
        parts.append(f"weights, gradients and optimizer state alone take {states['states_gb']:.1f} GB per device, so a"
                     " smaller micro-batch or activation checkpointing cannot help")
    fitting = [o["text"] for o in options if o["fits"]]
    if fitting:
        parts.append("options that fit: " + "; ".join(f"({i}) {t}" for i, t in enumerate(fitting, 1)))
    else:
        parts.append("no option fits this machine: use a machine with more memory")
    parts += [o["text"] for o in options if not o["fits"]]
    return ". ".join(parts)


# --- Output ---
def describe(machine: dict) -> str:
    dev = "no accelerator"
    if machine["gpus"] and machine["accelerator"] != "cpu":
        g = machine["gpus"][0]
        sm = f", sm {g['capability'][0]}.{g['capability'][1]}" if machine["accelerator"] == "cuda" else ""
        dev = f"{len(machine['gpus'])} x {g['name']} ({g['memory_gb']:.1f} GB{sm})"
    return (f"{dev}, {machine['num_nodes']} node(s), {machine['cpu_count']} CPUs, {machine['ram_gb']:.0f} GB RAM,"
            f" launcher: {machine['launcher'] or 'none'}, packages: {', '.join(machine['packages']) or 'none'}")


def as_text(result: dict) -> str:
    lines = [f"machine: {describe(result['machine'])} (GB = 1e9 bytes, as torch reports total_memory)"]
    if result["candidates"]:
        lines.append(f"{'candidate':<32} {'GB/device':>10} {'host GB/node':>13}  fits")
        lines += [f"{c['name']:<32} {c['per_device_gb']:>10.1f} {c['host_gb_per_node']:>13.1f}  "
                  f"{'yes' if c['fits'] else 'no'}" for c in result["candidates"]]
        memory = result["memory"]
        lines.append(f"budget per device: {memory['budget_gb']:.1f} GB; plan fits: {'yes' if result['fits'] else 'NO'}")
        lines.append("per device (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in memory["breakdown"].items() if v))
    lines += ["settings:"] + [f"  trainer.{key:<12} {value}" for key, value in result["trainer"].items()]
    for key in ("matmul_precision", "compile", "activation_checkpointing", "num_workers"):
        lines.append(f"  {key:<20} {result[key]}")
    lines += ["reasons:"] + [f"  - {r}" for r in result["reasons"]]
    lines += [f"WARNING: {w}" for w in result["warnings"]]
    if result["options"]:
        lines.append("options (causal_lm.py flags):")
        for o in result["options"]:
            lines += [f"  - {o['text']}" + ("" if o["fits"] else " [does not fit]"), f"      {o['command']}"]
    return "\n".join(lines)


def as_yaml(result: dict) -> str:
    lines = [f"# detect_hardware.py: {describe(result['machine'])}",
             f"# also: compile: {str(result['compile']).lower()}, activation checkpointing:"
             f" {str(result['activation_checkpointing']).lower()}, DataLoader num_workers: {result['num_workers']}",
             f"matmul_precision: {result['matmul_precision']}  # torch.set_float32_matmul_precision",
             "trainer:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in result["trainer"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = parser.add_argument
    arg("--model", help="a model folder or config.json, or a name (built-in table, local Hugging Face cache): its"
                        " shape gives the parameter count and the memory plan")
    arg("--params", help="model size without --model: 7e9, 7B, 350M (a typical shape is assumed)")
    arg("--finetune", choices=["full", "lora", "qlora"], default="full",
        help="full: train every parameter (default); lora: frozen 16-bit base + adapters; qlora: the base in 4-bit"
             " NF4 (CUDA)")
    arg("--lora-r", type=int, default=DEFAULT_LORA_R, help="LoRA rank (default 16)")
    arg("--precision", choices=PRECISIONS, help="plan for this precision (default: the one the script picks for the"
                                                " machine)")
    arg("--seq-len", type=int, default=2048, help="tokens per sample (default 2048)")
    arg("--batch-size", type=int, default=1, help="micro-batch per device (default 1)")
    arg("--profile", help="JSON file describing a machine, instead of detecting this one; memory_gb = torch"
                          " total_memory / 1e9")
    arg("--format", choices=["text", "json", "yaml"], default="text")
    args = parser.parse_args(argv)
    try:
        if args.seq_len < 1 or args.batch_size < 1 or args.lora_r < 1:
            raise UsageError("--seq-len, --batch-size and --lora-r must be positive integers")
        params = parse_size(args.params) if args.params is not None else None
        if args.model is not None:
            params = load_model(args.model)  # the shape's count replaces --params
        machine = load_profile(args.profile) if args.profile else detect_machine()
    except UsageError as err:
        print(f"detect_hardware.py: error: {err}", file=sys.stderr)
        return 2
    result = plan(machine, params, args.finetune, args.seq_len, args.batch_size, args.precision, args.lora_r)
    if args.model is not None and args.params is not None:
        result["warnings"].insert(0, f"--params {args.params} ignored: --model's shape gives"
                                     f" {_size(result['model']['params'])} parameters")
    if args.format == "json":
        print(json.dumps(result, indent=2))
    elif args.format == "yaml":
        if not result["fits"]:
            print(f"detect_hardware.py: {next(w for w in result['warnings'] if w.startswith('no set-up fits'))}",
                  file=sys.stderr)
            return 1
        print(as_yaml(result), end="")
    else:
        print(as_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
