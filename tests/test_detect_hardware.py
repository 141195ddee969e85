"""scripts/detect_hardware.py (decisions for described machines, the memory model against measurement and
transformers' models, the CLI) and scripts/check_env.py."""

import json
import os
import sys
import time

import pytest

from conftest import (QUIET, REPO, SCRIPTS, assert_bad_input_changes_nothing, assert_ok, load_module, run, run_script,
                      run_template)

SCRIPT = SCRIPTS / "detect_hardware.py"
dh = load_module(SCRIPT, "detect_hardware")


def gpus(n, name, memory_gb, capability):
    return [{"name": name, "memory_gb": memory_gb, "capability": list(capability)} for _ in range(n)]


def node(accelerator="cuda", devices=(), cpu_count=32, ram_gb=256, num_nodes=1, launcher=None, packages=(),
         **extra):
    return {"cpu_count": cpu_count, "ram_gb": ram_gb, "accelerator": accelerator, "gpus": list(devices),
            "num_nodes": num_nodes, "launcher": launcher, "packages": list(packages), **extra}


H100X8 = {"devices": gpus(8, "NVIDIA H100 80GB HBM3", 85.0, (9, 0)), "cpu_count": 192, "ram_gb": 2000}
PROFILES = {
    "cpu_laptop": node("cpu", cpu_count=8, ram_gb=16),
    "cpu_server": node("cpu", cpu_count=64, ram_gb=512),
    "apple_m2": node("mps", gpus(1, "Apple M2 Pro", 32, (0, 0)), cpu_count=10, ram_gb=32),
    "t4": node(devices=gpus(1, "Tesla T4", 15.8, (7, 5)), cpu_count=8, ram_gb=32),
    "v100": node(devices=gpus(1, "Tesla V100-SXM2-32GB", 34.1, (7, 0)), cpu_count=8, ram_gb=64),
    "rtx4090": node(devices=gpus(1, "NVIDIA GeForce RTX 4090", 25.4, (8, 9)), cpu_count=16, ram_gb=64),
    "2x3090": node(devices=gpus(2, "NVIDIA GeForce RTX 3090", 25.4, (8, 6)), cpu_count=16, ram_gb=64),
    "a100_40": node(devices=gpus(1, "NVIDIA A100-SXM4-40GB", 42.5, (8, 0)), cpu_count=16, ram_gb=256),
    "8xa100_80": node(devices=gpus(8, "NVIDIA A100-SXM4-80GB", 85.1, (8, 0)), cpu_count=128, ram_gb=1024),
    "4xa10g_deepspeed": node(devices=gpus(4, "NVIDIA A10G", 23.8, (8, 6)), cpu_count=48, ram_gb=192,
                             packages=["deepspeed"]),
    "8xh100": node(**H100X8),
    "8xh100_te": node(**H100X8, packages=["transformer_engine"]),
    "slurm_2x8xh100": node(**H100X8, num_nodes=2, launcher="slurm", tasks_per_node=8),
    "slurm_wrong_tasks": node(**H100X8, num_nodes=2, launcher="slurm", tasks_per_node=1),
    "torchrun_2x4xa100_40": node(devices=gpus(4, "NVIDIA A100-SXM4-40GB", 42.5, (8, 0)), cpu_count=64, ram_gb=512,
                                 num_nodes=2, launcher="torchrun", tasks_per_node=4),
    "tpu_v4_8": node("tpu", gpus(8, "TPU v4", 32, (0, 0)), cpu_count=96, ram_gb=400),
}

# (profile, params, finetune) -> (strategy, precision, fits, activation checkpointing)
CASES = [
    ("cpu_laptop", "10M", "full", "auto", "32-true", True, False),
    ("cpu_laptop", "7B", "full", "auto", "32-true", False, False),
    ("cpu_server", "7B", "full", "auto", "32-true", True, False),
    ("apple_m2", "124M", "full", "auto", "32-true", True, False),
    ("apple_m2", "7B", "full", "auto", "32-true", False, False),
    ("t4", "124M", "full", "auto", "16-mixed", True, False),
    ("t4", "1.3B", "full", "fsdp_cpu_offload", "16-mixed", True, False),
    ("t4", "7B", "lora", "fsdp_cpu_offload", "16-mixed", True, True),  # frozen base offloaded to CPU
    ("rtx4090", "70B", "lora", "fsdp_cpu_offload", "bf16-mixed", False, True),
    ("v100", "350M", "full", "auto", "16-mixed", True, False),
    ("rtx4090", "7B", "full", "fsdp_cpu_offload", "bf16-mixed", False, False),  # fits the GPU, not RAM
    ("rtx4090", "7B", "lora", "auto", "bf16-mixed", True, True),
    ("2x3090", "1.3B", "full", "fsdp", "bf16-mixed", True, False),
    ("a100_40", "1.3B", "full", "auto", "bf16-mixed", True, False),
    ("a100_40", "7B", "full", "fsdp_cpu_offload", "bf16-mixed", True, False),
    ("8xa100_80", "7B", "full", "fsdp", "bf16-mixed", True, False),
    ("8xa100_80", "70B", "lora", "fsdp", "bf16-mixed", True, True),
    ("4xa10g_deepspeed", "7B", "full", "deepspeed_stage_3_offload", "bf16-mixed", True, False),
    ("8xh100", "124M", "full", "ddp", "bf16-mixed", True, False),
    ("8xh100", "13B", "full", "fsdp", "bf16-mixed", True, False),
    ("8xh100_te", "13B", "full", "fsdp", "transformer-engine", True, False),
    ("8xh100_te", "124M", "full", "ddp", "bf16-mixed", True, False),
    ("slurm_2x8xh100", "7B", "full", "fsdp", "bf16-mixed", True, False),
    ("slurm_2x8xh100", "70B", "full", "fsdp", "bf16-mixed", True, True),
    ("torchrun_2x4xa100_40", "1.3B", "full", "ddp", "bf16-mixed", True, False),
    ("tpu_v4_8", "350M", "full", "auto", "32-true", True, False),
]


def plan_for(profile, params=None, finetune="full", **kwargs):
    machine = dh.validate_machine(PROFILES[profile], source=profile)
    return dh.plan(machine, dh.parse_size(params) if params else None, finetune, **kwargs)


def test_profile_table_is_large_enough():
    assert len(PROFILES) >= 15 and len(CASES) >= 20


@pytest.mark.parametrize("profile, params, finetune, strategy, precision, fits, checkpointing", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_decision_table(profile, params, finetune, strategy, precision, fits, checkpointing):
    result = plan_for(profile, params, finetune)
    got = (result["trainer"]["strategy"], result["trainer"]["precision"], result["fits"],
           result["activation_checkpointing"])
    assert got == (strategy, precision, fits, checkpointing), json.dumps(result["candidates"], indent=1)
    memory = result["memory"]
    if fits:  # never recommend a set-up over the budget
        assert memory["per_device_gb"] <= memory["budget_gb"]
        assert not [w for w in result["warnings"] if w.startswith("no set-up fits")]
    else:
        assert any(w.startswith("no set-up fits") for w in result["warnings"]), result["warnings"]
    text = " ".join(result["reasons"])  # the reasons do not contradict the verdict
    assert ("no set-up fits" in text) == (not fits)
    assert ("needed to fit activations" in text) == (fits and checkpointing)
    no_fit = [w for w in result["warnings"] if w.startswith("no set-up fits")]
    if no_fit and "cannot help" in no_fit[0]:  # a lever that cannot help is never offered
        assert not any(o["option"] == "micro_batch" for o in result["options"])
    for option in result["options"]:  # an option said to fit is within the budget
        assert not option["fits"] or option.get("per_device_gb", 0) <= memory["budget_gb"], option


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_devices_and_nodes_follow_the_machine(profile):
    result = plan_for(profile)
    machine = PROFILES[profile]
    trainer = result["trainer"]
    expected_devices = len(machine["gpus"]) if machine["accelerator"] in ("cuda", "tpu") else 1
    assert trainer["devices"] == expected_devices and trainer["num_nodes"] == machine["num_nodes"]
    assert trainer["accelerator"] == {"cuda": "gpu"}.get(machine["accelerator"], machine["accelerator"])
    assert result["num_workers"] <= max(0, machine["cpu_count"] // expected_devices - 1)
    assert result["compile"] == (machine["accelerator"] == "cuda" and min(g["capability"] for g in machine["gpus"])
                                 >= [7, 0])
    assert result["matmul_precision"] in ("high", "highest") and result["reasons"]


def test_launcher_mismatch_is_a_warning_that_names_the_fix():
    warnings = plan_for("slurm_wrong_tasks")["warnings"]
    assert any("--ntasks-per-node" in w and "8" in w and "hangs" in w for w in warnings), warnings
    assert not plan_for("slurm_2x8xh100")["warnings"]


def test_no_fit_advice_offers_only_what_helps():  # 7B full on this card: test_llama2_7b_full_on_one_4090...
    # 70B LoRA on one 24 GB card: QLoRA's 4-bit base (about 37 GB) does not fit either, so it is not offered
    result = plan_for("rtx4090", "70B", "lora")
    advice = next(w for w in result["warnings"] if w.startswith("no set-up fits"))
    assert "QLoRA" not in advice and "qlora" not in {o["option"] for o in result["options"]}
    assert "FSDP on" in advice and "cannot help" in advice


@pytest.mark.parametrize("text, expected", [("7e9", 7_000_000_000), ("7B", 7_000_000_000), ("350M", 350_000_000),
                                            ("1.5b", 1_500_000_000), ("124000000", 124_000_000)])
def test_parse_size(text, expected):
    assert dh.parse_size(text) == expected


def test_memory_model_matches_measured_allocation(tmp_path):
    """Parameters + gradients + AdamW state of a ~34M-parameter model: estimate vs growth of peak resident memory."""
    code = f"""
import gc, json, resource, sys, torch
sys.path.insert(0, {str(SCRIPT.parent)!r})
import detect_hardware as dh

def peak():  # ru_maxrss is in KB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

x = torch.randn(8, 1024)
warm = torch.nn.Linear(1024, 1024)  # first step initializes thread pools and kernels: keep that out of the delta
warm_opt = torch.optim.AdamW(warm.parameters(), foreach=False)
warm(x).square().mean().backward(); warm_opt.step(); del warm, warm_opt; gc.collect()
before = peak()
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(32)])
optimizer = torch.optim.AdamW(model.parameters(), foreach=False)  # foreach adds transient full-size temporaries
for _ in range(2):
    model(x).square().mean().backward()
    optimizer.step()
params = sum(p.numel() for p in model.parameters())
parts = dh.memory_gb(params, "full", "32-true", 1, 1, "single", 1, False)["breakdown"]
print(json.dumps({{"measured": peak() - before, "estimated": (parts["weights"] + parts["gradients"]
                  + parts["optimizer"]) * 1e9, "params": params}}))
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("ru_maxrss units differ off Linux")
    (tmp_path / "measure.py").write_text(code)
    # Started by a small interpreter: Linux keeps ru_maxrss across exec, so a direct child of the pytest process
    # (large after in-process fits) would start from pytest's peak and understate the growth.
    hop = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, sys.argv[1]]).returncode)"
    result = run([sys.executable, "-c", hop, tmp_path / "measure.py"], cwd=tmp_path)
    assert_ok(result)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = data["estimated"] / data["measured"]
    print(f"{data['params'] / 1e6:.1f}M params: estimated {data['estimated'] / 1e6:.0f} MB, "
          f"measured {data['measured'] / 1e6:.0f} MB (ratio {ratio:.2f})")
    assert 0.75 <= ratio <= 1.25


# ---- the memory model against real layers and models ---------------------------------------------------------------
def saved_for_backward(layer, run) -> tuple:
    """Bytes autograd saves while run() runs, each storage once, parameters left out: (activations, 16-bit copies of
    the Linear weights that autocast made)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    shapes = {tuple(p.shape) for p in layer.parameters() if p.dim() == 2 and p.dtype == torch.float32}
    seen, totals = set(), {"activations": 0, "copies": 0}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen | params:
            seen.add(storage.data_ptr())
            copy = t.dtype == torch.bfloat16 and t.dim() == 2 and {tuple(t.shape), tuple(t.shape[::-1])} & shapes
            totals["copies" if copy else "activations"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return totals["activations"], totals["copies"]


# name: (hidden, intermediate, heads, key-value heads) of real models
LAYER_SHAPES = {"Llama-2-7B": (4096, 11008, 32, 32), "TinyLlama-1.1B": (2048, 5632, 32, 4)}


@pytest.mark.parametrize("name", sorted(LAYER_SHAPES))
def test_activations_match_the_tensors_saved_for_backward(name):
    """One real transformers LlamaDecoderLayer of each shape under CPU bf16 autocast, sdpa attention: the bytes it
    saves for backward against the planner's figure for that layer (plain, with activation checkpointing, LoRA)."""
    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    hidden, inter, heads, kv = LAYER_SHAPES[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=1, vocab_size=32000, attn_implementation="sdpa")
    model = dh.model_from_config({"model_type": "llama", **config.to_dict()}, name, "test")
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, 0)
    layer.to_empty(device="cpu")  # values do not change what is saved; skipping the initialization saves seconds
    batch, seq = 1, 96  # 96 tokens: no activation has a weight's shape
    x = torch.randn(batch, seq, hidden, requires_grad=True)
    cos_sin = LlamaRotaryEmbedding(config)(x, torch.arange(seq)[None])
    tokens = batch * seq

    def forward(checkpointing=False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if checkpointing:
                checkpoint(layer, x, position_embeddings=cos_sin, use_reentrant=False)
            else:
                layer(x, position_embeddings=cos_sin)

    activations, copies = saved_for_backward(layer, forward)
    planned = dh.layer_activation_bytes(model, "bf16-mixed", "full") * tokens
    print(f"{name}: saved {activations / tokens / hidden:.2f} bytes per token per hidden unit, planned"
          f" {planned / tokens / hidden:.2f}; bf16 weight copies {copies / 1e6:.1f} MB")
    assert abs(planned / activations - 1) <= 0.15
    linear = dh.param_counts(model)["linear"] / model["num_hidden_layers"]
    assert copies == 2 * linear  # autocast keeps a bf16 copy of every Linear weight the forward used
    activations, _ = saved_for_backward(layer, lambda: forward(checkpointing=True))
    assert abs(dh.layer_activation_bytes(model, "bf16-mixed", "full", True) * tokens / activations - 1) <= 0.15

    peft = pytest.importorskip("peft")
    layer.requires_grad_(False).to(torch.bfloat16)  # LoRA: the frozen layer in bf16, adapters in float32
    holder = torch.nn.ModuleDict({"layer": layer})
    peft.inject_adapter_in_model(peft.LoraConfig(r=16, target_modules=dh.LORA_TARGETS["llama"], lora_dropout=0.0),
                                 holder)
    for p in layer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    x = x.detach().bfloat16().requires_grad_()
    activations, _ = saved_for_backward(layer, forward)
    assert abs(dh.layer_activation_bytes(model, "bf16-mixed", "lora") * tokens / activations - 1) <= 0.15


SMALL = {"vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 2, "intermediate_size": 688}
CONFIGS = {  # config.json contents: GQA, biases, tied embeddings, fused projections, learned positions
    "llama": {"model_type": "llama", **SMALL},
    "qwen2": {"model_type": "qwen2", **SMALL, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", **SMALL},
    "gemma2": {"model_type": "gemma2", **SMALL},
    "phi3": {"model_type": "phi3", **SMALL, "pad_token_id": 0},
    "mixtral": {"model_type": "mixtral", **SMALL, "num_local_experts": 4},
    "gpt2": {"model_type": "gpt2", "vocab_size": 1000, "n_embd": 256, "n_layer": 2, "n_head": 8},
    "gpt_neox": {"model_type": "gpt_neox", **SMALL, "intermediate_size": 1024},
}


def meta_param_count(config: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return sum(p.numel() for p in model.parameters())  # tied weights once


def test_model_folder_gives_transformers_parameter_count(tmp_path):
    config = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 2,
              "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632}
    (tmp_path / "my_model").mkdir()
    (tmp_path / "my_model" / "config.json").write_text(json.dumps(config))
    data = cli_json(tmp_path, "--profile", write_profile(tmp_path, "rtx4090"), "--model", "my_model", "--params", "7B")
    assert data["model"]["params"] == meta_param_count(config) and data["model"]["params_from"] == "shape"
    assert any("--params 7B ignored" in w for w in data["warnings"])
    assert set(data["memory"]) >= {"per_device_gb", "budget_gb", "breakdown"}
    assert set(data["memory"]["breakdown"]) >= {"weights", "gradients", "optimizer", "autocast_copies", "activations",
                                                "logits"}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_config_json_parameter_count(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[model_type]))
    counted = dh.param_counts(dh.load_model(str(tmp_path / "config.json")))["total"]
    assert abs(counted / meta_param_count(CONFIGS[model_type]) - 1) <= 0.005


def test_built_in_table_matches_transformers():
    """Each built-in shape, built by transformers on the meta device, has the parameter count the script computes
    (and the published one for the 7B models)."""
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "tie_word_embeddings")
    for name, (shape, aliases) in dh.KNOWN_MODELS.items():
        config = dict(zip(keys, shape))
        if config["model_type"] == "gpt2":
            config = {"model_type": "gpt2", "vocab_size": shape[1], "n_embd": shape[2], "n_layer": shape[3],
                      "n_head": shape[4]}
        model = dh.load_model(aliases[0] if aliases else name)
        assert dh.param_counts(model)["total"] == meta_param_count(config), name
    assert dh.param_counts(dh.load_model("meta-llama/Llama-2-7b-hf"))["total"] == 6_738_415_616
    assert dh.param_counts(dh.load_model("mistralai/Mistral-7B-v0.1"))["total"] == 7_241_732_096


def test_lora_targets_match_the_template():
    support = load_module(REPO / "templates" / "lightning_support.py", "lightning_support_for_lora_table")
    assert dh.LORA_TARGETS == support.LORA_TARGETS
    llama = dh.load_model("meta-llama/Llama-2-7b-hf")  # r x (in + out) over q, k, v, o, gate, up, down
    assert dh.lora_params(llama, 16) == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))


def test_qlora_and_lora_weights():
    llama = dh.load_model("meta-llama/Llama-2-7b-hf")
    counts = dh.param_counts(llama)
    lora = dh.memory_gb(llama, "lora", "bf16-mixed", 2048, 1, "single", 1, False)["breakdown"]
    qlora = dh.memory_gb(llama, "qlora", "bf16-mixed", 2048, 1, "single", 1, False)["breakdown"]
    adapters = dh.lora_params(llama, 16) * 4 / 1e9
    assert lora["weights"] == pytest.approx(counts["total"] * 2 / 1e9 + adapters)
    nf4 = counts["linear"] * 4.127 / 8 + (counts["total"] - counts["linear"]) * 2
    assert qlora["weights"] == pytest.approx(nf4 / 1e9 + adapters, rel=1e-3)
    assert lora["optimizer"] == pytest.approx(2 * adapters)


# ---- the command line --------------------------------------------------------------------------------------------
def write_profile(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(PROFILES[name]))
    return path


def cli(tmp_path, *args, ok=True, **kwargs):
    result = run([sys.executable, SCRIPT, *args], cwd=tmp_path, **kwargs)
    if ok:
        assert_ok(result)
    return result


def cli_json(tmp_path, *args, **kwargs) -> dict:
    return json.loads(cli(tmp_path, *args, "--format", "json", **kwargs).stdout)


def test_live_detection_is_fast_and_complete(tmp_path):
    start = time.perf_counter()
    data = cli_json(tmp_path)
    elapsed = time.perf_counter() - start
    assert set(data) >= {"trainer", "matmul_precision", "compile", "activation_checkpointing", "num_workers", "fits",
                         "memory", "reasons", "warnings"}
    assert set(data["trainer"]) == {"accelerator", "devices", "num_nodes", "strategy", "precision"}
    print(f"live detection: {elapsed:.2f} s")
    import torch

    if not torch.cuda.is_available():
        assert data["trainer"]["accelerator"] in ("cpu", "mps") and elapsed < 10  # goal < 3 s; slack for busy CI


def test_text_output_has_one_reason_per_choice(tmp_path):
    result = cli(tmp_path, "--profile", write_profile(tmp_path, "t4"), "--params", "350M")
    for word in ("accelerator gpu", "precision 16-mixed", "strategy auto", "set_float32_matmul_precision",
                 "torch.compile", "num_workers"):
        assert word in result.stdout, word


def test_yaml_output_trains_the_tabular_template(tmp_path):
    (tmp_path / "hardware.yaml").write_text(cli(tmp_path, "--format", "yaml").stdout)
    result = run_template("tabular.py", "fit", "--config", "hardware.yaml", "--trainer.max_epochs", "1", *QUIET,
                          cwd=tmp_path)
    assert_ok(result)
    assert "best val_loss=" in result.stdout


def test_yaml_output_for_a_gpu_profile_parses_in_the_template(tmp_path):
    hardware = cli(tmp_path, "--profile", write_profile(tmp_path, "slurm_2x8xh100"), "--params", "7B", "--format",
                   "yaml")
    (tmp_path / "hardware.yaml").write_text(hardware.stdout)
    printed = run_template("tabular.py", "fit", "--config", "hardware.yaml", "--print_config", cwd=tmp_path)
    assert_ok(printed)
    assert "strategy: fsdp" in printed.stdout and "num_nodes: 2" in printed.stdout


def test_yaml_output_refuses_a_plan_that_does_not_fit(tmp_path):
    result = cli(tmp_path, "--profile", write_profile(tmp_path, "cpu_laptop"), "--params", "70B", "--format", "yaml",
                 ok=False)
    assert result.returncode == 1 and result.stdout == ""
    assert "no set-up fits" in result.stderr


RTX4090_64GB = {"cpu_count": 16, "ram_gb": 64, "accelerator": "cuda",
                 "gpus": [{"name": "NVIDIA GeForce RTX 4090", "memory_gb": 25.4, "capability": [8, 9]}]}
LLAMA2_FULL = ["--model", "meta-llama/Llama-2-7b-hf", "--finetune", "full", "--precision", "bf16-mixed",
               "--seq-len", "2048", "--batch-size", "4"]


def test_llama2_7b_full_on_one_4090_lists_every_option(tmp_path):
    """The issue's question: full fine-tune of Llama-2-7B, bf16-mixed, seq 2048, batch 4, one 24 GB card, 64 GB RAM."""
    (tmp_path / "4090.json").write_text(json.dumps(RTX4090_64GB))
    data = cli_json(tmp_path, "--profile", "4090.json", *LLAMA2_FULL)
    assert data["fits"] is False and data["model"]["params"] == 6_738_415_616
    options = {o["option"]: o for o in data["options"]}
    for kind in ("lora", "qlora"):  # micro-batch 1, accumulation 4 keeps the global batch
        assert options[kind]["fits"] and options[kind]["micro_batch"] == 1
        assert options[kind]["accumulate_grad_batches"] == 4
        assert options[kind]["per_device_gb"] <= data["memory"]["budget_gb"]
        assert f"--model.finetune {kind}" in options[kind]["command"]
        assert "--trainer.accumulate_grad_batches 4" in options[kind]["command"]
    offload = options["cpu_offload"]
    assert offload["fits"] is False and offload["host_ram_needed_gb"] > 64 and offload["ram_gb"] == 64
    assert f"needs {offload['host_ram_needed_gb']:.0f} GB RAM, this machine has 64 GB: does not fit" in offload["text"]
    assert options["fsdp"]["devices"] >= 2 and "--config configs/fsdp.yaml" in options["fsdp"]["command"]
    assert "larger_gpu" in options and "micro_batch" not in options  # weights + gradients + AdamW state alone exceed the card
    advice = next(w for w in data["warnings"] if w.startswith("no set-up fits"))
    assert "cannot help" in advice and "LoRA" in advice and "QLoRA" in advice and "smaller micro-batch" in advice
    assert "options that fit" in advice and advice.index("cannot help") < advice.index("options that fit")
    assert "GPUs like these" in advice  # FSDP on N of them
    text = cli(tmp_path, "--profile", "4090.json", *LLAMA2_FULL).stdout
    assert "--model.finetune lora" in text and "this machine has 64 GB" in text


def test_mps_profile_without_gpus_entry(tmp_path):
    (tmp_path / "m2.json").write_text(json.dumps({"cpu_count": 10, "ram_gb": 32, "accelerator": "mps"}))
    data = cli_json(tmp_path, "--profile", "m2.json", "--model", "Qwen/Qwen2.5-0.5B")
    assert data["trainer"]["accelerator"] == "mps" and data["machine"]["gpus"][0]["memory_gb"] == 32


def test_unknown_model_is_one_line_exit_2(tmp_path):
    (tmp_path / "4090.json").write_text(json.dumps(RTX4090_64GB))
    result = cli(tmp_path, "--profile", "4090.json", "--model", "acme/not-a-model-7b", ok=False,
                 env=(f"HF_HUB_CACHE={tmp_path / 'empty-cache'}",))
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert "unknown model 'acme/not-a-model-7b'" in result.stderr and "--params" in result.stderr


def test_model_from_the_local_hugging_face_cache(tmp_path):
    """A name that is neither a path nor in the table: transformers' AutoConfig, offline, from the cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    data = cli_json(tmp_path, "--profile", write_profile(tmp_path, "rtx4090"), "--model", "acme/tiny-llama",
                    env=(f"HF_HUB_CACHE={tmp_path / 'hub'}",))
    assert data["model"]["source"] == "local Hugging Face cache"
    assert data["model"]["params"] == meta_param_count(CONFIGS["llama"])


CPU = '{"cpu_count": 4, "ram_gb": 8, "accelerator": "cpu"}'
GPU = '{"cpu_count": 4, "ram_gb": 64, "accelerator": "cuda", "gpus": [{"memory_gb": %s, "capability": [8, 9]}]}'


@pytest.mark.parametrize("content, args, expected", [  # more cases: tests/test_bad_inputs.py
    ('{"cpu_count": 4, "ram_gb": 8, "accelerator": "npu", "gpus": []}', [], "unknown accelerator 'npu'"),
    ('{"cpu_count": 4, "ram_gb": 8, "accelerator": "cuda", "gpus": []}', [], "'gpus' must list"),
    (CPU, ["--params", "0"], "must be positive"), (CPU, ["--format", "xml"], "invalid choice: 'xml'"),
    (GPU % "NaN", [], "needs memory_gb, a positive number"), (GPU % -1, [], "needs memory_gb, a positive number"),
    (CPU, ["--model", "missing/config.json"], "unknown model"),
    (CPU, ["--model", "p.json"], "lacks a positive hidden_size"), (CPU, ["--lora-r", "0"], "must be positive integers"),
])
def test_bad_input_one_line_exit_2(tmp_path, content, args, expected):
    (tmp_path / "p.json").write_text(content)
    result = cli(tmp_path, "--profile", "p.json", *args, ok=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr


# ---- the references explain the same rules ----------------------------------------------------------------------
def first_code(cell: str) -> str:
    return cell.split("`")[1] if "`" in cell else cell


# Row (first words of the first cell) -> a case the row describes.
PRECISION_ROWS = {
    "CPU": ("cpu_laptop", None, "full"),
    "Apple GPU": ("apple_m2", None, "full"),
    "NVIDIA older than Ampere": ("v100", None, "full"),
    "NVIDIA Ampere or newer": ("a100_40", None, "full"),
    "Ada, Hopper or Blackwell": ("8xh100_te", "13B", "full"),
    "TPU": ("tpu_v4_8", None, "full"),
}
STRATEGY_ROWS = {
    "one device and the model fits": ("a100_40", "1.3B", "full"),
    "several GPUs, a full replica fits": ("8xh100", "124M", "full"),
    "several GPUs, a replica does not fit": ("8xa100_80", "7B", "full"),
    "FSDP shards fit but the activations do not": ("8xa100_80", "30B", "full"),
    "one GPU, the weights fit but the activations do not": ("rtx4090", "7B", "lora"),
    "GPU memory too small even sharded": ("a100_40", "7B", "full"),
    "TPU": ("tpu_v4_8", "350M", "full"),
    "nothing fits": ("cpu_laptop", "7B", "full"),
}


def row_case(table: dict, first_cell: str):
    matches = [case for key, case in table.items() if first_cell.startswith(key)]
    assert len(matches) == 1, f"no test case for the documented row {first_cell!r}: add it here"
    return matches[0]


def test_precision_reference_agrees_with_the_script():
    rows = doc_tables("precision.md", "What the script picks")[0]
    assert len(rows) == len(PRECISION_ROWS)
    for row in rows:
        profile, params, finetune = row_case(PRECISION_ROWS, row[0])
        assert plan_for(profile, params, finetune)["trainer"]["precision"] == first_code(row[1]), row


def test_distributed_reference_agrees_with_the_script():
    rows = doc_tables("distributed.md", "Which strategy: the decision table")[0]
    assert len(rows) == len(STRATEGY_ROWS)
    for row in rows:
        profile, params, finetune = row_case(STRATEGY_ROWS, row[0])
        result = plan_for(profile, params, finetune)
        if row[0].startswith("nothing fits"):
            assert not result["fits"]
            continue
        assert result["fits"] and result["trainer"]["strategy"] == first_code(row[1]), (row, result["candidates"])
        if row[2] in ("yes", "no"):
            assert result["activation_checkpointing"] == (row[2] == "yes"), row


def doc_tables(doc: str, heading: str) -> list:
    """Every table under a heading of a references/ file: lists of rows (cells), header and separator left out."""
    section = (REPO / "references" / doc).read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    tables, rows = [], None
    for line in section.splitlines() + [""]:
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows = [] if rows is None else rows
            if not set(cells[0]) <= set("- "):
                rows.append(cells)
        elif rows is not None:
            tables.append(rows[1:])
            rows = None
    return tables


MEMORY_HEADING = "How detect_hardware.py estimates memory"


def test_memory_reference_agrees_with_the_script():
    _, constants, targets, example = doc_tables("performance.md", MEMORY_HEADING)
    modes = {"`bf16-mixed`, `16-mixed`": "mixed", "`bf16-true`, `16-true`": "half", "`32-true`": "fp32"}
    documented = {}
    for family, precision, lora, *numbers in constants:
        family = "gpt2" if family.startswith("GPT-2") else "llama"
        for adapters in ((False, True) if lora == "either" else (lora == "yes",)):
            documented[(family, modes[precision], adapters)] = tuple(int(n) for n in numbers)
    assert documented == {(family, *key): value for family, table in dh.ACTIVATION_BYTES.items()
                          for key, value in table.items()}
    listed = {t.strip(): [c.split(" (")[0] for c in cells.split(", ")] for types, cells in targets
              for t in types.split(",") if t.strip() != "any other"}
    assert listed == {t: sorted(set(c), key=c.index) for t, c in dh.LORA_TARGETS.items()}
    llama = dh.load_model("meta-llama/Llama-2-7b-hf")
    result = dh.plan(dh.validate_machine(RTX4090_64GB, "4090"), llama, "full", 2048, 4, "bf16-mixed")
    options = {o["option"]: o for o in result["options"]}
    rows = {row[0].split(" ")[0]: row[1] for row in example}
    for name, checkpointing in (("as", False), ("activation", True)):
        planned = dh.memory_gb(llama, "full", "bf16-mixed", 2048, 4, "single", 1, checkpointing)["per_device_gb"]
        assert rows[name].startswith(f"{planned:.1f}"), name
    for name, key in (("LoRA", "lora"), ("QLoRA", "qlora")):
        assert rows[name] == f"{options[key]['per_device_gb']:.1f}", name
    assert f"{options['cpu_offload']['host_ram_needed_gb']:.0f} GB of RAM" in rows["CPU"]
    assert f"on {options['fsdp']['devices']} such GPUs" in next(r[0] for r in example if r[0].startswith("FSDP"))


@pytest.mark.parametrize("args, expected", [(["--profile", "missing.json"], "cannot read profile missing.json"),
                                            (["--params", "lots"], "parameter count")])
def test_bad_input_is_one_line_and_changes_no_file(args, expected, tmp_path):
    assert_bad_input_changes_nothing(SCRIPT, args, expected, tmp_path)


# ---- check_env.py ---------------------------------------------------------------------------------------------------
def test_check_env_fix_installs_into_the_checked_interpreter(tmp_path):
    import venv

    venv.create(tmp_path / "bare", with_pip=False)  # an interpreter without the packages
    bare = tmp_path / "bare" / ("Scripts" if os.name == "nt" else "bin") / "python"
    result = run_script("check_env.py", "--python", bare, "--format", "json", cwd=tmp_path, timeout=600)
    assert result.returncode == 1 and json.loads(result.stdout)["fix"].startswith(f"{bare} -m pip install ")


def test_check_env_passes_here_and_names_every_package(tmp_path):
    result = run_script("check_env.py", "--format", "json", cwd=tmp_path, timeout=600)
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["ok"], report
    checked = {p["package"] for p in report["packages"]}
    assert {"lightning", "torch", "transformers", "jsonargparse", "optuna", "peft"} <= checked

