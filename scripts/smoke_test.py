"""Run a LightningCLI training script for two batches and say PASS, or what failed and how to fix it.

Usage:
    python scripts/smoke_test.py tabular.py --config config.yaml         # the config's own devices and strategy
    python scripts/smoke_test.py my_project --config my_project/config.yaml   # the template scaffold.py put there
    python scripts/smoke_test.py tabular.py --config config.yaml --cpu      # one CPU process, float32
    python scripts/smoke_test.py my_project --config my_project/config.yaml --simulate-ddp   # a GPU config's strategy
                                                                            # on 2 CPU processes, float32
    python scripts/smoke_test.py causal_lm.py --timeout 300 --format json -- --data.data_path corpus/

It runs `SCRIPT fit [--config FILE] --trainer.fast_dev_run 2 --trainer.detect_anomaly true [extra args]` in a
subprocess (two training and two validation batches, no checkpoints or logs written; anomaly detection names the
operation that produced a NaN), with a callback added to the Trainer that counts the batches that ran: PASS needs a
clean exit and at least one training and one validation batch. Diagnoses: nothing trained, no validation, shape
mismatch, missing __main__ guard, unpicklable object under spawn, dtype mismatch under mixed precision, NaN loss,
DataLoader worker crash, CUDA out of memory, missing package, bad config, timeout (which ends the run and every
process it started: DDP ranks, DataLoader workers).
It reports what ran (processes, accelerator, strategy, precision, batches, seconds) and, in a folder scaffold.py made,
writes the result into RUN.md's "Checked here" section, the run card handed to whoever runs the project elsewhere.
Exit codes: 0 PASS, 1 FAIL (diagnosis printed), 2 bad usage.
"""

import argparse
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

# (id, patterns in the output, what it means, how to fix it); the first match wins, so specific before general.
DIAGNOSES = [
    ("main_guard", [r"requires that your script guards the main", r"finished its bootstrapping phase",
                    r"freeze_support\(\)"],
     "missing `if __name__ == \"__main__\":` guard: spawned processes re-import the script and start training again",
     "put the code that builds the Trainer/CLI under `if __name__ == \"__main__\": main()`"),
    ("unpicklable", [r"[Cc]an't pickle", r"cannot pickle", r"PicklingError", r"Can't get local object",
                     r"[Cc]an't get attribute .* on <module '__main__'"],
     "an object sent to spawned processes cannot be pickled (lambda, local function or class, open file, lock)",
     "define functions and classes at module level and create such objects inside setup()/hooks, or use"
     " strategy=ddp (not ddp_spawn) and DataLoader workers started with fork"),
    ("cuda_oom", [r"CUDA out of memory", r"OutOfMemoryError"],
     "CUDA out of memory",
     "lower data.batch_size (keep the effective batch with trainer.accumulate_grad_batches), use bf16-mixed,"
     " activation checkpointing or FSDP; python scripts/detect_hardware.py --params N estimates what fits"),
    ("nan_loss", [r"returned nan values", r"[Ll]oss is (nan|NaN|inf)", r"non-finite loss", r"is not finite"],
     "NaN or infinite values in the loss or its gradients",
     "lower the learning rate, clip gradients (trainer.gradient_clip_val), check the data for NaN/inf, use"
     " bf16-mixed instead of 16-mixed, and guard log/div/sqrt against zero; the failing operation is named above"),
    ("dataloader_worker", [r"DataLoader worker \(pid", r"in DataLoader worker process", r"worker.*exited unexpectedly"],
     "a DataLoader worker process crashed",
     "rerun with data.num_workers=0 to see the real error in the main process; in containers raise /dev/shm"
     " (docker run --shm-size=8g)"),
    ("dtype", [r"expected scalar type \w+ but found \w+", r"must have the same (scalar )?(type|dtype)",
               r"same dtype", r"Input type \(.*\) and (weight|bias) type", r"dtype.*but got", r"Expected .*dtype"],
     "dtype mismatch: tensors of different precision meet in one operation (typical under 16-mixed/bf16-mixed)",
     "do not call .half()/.bfloat16()/.to(dtype) on inputs or modules yourself: autocast casts; create new tensors"
     " with dtype=x.dtype and device=x.device"),
    ("shape", [r"mat1 and mat2 shapes cannot be multiplied", r"size mismatch for ", r"shape '\[.*\]' is invalid",
               r"must match the size of tensor", r"Expected input batch_size", r"Target \d+ is out of bounds",
               r"out of bounds for dimension", r"Sizes of tensors must match", r"does not match the broadcast shape"],
     "shape mismatch between the data and the model",
     "check that the model's input size and number of classes match the data (print one batch's shapes);"
     " the templates link them from the DataModule"),
    ("missing_package", [r"No module named '([\w.]+)'", r"ModuleNotFoundError", r"requires .* installed",
                         r"you must have \w+ installed"],
     "a package is missing",
     "install it into this environment (python scripts/check_env.py lists what the templates need)"),
    ("bad_config", [r"error: (Parser key|unrecognized arguments|Subcommand|data not found|cannot|folder not)",
                    r"usage: .* fit"],
     "the script rejected its arguments or configuration",
     "fix the value named in the error line; python SCRIPT fit --help lists every option"),
]


# The child process: the script run as `python SCRIPT ARGS` would run it, with a BatchCount callback added to every
# Trainer it builds (lightning.pytorch's, or pytorch_lightning's). BatchCount is imported from this file, so processes
# that ddp_spawn starts (they get the parent's sys.path) can unpickle it; ranks a DDP launcher starts anew run the
# script without it, and rank 0 reports.
CHILD = r"""
import functools, importlib.util, os, runpy, sys
sys.path.append(sys.argv[1])  # this folder, after the script's own: smoke_test.BatchCount
script = sys.argv[2]
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(script))

def count_batches(package):
    trainer_module = importlib.import_module(package)
    counter = getattr(importlib.import_module("smoke_test"), BATCH_COUNTS[package])
    build = trainer_module.Trainer.__init__

    @functools.wraps(build)  # its signature stays the Trainer's: LightningCLI reads its options from it
    def init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.callbacks.append(counter())

    trainer_module.Trainer.__init__ = init

BATCH_COUNTS = {"lightning.pytorch": "BatchCount", "pytorch_lightning": "BatchCountPL"}
for package in BATCH_COUNTS:
    try:
        if importlib.util.find_spec(package.split(".")[0]):
            count_batches(package)
    except ImportError:
        pass
runpy.run_path(script, run_name="__main__")
"""


def batch_count(package: str):
    """A callback class of `package` that counts the batches fit runs and prints them, with the setup, on rank 0."""
    callbacks = importlib.import_module(package + ".callbacks")

    class BatchCount(callbacks.Callback):
        train = 0
        val = 0

        def on_train_batch_end(self, trainer, *args):
            self.train += 1

        def on_validation_batch_end(self, trainer, *args):
            self.val += not trainer.sanity_checking

        def on_fit_end(self, trainer, pl_module):
            if trainer.is_global_zero:
                print("SMOKE_TEST_RAN " + json.dumps({
                    "train_batches": self.train, "val_batches": self.val, "processes": trainer.world_size,
                    "accelerator": type(trainer.accelerator).__name__.replace("Accelerator", "").lower(),
                    "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision)}), flush=True)

    return BatchCount


def __getattr__(name: str):
    """BatchCount and BatchCountPL, built on first use: only the run under test imports Lightning."""
    packages = {"BatchCount": "lightning.pytorch", "BatchCountPL": "pytorch_lightning"}
    if name not in packages:
        raise AttributeError(name)
    cls = batch_count(packages[name])
    cls.__name__ = cls.__qualname__ = name  # pickled by reference: smoke_test.<name>
    globals()[name] = cls
    return cls


def ran(output: str) -> dict:
    """What the child's batch count printed, or {} when no Trainer finished fit."""
    found = re.findall(r"^SMOKE_TEST_RAN (\{.*\})$", output, re.MULTILINE)
    return json.loads(found[-1]) if found else {}


def diagnose(output: str) -> dict:
    own = re.search(r"^[\w.-]+\.py: error: (.+)$", output, re.MULTILINE)  # a template's one-line refusal
    if own:  # it names the problem and the fix itself; other lines (a library's load report, say) may mislead
        ident = "nan_loss" if "NaN or inf" in own.group(1) else (
            "missing_package" if "pip install" in own.group(1) else next(  # a known failure it names (CUDA OOM)
                (i for i, patterns, *_ in DIAGNOSES[:-1] if any(re.search(p, own.group(1)) for p in patterns)),
                "bad_config"))
        return {"diagnosis": ident, "message": "the script refused to run", "fix": own.group(1).strip()[:300],
                "error_line": own.group(0).strip()[:300]}
    for ident, patterns, meaning, fix in DIAGNOSES:
        for pattern in patterns:
            match = re.search(pattern, output)
            if match:
                line = next((l.strip() for l in output.splitlines() if re.search(pattern, l)), match.group(0))
                if ident == "missing_package" and match.groups():
                    fix = f"install {match.group(1).split('.')[0]} into this environment, then rerun ({fix})"
                return {"diagnosis": ident, "message": meaning, "fix": fix, "error_line": line[:300]}
    tail = [l.strip() for l in output.strip().splitlines() if l.strip()][-1:] or ["no output"]
    return {"diagnosis": "unknown", "message": "the run failed", "fix": "read the error line and the traceback",
            "error_line": tail[0][:300]}


def run_in_own_group(cmd: list, timeout: float, cwd: Path) -> tuple:
    """(stdout + stderr, exit code, or None after a timeout). The run leads a process group of its own, and a timeout
    kills the group: every process it started (DDP ranks, DataLoader workers), not only the first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)

    def kill_group() -> None:
        if hasattr(os, "killpg"):  # POSIX; Windows has no process groups to kill by signal
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()

    try:
        out, err = proc.communicate(timeout=timeout)
        return out + "\n" + err, proc.returncode
    except subprocess.TimeoutExpired:
        kill_group()
        out, err = proc.communicate()
        return out + "\n" + err, None
    except BaseException:  # Ctrl-C reaches this process only: the run, in its own session, goes with it
        kill_group()
        raise


def cpu_stand_in(config) -> str:
    """--simulate-ddp keeps a DDP or FSDP2 (ModelParallelStrategy) strategy of the config: both run on CPU processes.
    FSDP and DeepSpeed need GPUs, and a single-process strategy has nothing to check: DDP stands in ("" keeps it)."""
    from launch import read_yaml

    strategy = ((read_yaml(Path(config)) if config else {}).get("trainer") or {}).get("strategy") or "auto"
    name = (strategy if isinstance(strategy, str) else str(strategy.get("class_path", "")) if isinstance(strategy, dict)
            else "").lower()
    return "" if "ddp" in name or "modelparallel" in name else "ddp"


def record(card: Path, report: dict, args) -> None:
    """The result, in the "Checked here" section of a scaffolded project's RUN.md (staged, then renamed)."""
    if not card.is_file() or "\n## Checked here\n" not in (text := card.read_text(encoding="utf-8")):
        return
    ran = report.get("ran") or {}
    how = " --simulate-ddp" if args.simulate_ddp else " --cpu" if args.cpu else ""
    result = (f"PASS in {report['seconds']} s on {time.strftime('%Y-%m-%d')}: {ran.get('train_batches')} training and"
              f" {ran.get('val_batches')} validation batches; {ran.get('processes')} process(es),"
              f" {ran.get('accelerator')}, {ran.get('strategy')}, {ran.get('precision')}" if report["status"] == "pass"
              else f"FAIL ({report['diagnosis']}) on {time.strftime('%Y-%m-%d')}: {report['message']}")
    head, _, rest = text.partition("\n## Checked here\n")
    tail = rest[rest.find("\n## "):] if "\n## " in rest else "\n"
    lines = [line for line in rest[:len(rest) - len(tail)].strip().splitlines()
             if line.startswith("- smoke_test") and f"smoke_test{how}:" not in line]  # other checks' results stay
    section = "\n".join([*lines, f"- smoke_test{how}: {result}"])
    staged = card.with_name(".RUN.md.smoke")
    staged.write_text(f"{head}\n## Checked here\n\n{section}\n{tail}", encoding="utf-8")
    os.replace(staged, card)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="a LightningCLI training script (fit subcommand), or the folder scaffold.py"
                        " made (its template)")
    parser.add_argument("--config", help="config file passed as --config")
    parser.add_argument("--cpu", action="store_true", help="force one CPU process in float32")
    parser.add_argument("--simulate-ddp", action="store_true", help="2 CPU processes in float32 with the config's"
                        " DDP or FSDP2 strategy (else DDP: FSDP and DeepSpeed need GPUs): a multi-GPU config checked"
                        " on a machine without GPUs")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the run counts as hung")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    parser.usage = "%(prog)s [-h] [--config CONFIG] [--cpu] [--timeout T] [--format {text,json}] script [-- ARGS...]"
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)  # everything after -- goes to the script unchanged
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1:]
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other scripts of this folder
    from launch import UsageError, find_template, read_yaml

    script = Path(args.script)
    try:
        if not (0 < args.timeout < float("inf")):
            raise UsageError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
        script = (find_template(script) or script) if script.is_dir() else script
        if args.config and Path(args.config).exists():
            read_yaml(Path(args.config))  # the run would stop at it with a long error: one line here
    except UsageError as err:
        print(f"smoke_test.py: error: {err}", file=sys.stderr)
        return 2
    if not script.is_file():
        print(f"smoke_test.py: error: no such script: {script}" + (" (no .py file that imports lightning_support"
              " in that folder)" if script.is_dir() else ""), file=sys.stderr)
        return 2
    if args.config and not Path(args.config).exists():
        print(f"smoke_test.py: error: no such config: {args.config}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-c", CHILD, str(Path(__file__).resolve().parent), str(script.resolve()), "fit"]
    cmd += ["--config", str(Path(args.config).resolve())] if args.config else []
    cmd += ["--trainer.fast_dev_run", "2", "--trainer.detect_anomaly", "true"]
    if args.cpu or args.simulate_ddp:
        cmd += ["--trainer.accelerator", "cpu", "--trainer.devices", "2" if args.simulate_ddp else "1",
                "--trainer.precision", "32-true", "--trainer.num_nodes", "1"]
        stand_in = "auto" if args.cpu else cpu_stand_in(args.config)
        cmd += ["--trainer.strategy", stand_in] if stand_in else []
    cmd += args.extra
    start = time.perf_counter()
    output, code = run_in_own_group(cmd, args.timeout, script.resolve().parent)
    seconds = round(time.perf_counter() - start, 1)
    shown = shlex.join([sys.executable, str(script.resolve()), *cmd[5:]])  # the command, without the batch count
    evidence = ran(output)
    if code == 0 and evidence.get("train_batches") and evidence.get("val_batches"):
        report = {"status": "pass", "seconds": seconds, "command": shown, "ran": evidence}
    elif code == 0:
        missing = "validation" if evidence.get("train_batches") else "training"
        report = {"status": "fail", "seconds": seconds, "command": shown, "ran": evidence,
                  "diagnosis": f"no_{missing}", "error_line": "",
                  "message": f"the script exited cleanly but no {missing} batch ran",
                  "fix": ("give the model a validation_step and the data a val_dataloader (the templates keep the"
                          " checkpoint with the best validation metric), and keep trainer.limit_val_batches above 0")
                  if missing == "validation" else
                  ("pass a LightningCLI training script whose `fit` subcommand builds a Trainer and trains (a"
                   " script that only prints, or returns before fit, proves nothing)")}
    elif code is None:
        report = {"status": "fail", "seconds": seconds, "command": shown, "diagnosis": "timeout",
                  "message": f"no result within {args.timeout:.0f} s",
                  "fix": "a hang at 'Initializing distributed' means devices/num_nodes differ from the processes"
                         " started by hand or the nodes cannot reach each other; otherwise raise --timeout or shrink"
                         " the data", "error_line": ""}
    else:
        report = {"status": "fail", "seconds": seconds, "command": shown, "exit_code": code,
                  **diagnose(output)}
    try:
        record(script.resolve().parent / "RUN.md", report, args)
    except OSError as err:  # the result stands; the card stays as it was
        print(f"smoke_test.py: could not record the result in RUN.md: {err.strerror or err}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    elif report["status"] == "pass":
        print(f"PASS ({seconds} s): {evidence['train_batches']} training and {evidence['val_batches']} validation"
              f" batches ran ({evidence['processes']} process(es), {evidence['accelerator']}, {evidence['strategy']},"
              f" {evidence['precision']})")
    else:
        print(f"FAIL ({report['diagnosis']}): {report['message']}")
        if report["error_line"]:
            print(f"  error: {report['error_line']}")
        print(f"  fix:   {report['fix']}")
    return 0 if report["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
