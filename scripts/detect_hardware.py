"""Detect the hardware and turn it into Lightning Trainer settings, each with its reason.

Usage:
    python scripts/detect_hardware.py                               # this machine: table of settings and reasons
    python scripts/detect_hardware.py --params 7B --finetune lora   # plus a memory plan for a 7B-parameter model
    python scripts/detect_hardware.py --params 350M --format json   # for agents
    python scripts/detect_hardware.py --format yaml > hardware.yaml # a `trainer:` section for any template:
    python templates/tabular.py fit --config hardware.yaml
    python scripts/detect_hardware.py --profile machine.json --params 70B   # plan for a described machine

--profile FILE.json describes a machine instead of detecting this one (per node; one entry per accelerator):
    {"cpu_count": 16, "ram_gb": 128, "accelerator": "cuda",
     "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_gb": 80, "capability": [8, 0]}],
     "num_nodes": 1, "launcher": null, "packages": ["deepspeed"]}

The memory plan assumes a decoder-only transformer trained with AdamW: per device it adds weights, gradients,
optimizer state, DDP gradient buckets, activations (with and without activation checkpointing) and logits, for DDP,
FSDP full shard and CPU offload, and picks the cheapest set-up that fits in 90% of device memory less 1 GB.
Exit codes: 0 ok; 1 with --format yaml when no set-up fits (nothing is printed to stdout); 2 bad input.
"""

import argparse
import importlib.util
import json
import os
import re
import sys

HEADROOM, RESERVED_GB = 0.9, 1.0  # usable share of device memory, and what the CUDA context and allocator keep
CPU_RAM_SHARE = 0.8  # share of RAM a CPU/offload plan may use
LORA_TRAINABLE = 0.01  # adapters train about 1% of the parameters
VOCAB = 50304  # logits are estimated for a 50k vocabulary
ACCELERATORS = ("cuda", "mps", "tpu", "cpu")
LAUNCHERS = (None, "slurm", "torchrun")
OPTIONAL_PACKAGES = {"deepspeed": "deepspeed", "transformer_engine": "transformer_engine", "flash_attn": "flash_attn"}


class UsageError(ValueError):
    """Bad input: one line on stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line is easier to act on
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'7e9', '7B', '350M', '1.5b', '125000000' -> number of parameters."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", str(text), re.I)
    if not match:
        raise UsageError(f"cannot read parameter count {text!r}: use a number such as 7e9, 7B or 350M")
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    if value < 1:
        raise UsageError(f"parameter count must be positive, got {text!r}")
    return int(value)


def load_profile(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise UsageError(f"cannot read profile {path}: {err.strerror}")
    except json.JSONDecodeError as err:
        raise UsageError(f"profile {path} is not valid JSON ({err.msg}, line {err.lineno})")
    return validate_machine(data, source=f"profile {path}")


def validate_machine(data, source: str) -> dict:
    def bad(what):
        raise UsageError(f"{source}: {what}")

    if not isinstance(data, dict):
        bad("must be a JSON object")
    accelerator = data.get("accelerator")
    if accelerator not in ACCELERATORS:
        bad(f"unknown accelerator {accelerator!r}; use one of {', '.join(ACCELERATORS)}")
    for key in ("cpu_count", "ram_gb"):
        if not isinstance(data.get(key), (int, float)) or isinstance(data.get(key), bool) or data[key] <= 0:
            bad(f"{key} must be a positive number")
    gpus = data.get("gpus", [])
    if not isinstance(gpus, list) or (accelerator != "cpu" and not gpus):
        bad(f"'gpus' must list one entry per {accelerator} device")
    for gpu in gpus:
        if not isinstance(gpu, dict) or not isinstance(gpu.get("memory_gb"), (int, float)) or gpu["memory_gb"] <= 0:
            bad("each gpus entry needs a positive memory_gb")
        capability = gpu.get("capability", [0, 0] if accelerator != "cuda" else None)
        if not (isinstance(capability, list) and len(capability) == 2 and all(isinstance(c, int) for c in capability)):
            bad("each CUDA gpus entry needs capability [major, minor], e.g. [8, 0]")
    num_nodes = data.get("num_nodes", 1)
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        bad("num_nodes must be a positive integer")
    if data.get("launcher") not in LAUNCHERS:
        bad(f"unknown launcher {data.get('launcher')!r}; use null, \"slurm\" or \"torchrun\"")
    packages = data.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        bad("packages must be a list of names")
    return {
        "cpu_count": int(data["cpu_count"]), "ram_gb": float(data["ram_gb"]), "accelerator": accelerator,
        "gpus": [{"name": str(g.get("name", accelerator)), "memory_gb": float(g["memory_gb"]),
                  "free_gb": float(g.get("free_gb", g["memory_gb"])),
                  "capability": list(g.get("capability", [0, 0]))} for g in (gpus if accelerator != "cpu" else [])],
        "num_nodes": num_nodes, "launcher": data.get("launcher"),
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
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"name": props.name, "memory_gb": total / 1e9, "free_gb": free / 1e9,
                         "capability": [props.major, props.minor]})
    elif importlib.util.find_spec("torch_xla") is not None and _xla_devices():
        accelerator = "tpu"
        gpus = [{"name": "TPU", "memory_gb": 16.0, "capability": [0, 0]} for _ in range(_xla_devices())]
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        accelerator = "mps"  # unified memory: the device shares the machine's RAM
        gpus = [{"name": "Apple MPS", "memory_gb": ram_gb, "capability": [0, 0]}]
    machine = {"cpu_count": cpu_count, "ram_gb": round(ram_gb, 1), "accelerator": accelerator, "gpus": gpus,
               "num_nodes": 1, "launcher": None, "packages": [], **detect_launcher()}
    machine["packages"] = [name for name, module in OPTIONAL_PACKAGES.items() if _imports(module, accelerator)]
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
    if accelerator != "cuda":  # these packages only matter with CUDA; skip their slow imports elsewhere
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


# ---------------------------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------------------------
def choose_precision(machine: dict, params, finetune: str, reasons: list) -> str:
    acc = machine["accelerator"]
    if acc == "cpu":
        reasons.append("precision 32-true: CPUs without bf16 matrix units run mixed precision slower, not faster")
        return "32-true"
    if acc == "mps":
        reasons.append("precision 32-true: Lightning maps 16-mixed on MPS to torch.autocast('mps'), but op coverage"
                       " and speed-ups vary; try 16-mixed and measure")
        return "32-true"
    if acc == "tpu":
        reasons.append("precision 32-true: XLA supports 32-true, 16-true and bf16-true (no -mixed); bf16-true halves"
                       " weight memory at some stability cost")
        return "32-true"
    capability = tuple(min(g["capability"] for g in machine["gpus"]))
    if capability < (8, 0):
        reasons.append(f"precision 16-mixed: compute capability {capability[0]}.{capability[1]} is older than Ampere"
                       " (no fast bf16); fp16 autocast with loss scaling")
        return "16-mixed"
    fp8_card = capability >= (8, 9)  # Ada 8.9, Hopper 9.0, Blackwell 10.x/12.x
    if fp8_card and "transformer_engine" in machine["packages"] and params and params >= 1e9 and finetune == "full":
        reasons.append("precision transformer-engine: FP8 on an Ada/Hopper/Blackwell card with transformer_engine"
                       " installed, for a model large enough to gain from it")
        return "transformer-engine"
    note = " (transformer_engine would enable FP8 on this card)" if fp8_card and params and params >= 1e9 else ""
    reasons.append(f"precision bf16-mixed: Ampere or newer has bf16 tensor cores; no loss scaling needed{note}")
    return "bf16-mixed"


def model_shape(params: int) -> tuple:
    """Hidden size and layer count of a typical decoder-only transformer with this many parameters."""
    hidden = (128 * params / 12) ** (1 / 3)  # params ~ 12 * layers * hidden^2, hidden/layers ~ 128
    return hidden, max(1, round(hidden / 128))


def memory_gb(params, finetune, precision, seq_len, batch, strategy, world, checkpointing) -> dict:
    """Per-device memory (GB) of one training step, by part. strategy: single|ddp|fsdp|offload."""
    half = precision in ("16-true", "bf16-true")
    act_bytes = 4 if precision in ("32-true", "64-true") else 2
    trainable = params * (LORA_TRAINABLE if finetune == "lora" else 1.0)
    frozen = params - trainable if finetune == "lora" else 0
    frozen_bytes = 2 if act_bytes == 2 else 4  # LoRA: load the frozen base model in half precision off-CPU
    weights = trainable * (2 if half else 4) + frozen * frozen_bytes
    grads = trainable * (2 if half else 4)
    optimizer = trainable * 8  # AdamW: two fp32 states per trained parameter
    hidden, layers = model_shape(params)
    tokens = seq_len * batch
    full_layer = 17 * tokens * hidden * act_bytes  # saved activations of one block with SDPA/flash attention
    activations = layers * tokens * hidden * act_bytes + full_layer if checkpointing else layers * full_layer
    logits = tokens * VOCAB * 4 * 2  # fp32 logits and their gradient
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "ddp_buckets": 0.0,
             "gather_buffer": 0.0, "activations": activations, "logits": logits}
    layer_weights = 2 * (params / layers) * (2 if act_bytes == 2 else 4)  # one block gathered, one prefetched
    if strategy == "ddp" and world > 1:
        parts["ddp_buckets"] = grads  # DDP keeps a flat copy of the gradients for all-reduce
    elif strategy == "fsdp":
        for key in ("weights", "gradients", "optimizer"):
            parts[key] /= world
        parts["gather_buffer"] = layer_weights
    elif strategy == "offload":  # parameters, gradients and optimizer state live in CPU memory
        parts.update(weights=0.0, gradients=0.0, optimizer=0.0, gather_buffer=layer_weights)
    parts = {k: v / 1e9 for k, v in parts.items()}
    host = (weights + grads + optimizer) / world / 1e9 if strategy == "offload" else 0.0  # per process
    return {"per_device_gb": sum(parts.values()), "breakdown": parts, "host_gb": host}


def candidates(machine: dict, world: int) -> list:
    """(name, lightning strategy, memory strategy, activation checkpointing), cheapest in speed first."""
    acc = machine["accelerator"]
    single = world == 1
    data_parallel = ("single", "auto", "single", False) if single else ("ddp", "ddp", "ddp", False)
    if acc == "tpu":  # "auto" selects Lightning's XLAStrategy: one replica per TPU device
        return [("xla" if not single else "single", "auto", "single", False)]
    if acc == "cpu":
        return [data_parallel]
    offload = "deepspeed_stage_3_offload" if "deepspeed" in machine["packages"] and acc == "cuda" \
        else "fsdp_cpu_offload"
    if acc == "mps":
        return [data_parallel, (data_parallel[0] + "+ckpt", "auto", "single", True)]
    out = [data_parallel]
    if not single:
        out.append(("fsdp", "fsdp", "fsdp", False))
    out.append((data_parallel[0] + "+ckpt", data_parallel[1], data_parallel[2], True))
    if not single:
        out.append(("fsdp+ckpt", "fsdp", "fsdp", True))
    out += [(offload, offload, "offload", False), (offload + "+ckpt", offload, "offload", True)]
    return out


def plan(machine: dict, params=None, finetune="full", seq_len=2048, batch_size=1) -> dict:
    reasons, warnings = [], []
    acc = machine["accelerator"]
    devices = len(machine["gpus"]) if acc in ("cuda", "tpu") else 1
    nodes = machine["num_nodes"]
    if machine["launcher"] in ("slurm", "torchrun") and machine.get("tasks_per_node") not in (None, devices):
        warnings.append(f"{machine['launcher']} starts {machine['tasks_per_node']} processes per node but this node has"
                        f" {devices} device(s): set --ntasks-per-node / --nproc-per-node to {devices}, or the run"
                        " stops with 'ValueError: You set devices=...' (DDP) or hangs (FSDP)")
    world = devices * nodes
    accelerator = {"cuda": "gpu", "mps": "mps", "tpu": "tpu", "cpu": "cpu"}[acc]
    if acc == "cuda":
        what = f"{devices} CUDA device(s) per node: {machine['gpus'][0]['name']}"
    elif acc == "mps":
        what = "Apple GPU through Metal (MPS); one device, no multi-process strategies"
    elif acc == "tpu":
        what = f"{devices} TPU device(s) through torch_xla"
    else:
        what = "no GPU found" if not machine["gpus"] else "CPU requested"
    reasons.append(f"accelerator {accelerator}: {what}")
    precision = choose_precision(machine, params, finetune, reasons)
    if acc == "cpu":
        budget = machine["ram_gb"] * CPU_RAM_SHARE
    elif acc == "mps":
        budget = machine["ram_gb"] * 0.6  # unified memory shared with the OS and the CPU side of the program
    else:
        budget = min(min(g["memory_gb"] for g in machine["gpus"]) * HEADROOM - RESERVED_GB,
                     min(g["free_gb"] for g in machine["gpus"]) - RESERVED_GB)
    host_budget = machine["ram_gb"] * CPU_RAM_SHARE

    chosen, table, fits = candidates(machine, world)[0], [], True
    memory = {"per_device_gb": None, "budget_gb": round(budget, 2), "breakdown": {}}
    if params is not None:
        fits = False
        for cand in candidates(machine, world):
            est = memory_gb(params, finetune, precision, seq_len, batch_size, cand[2], world, cand[3])
            ok = est["per_device_gb"] <= budget and est["host_gb"] * world / nodes <= host_budget
            table.append({"name": cand[0], "strategy": cand[1], "per_device_gb": round(est["per_device_gb"], 2),
                          "host_gb_per_node": round(est["host_gb"] * world / nodes, 1), "fits": ok})
            if ok and not fits:
                chosen, fits, best = cand, True, est
        if not fits:  # report the set-up that comes closest, marked as not fitting
            chosen = min(candidates(machine, world), key=lambda c: memory_gb(
                params, finetune, precision, seq_len, batch_size, c[2], world, c[3])["per_device_gb"])
            best = memory_gb(params, finetune, precision, seq_len, batch_size, chosen[2], world, chosen[3])
            warnings.append(no_fit_advice(machine, params, finetune, precision, seq_len, batch_size, budget, world))
        memory = {"per_device_gb": round(best["per_device_gb"], 2), "budget_gb": round(budget, 2),
                  "breakdown": {k: round(v, 3) for k, v in best["breakdown"].items()}}
        if best["host_gb"]:
            memory["host_gb_per_node"] = round(best["host_gb"] * world / nodes, 1)
        desc = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
        reasons.append(f"strategy {chosen[1]}: " + (
            f"cheapest set-up in which a {desc}-parameter {finetune} run (seq {seq_len}, micro-batch {batch_size})"
            f" fits: {memory['per_device_gb']:.1f} of {budget:.1f} GB per device" if fits else  # as the table rounds
            f"nothing fits {budget:.1f} GB per device; see warnings"))
    else:
        reasons.append(f"strategy {chosen[1]}: " + ("one device" if world == 1 else
                       f"{world} devices: DDP replicates the model; pass --params to check that it fits"))
    if world > 1 and chosen[1] == "ddp":
        reasons.append("effective batch size = per-device batch x devices x num_nodes")

    matmul = "high" if acc == "cuda" and min(g["capability"] for g in machine["gpus"]) >= [8, 0] else "highest"
    reasons.append(f"torch.set_float32_matmul_precision('{matmul}'): " + (
        "TF32 tensor cores for the float32 matmuls left outside autocast" if matmul == "high"
        else "no TF32 tensor cores here; keep full float32 matmuls"))
    compile_ok = acc == "cuda" and min(g["capability"] for g in machine["gpus"]) >= [7, 0]
    reasons.append("torch.compile: " + ("yes, Triton kernels need compute capability 7.0+; compile a submodule in"
                                        " configure_model" if compile_ok else
                                        "no, compile time rarely pays off off CUDA; enable it and measure"))
    per_device_cpus = max(1, machine["cpu_count"] // max(1, devices))
    workers = max(0, min(8, per_device_cpus - 1))
    reasons.append(f"num_workers {workers}: {machine['cpu_count']} CPUs shared by {devices} device process(es),"
                   " one CPU left for the training loop; 0 for data already in memory")
    checkpointing = bool(chosen[3])
    if checkpointing:
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
            "candidates": table, "machine": machine, "reasons": reasons, "warnings": warnings}


def no_fit_advice(machine, params, finetune, precision, seq_len, batch_size, budget, world) -> str:
    steps = []
    if finetune == "full":
        lora = memory_gb(params, "lora", precision, seq_len, batch_size, "single", 1, True)["per_device_gb"]
        if lora <= budget:
            steps.append(f"LoRA fits one device ({lora:.1f} GB): --finetune lora")
    if finetune == "lora" and machine["accelerator"] == "cuda":
        steps.append("a 4-bit quantized base model (QLoRA: BitsandbytesPrecision) needs about a quarter of the weight"
                     " memory")
    if machine["accelerator"] == "cuda":
        for n in (2, 4, 8, 16, 32, 64, 128, 256, 512):
            if n > world and memory_gb(params, finetune, precision, seq_len, batch_size, "fsdp", n,
                                       True)["per_device_gb"] <= budget:
                steps.append(f"FSDP with activation checkpointing fits on {n} such GPUs")
                break
        need = memory_gb(params, finetune, precision, seq_len, batch_size, "fsdp" if world > 1 else "single",
                         world, True)["per_device_gb"]
        steps.append(f"or GPUs with at least {(need + RESERVED_GB) / HEADROOM:.0f} GB each")
    if batch_size > 1:
        steps.append("a smaller micro-batch with gradient accumulation")
    return "no set-up fits: " + "; ".join(steps or ["use a machine with more memory"])


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def describe(machine: dict) -> str:
    if machine["gpus"] and machine["accelerator"] != "cpu":
        g = machine["gpus"][0]
        dev = f"{len(machine['gpus'])} x {g['name']} ({g['memory_gb']:.0f} GB"
        dev += f", sm {g['capability'][0]}.{g['capability'][1]})" if machine["accelerator"] == "cuda" else ")"
    else:
        dev = "no accelerator"
    return (f"{dev}, {machine['num_nodes']} node(s), {machine['cpu_count']} CPUs, {machine['ram_gb']:.0f} GB RAM,"
            f" launcher: {machine['launcher'] or 'none'}, packages: {', '.join(machine['packages']) or 'none'}")


def as_text(result: dict) -> str:
    lines = [f"machine: {describe(result['machine'])}"]
    if result["candidates"]:
        lines.append(f"{'candidate':<32} {'GB/device':>10} {'host GB/node':>13}  fits")
        for c in result["candidates"]:
            lines.append(f"{c['name']:<32} {c['per_device_gb']:>10.1f} {c['host_gb_per_node']:>13.1f}  "
                         f"{'yes' if c['fits'] else 'no'}")
        lines.append(f"budget per device: {result['memory']['budget_gb']:.1f} GB; plan fits: "
                     f"{'yes' if result['fits'] else 'NO'}")
    lines.append("settings:")
    for key, value in result["trainer"].items():
        lines.append(f"  trainer.{key:<12} {value}")
    for key in ("matmul_precision", "compile", "activation_checkpointing", "num_workers"):
        lines.append(f"  {key:<20} {result[key]}")
    lines.append("reasons:")
    lines += [f"  - {r}" for r in result["reasons"]]
    lines += [f"WARNING: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def as_yaml(result: dict) -> str:
    t = result["trainer"]
    lines = [f"# detect_hardware.py: {describe(result['machine'])}",
             f"# also: compile: {str(result['compile']).lower()}, activation checkpointing:"
             f" {str(result['activation_checkpointing']).lower()}, DataLoader num_workers: {result['num_workers']}",
             f"matmul_precision: {result['matmul_precision']}  # torch.set_float32_matmul_precision",
             "trainer:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in t.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", help="model size: 7e9, 7B, 350M (enables the memory plan)")
    parser.add_argument("--finetune", choices=["full", "lora"], default="full",
                        help="full: train every parameter (default); lora: frozen base + small adapters")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (default 2048)")
    parser.add_argument("--batch-size", type=int, default=1, help="micro-batch per device (default 1)")
    parser.add_argument("--profile", help="JSON file describing a machine, instead of detecting this one")
    parser.add_argument("--format", choices=["text", "json", "yaml"], default="text")
    args = parser.parse_args(argv)
    try:
        params = parse_size(args.params) if args.params is not None else None
        if args.seq_len < 1 or args.batch_size < 1:
            raise UsageError("--seq-len and --batch-size must be positive integers")
        machine = load_profile(args.profile) if args.profile else detect_machine()
    except UsageError as err:
        print(f"detect_hardware.py: error: {err}", file=sys.stderr)
        return 2
    result = plan(machine, params, args.finetune, args.seq_len, args.batch_size)
    if args.format == "json":
        print(json.dumps(result, indent=2))
    elif args.format == "yaml":
        if not result["fits"]:
            print(f"detect_hardware.py: {result['warnings'][-1]}", file=sys.stderr)
            return 1
        print(as_yaml(result), end="")
    else:
        print(as_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
