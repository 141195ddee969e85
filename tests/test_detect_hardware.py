"""What the machine is and has: scripts/detect_hardware.py (decisions for described machines, the memory model against
measurement, the CLI) and scripts/check_env.py (installed packages against what the templates need)."""

import json
import os
import sys
import time

import pytest

from conftest import (QUIET, REPO, SCRIPTS, assert_bad_input_changes_nothing, assert_ok, load_module, run, run_script,
                      run_template)

SCRIPT = REPO / "scripts" / "detect_hardware.py"
dh = load_module(SCRIPT, "detect_hardware")


def gpus(n, name, memory_gb, capability):
    return [{"name": name, "memory_gb": memory_gb, "capability": list(capability)} for _ in range(n)]


def node(accelerator="cuda", devices=(), cpu_count=32, ram_gb=256, num_nodes=1, launcher=None, packages=(),
         **extra):
    return {"cpu_count": cpu_count, "ram_gb": ram_gb, "accelerator": accelerator, "gpus": list(devices),
            "num_nodes": num_nodes, "launcher": launcher, "packages": list(packages), **extra}


PROFILES = {
    "cpu_laptop": node("cpu", cpu_count=8, ram_gb=16),
    "cpu_server": node("cpu", cpu_count=64, ram_gb=512),
    "apple_m2": node("mps", gpus(1, "Apple M2 Pro", 32, (0, 0)), cpu_count=10, ram_gb=32),
    "t4": node(devices=gpus(1, "Tesla T4", 16, (7, 5)), cpu_count=8, ram_gb=32),
    "v100": node(devices=gpus(1, "Tesla V100-SXM2-32GB", 32, (7, 0)), cpu_count=8, ram_gb=64),
    "rtx4090": node(devices=gpus(1, "NVIDIA GeForce RTX 4090", 24, (8, 9)), cpu_count=16, ram_gb=64),
    "2x3090": node(devices=gpus(2, "NVIDIA GeForce RTX 3090", 24, (8, 6)), cpu_count=16, ram_gb=64),
    "a100_40": node(devices=gpus(1, "NVIDIA A100-SXM4-40GB", 40, (8, 0)), cpu_count=16, ram_gb=256),
    "8xa100_80": node(devices=gpus(8, "NVIDIA A100-SXM4-80GB", 80, (8, 0)), cpu_count=128, ram_gb=1024),
    "4xa10g_deepspeed": node(devices=gpus(4, "NVIDIA A10G", 24, (8, 6)), cpu_count=48, ram_gb=192,
                             packages=["deepspeed"]),
    "8xh100": node(devices=gpus(8, "NVIDIA H100 80GB HBM3", 80, (9, 0)), cpu_count=192, ram_gb=2000),
    "8xh100_te": node(devices=gpus(8, "NVIDIA H100 80GB HBM3", 80, (9, 0)), cpu_count=192, ram_gb=2000,
                      packages=["transformer_engine"]),
    "slurm_2x8xh100": node(devices=gpus(8, "NVIDIA H100 80GB HBM3", 80, (9, 0)), cpu_count=192, ram_gb=2000,
                           num_nodes=2, launcher="slurm", tasks_per_node=8),
    "slurm_wrong_tasks": node(devices=gpus(8, "NVIDIA H100 80GB HBM3", 80, (9, 0)), cpu_count=192, ram_gb=2000,
                              num_nodes=2, launcher="slurm", tasks_per_node=1),
    "torchrun_2x4xa100_40": node(devices=gpus(4, "NVIDIA A100-SXM4-40GB", 40, (8, 0)), cpu_count=64, ram_gb=512,
                                 num_nodes=2, launcher="torchrun", tasks_per_node=4),
    "tpu_v4_8": node("tpu", gpus(8, "TPU v4", 32, (0, 0)), cpu_count=96, ram_gb=400),
}

# (profile, params, finetune) -> (strategy, precision, fits, activation checkpointing)
CASES = [
    ("cpu_laptop", "10M", "full", "auto", "32-true", True, False),
    ("cpu_laptop", "7B", "full", "auto", "32-true", False, False),
    ("cpu_server", "7B", "full", "auto", "32-true", True, False),
    ("apple_m2", "124M", "full", "auto", "32-true", True, False),
    ("apple_m2", "7B", "full", "auto", "32-true", False, True),
    ("t4", "124M", "full", "auto", "16-mixed", True, False),
    ("t4", "1.3B", "full", "fsdp_cpu_offload", "16-mixed", True, False),
    ("t4", "7B", "lora", "fsdp_cpu_offload", "16-mixed", True, False),  # frozen base offloaded to CPU
    ("rtx4090", "70B", "lora", "fsdp_cpu_offload", "bf16-mixed", False, True),
    ("v100", "350M", "full", "auto", "16-mixed", True, False),
    ("rtx4090", "7B", "full", "fsdp_cpu_offload", "bf16-mixed", False, True),
    ("rtx4090", "7B", "lora", "auto", "bf16-mixed", True, True),
    ("2x3090", "1.3B", "full", "fsdp", "bf16-mixed", True, False),
    ("a100_40", "1.3B", "full", "auto", "bf16-mixed", True, False),
    ("a100_40", "7B", "full", "fsdp_cpu_offload", "bf16-mixed", True, False),
    ("8xa100_80", "7B", "full", "fsdp", "bf16-mixed", True, False),
    ("8xa100_80", "70B", "lora", "fsdp", "bf16-mixed", True, False),
    ("4xa10g_deepspeed", "7B", "full", "deepspeed_stage_3_offload", "bf16-mixed", True, False),
    ("8xh100", "124M", "full", "ddp", "bf16-mixed", True, False),
    ("8xh100", "13B", "full", "fsdp", "bf16-mixed", True, False),
    ("8xh100_te", "13B", "full", "fsdp", "transformer-engine", True, False),
    ("8xh100_te", "124M", "full", "ddp", "bf16-mixed", True, False),
    ("slurm_2x8xh100", "7B", "full", "fsdp", "bf16-mixed", True, False),
    ("slurm_2x8xh100", "70B", "full", "fsdp_cpu_offload", "bf16-mixed", True, False),
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


def test_no_fit_advice_names_next_steps():
    advice = next(w for w in plan_for("rtx4090", "7B", "full")["warnings"] if w.startswith("no set-up fits"))
    assert "--finetune lora" in advice and "GPUs" in advice
    advice = next(w for w in plan_for("rtx4090", "70B", "lora")["warnings"] if w.startswith("no set-up fits"))
    assert "QLoRA" in advice


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


# ---- the command line --------------------------------------------------------------------------------------------
def write_profile(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(PROFILES[name]))
    return path


def test_live_detection_is_fast_and_complete(tmp_path):
    start = time.perf_counter()
    result = run([sys.executable, SCRIPT, "--format", "json"], cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert_ok(result)
    data = json.loads(result.stdout)
    assert set(data) >= {"trainer", "matmul_precision", "compile", "activation_checkpointing", "num_workers", "fits",
                         "memory", "reasons", "warnings"}
    assert set(data["trainer"]) == {"accelerator", "devices", "num_nodes", "strategy", "precision"}
    print(f"live detection: {elapsed:.2f} s")
    import torch

    if not torch.cuda.is_available():
        assert data["trainer"]["accelerator"] in ("cpu", "mps") and elapsed < 10  # goal < 3 s; slack for busy CI


def test_profile_json_output(tmp_path):
    result = run([sys.executable, SCRIPT, "--profile", write_profile(tmp_path, "8xa100_80"), "--params", "7B",
                  "--format", "json"], cwd=tmp_path)
    assert_ok(result)
    data = json.loads(result.stdout)
    assert data["trainer"]["strategy"] == "fsdp" and data["fits"] is True
    assert set(data["memory"]) >= {"per_device_gb", "budget_gb", "breakdown"}
    assert set(data["memory"]["breakdown"]) >= {"weights", "gradients", "optimizer", "activations"}


def test_text_output_has_one_reason_per_choice(tmp_path):
    result = run([sys.executable, SCRIPT, "--profile", write_profile(tmp_path, "t4"), "--params", "350M"],
                 cwd=tmp_path)
    assert_ok(result)
    for word in ("accelerator gpu", "precision 16-mixed", "strategy auto", "set_float32_matmul_precision",
                 "torch.compile", "num_workers"):
        assert word in result.stdout, word


def test_yaml_output_trains_the_tabular_template(tmp_path):
    hardware = run([sys.executable, SCRIPT, "--format", "yaml"], cwd=tmp_path)
    assert_ok(hardware)
    (tmp_path / "hardware.yaml").write_text(hardware.stdout)
    result = run_template("tabular.py", "fit", "--config", "hardware.yaml", "--trainer.max_epochs", "1", *QUIET,
                          cwd=tmp_path)
    assert_ok(result)
    assert "best val_loss=" in result.stdout


def test_yaml_output_for_a_gpu_profile_parses_in_the_template(tmp_path):
    hardware = run([sys.executable, SCRIPT, "--profile", write_profile(tmp_path, "slurm_2x8xh100"), "--params", "7B",
                    "--format", "yaml"], cwd=tmp_path)
    assert_ok(hardware)
    (tmp_path / "hardware.yaml").write_text(hardware.stdout)
    printed = run_template("tabular.py", "fit", "--config", "hardware.yaml", "--print_config", cwd=tmp_path)
    assert_ok(printed)
    assert "strategy: fsdp" in printed.stdout and "num_nodes: 2" in printed.stdout


def test_yaml_output_refuses_a_plan_that_does_not_fit(tmp_path):
    result = run([sys.executable, SCRIPT, "--profile", write_profile(tmp_path, "cpu_laptop"), "--params", "70B",
                  "--format", "yaml"], cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert "no set-up fits" in result.stderr


@pytest.mark.parametrize("content, args, expected", [
    ("{not json", [], "not valid JSON"),
    ('{"cpu_count": 4, "ram_gb": 8, "accelerator": "npu", "gpus": []}', [], "unknown accelerator 'npu'"),
    ('{"cpu_count": 4, "ram_gb": 8, "accelerator": "cuda", "gpus": []}', [], "'gpus' must list"),
    ('{"cpu_count": -1, "ram_gb": 8, "accelerator": "cpu"}', [], "cpu_count must be a positive number"),
    ('{"cpu_count": 4, "ram_gb": 8, "accelerator": "cpu"}', ["--params=-7B"], "cannot read parameter count"),
    ('{"cpu_count": 4, "ram_gb": 8, "accelerator": "cpu"}', ["--params", "0"], "must be positive"),
    ('{"cpu_count": 4, "ram_gb": 8, "accelerator": "cpu"}', ["--params", "seven"], "cannot read parameter count"),
    ('{"cpu_count": 4, "ram_gb": 8, "accelerator": "cpu"}', ["--format", "xml"], "invalid choice: 'xml'"),
])
def test_bad_input_one_line_exit_2(tmp_path, content, args, expected):
    (tmp_path / "p.json").write_text(content)
    result = run([sys.executable, SCRIPT, "--profile", "p.json", *args], cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr


def test_missing_profile_file(tmp_path):
    result = run([sys.executable, SCRIPT, "--profile", "missing.json"], cwd=tmp_path)
    assert result.returncode == 2 and "cannot read profile missing.json" in result.stderr


# ---- the references explain the same rules ----------------------------------------------------------------------
def doc_table(doc: str, heading: str) -> list:
    """Rows (lists of cells) of the first table under a heading of a references/ file."""
    text = (REPO / "references" / doc).read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:] if not set(row[0]) <= set("- ")]


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
    rows = doc_table("precision.md", "What the script picks")
    assert len(rows) == len(PRECISION_ROWS)
    for row in rows:
        profile, params, finetune = row_case(PRECISION_ROWS, row[0])
        assert plan_for(profile, params, finetune)["trainer"]["precision"] == first_code(row[1]), row


def test_distributed_reference_agrees_with_the_script():
    rows = doc_table("distributed.md", "Which strategy: the decision table")
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


@pytest.mark.parametrize("args, expected", [(["--profile", "missing.json"], "cannot read profile"), (["--params", "lots"], "parameter count")])
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
    assert {"lightning", "torch", "transformers", "jsonargparse", "optuna"} <= checked


@pytest.mark.parametrize("args, expected", [(["--python", "missing/python"], "cannot run")])
def test_check_env_bad_input_is_one_line_and_changes_no_file(args, expected, tmp_path):
    assert_bad_input_changes_nothing(SCRIPTS / "check_env.py", args, expected, tmp_path)
