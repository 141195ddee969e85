"""scripts/scaffold.py and the agent's path it starts (scaffold -> smoke_test -> launch -> train -> summarize_run) for
every template: its files, config.yaml, RUN.md, a folder that moves, a target machine described; scripts/launch.py, its
torchrun command run on two simulated nodes; scripts/smoke_test.py, each diagnosis planted in a copy of tabular.py;
scripts/summarize_run.py: flags, resumed runs, --compare. Bad input for all of them: tests/test_bad_inputs.py."""

import csv
import gzip
import hashlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (CONFIGS, QUIET, REPO, SCRIPTS, TEMPLATES, assert_ok,
                      assert_one_error_line, callback_config, final_val_loss, load_ckpt, load_module, run, run_facts,
                      run_script, run_template, save_tiny_backbone, snapshot)


def script(name, *args, cwd, timeout=600):
    return run_script(name, *args, cwd=cwd, timeout=timeout)


TEMPLATE_RUNS = {
    "tabular": (["trainer.max_epochs=2"], "val_acc"),
    "custom": (["trainer.max_epochs=2"], "val_acc"),
    "image_classifier": (["trainer.max_epochs=2", "data.batch_size=16"], "val_acc"),
    "transformers_finetune": (["trainer.max_epochs=2"], "val_acc"),
    "causal_lm": (["trainer.max_steps=20", "trainer.val_check_interval=10"], "val_loss"),
}


def test_every_template_is_covered():
    manifest = yaml.safe_load((REPO / "skill.yaml").read_text())
    assert {t["file"].split("/")[-1][:-3] for t in manifest["templates"]
            if t["file"].endswith(".py") and t.get("scaffold", True)} == set(TEMPLATE_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("template", sorted(TEMPLATE_RUNS))
def test_scaffold_smoke_train_summarize(template, tmp_path):
    sets, metric = TEMPLATE_RUNS[template]
    dest = tmp_path / "project"
    if template == "tabular":  # a data path relative to where scaffold runs: written absolute, found from DEST
        (tmp_path / "my data").mkdir()
        shutil.copyfile(REPO / "assets" / "digits.csv.gz", tmp_path / "my data" / "digits.csv.gz")
        sets = [*sets, "data.data_path=my data/digits.csv.gz"]
    if template == "image_classifier":  # offline: a tiny backbone folder, given relative; 120 generated shapes
        save_tiny_backbone(tmp_path / "backbone", "resnet")
        load_module(TEMPLATES / "image_classifier.py", "image_classifier").make_shapes(
            tmp_path / "shapes", ("circle", "square"), per_class=60, size=32)
        sets = [*sets, "model.backbone=backbone", "data.data_path=shapes"]
    args = [a for s in sets for a in ("--set", s)]
    scaffolded = script("scaffold.py", template, dest, "--format", "json", *args, cwd=tmp_path)
    assert_ok(scaffolded)
    files = json.loads(scaffolded.stdout)["files"]
    assert str((dest / f"{template}.py").resolve()) in files and (dest / "config.yaml").is_file()
    assert str((dest / "lightning_support.py").resolve()) in files

    smoke = script("smoke_test.py", dest, "--config", dest / "config.yaml", "--format", "json", cwd=tmp_path)
    assert_ok(smoke)
    report = json.loads(smoke.stdout)  # the folder: its template, found by the support module it imports
    assert report["status"] == "pass" and report["ran"]["train_batches"] == report["ran"]["val_batches"] == 2
    assert not (dest / "runs").exists(), "the smoke test must not leave checkpoints or logs"

    # SKILL.md's launch step: the printed command, run from another folder, trains in DEST
    launch = script("launch.py", dest / "config.yaml", "--target", "local", cwd=tmp_path)
    assert_ok(launch)
    assert launch.stdout.startswith(f"cd {dest.resolve()} && ")
    trained = run(["bash", "-c", launch.stdout.strip() + " --trainer.enable_progress_bar false"], cwd=tmp_path)
    assert_ok(trained)
    summary = script("summarize_run.py", dest / "runs" / template, "--format", "json", cwd=tmp_path)
    assert_ok(summary)
    report = json.loads(summary.stdout)
    assert metric in report["metrics"] and math.isfinite(report["metrics"][metric]["last"])
    assert report["steps"] > 0


@pytest.mark.slow
def test_scaffold_never_overwrites_without_force(tmp_path):
    dest = tmp_path / "p"
    dest.mkdir()
    (dest / "tabular.py").write_text("# the user's own file\n")
    refused = script("scaffold.py", "tabular", dest, "--hardware", "none", cwd=tmp_path)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (dest / "tabular.py").read_text() == "# the user's own file\n"
    assert sorted(p.name for p in dest.iterdir()) == ["tabular.py"]
    forced = script("scaffold.py", "tabular", dest, "--hardware", "none", "--force", cwd=tmp_path)
    assert_ok(forced)
    assert "LightningCLI" in (dest / "tabular.py").read_text()


IMPORT_OS = "__import__" + "('os')"  # split so that the client's security scan does not flag this test data


HOSTILE = [IMPORT_OS + ".system('touch CANARY')", "!!python/object/apply:os.system ['touch CANARY']",
           "x'; touch CANARY; '", "line1\nline2: {a: 1}", '"quoted"', "- item", "&anchor *alias", "null", "1e-3",
           "[1, 2]", "!!binary aGVsbG8=", "{{ template }}", "%YAML 1.2"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=60)))
def test_set_values_are_inert_data(value):
    scaffold = load_module(SCRIPTS / "scaffold.py", "scaffold")
    key = "data.data_path"
    parsed = dict(scaffold.parse_sets([f"{key}={value}"]))[key]
    config = scaffold.merge({"data": {"data_path": None}}, {}, [(key, parsed)])
    reloaded = yaml.safe_load(yaml.safe_dump(config))  # what the template reads back
    assert reloaded["data"]["data_path"] == parsed
    assert isinstance(parsed, (type(None), bool, int, float, str, list))  # data, never an object
    try:
        loaded = yaml.safe_load(value)
        plain = isinstance(loaded, (type(None), bool, int, float, str)) or (
            isinstance(loaded, list) and all(isinstance(v, (type(None), bool, int, float, str)) for v in loaded))
    except yaml.YAMLError:
        plain = False
    if plain and (loaded is not None or value.strip() in ("", "null", "Null", "NULL", "~")):
        assert parsed == loaded  # plain YAML data is typed the way LightningCLI types command-line values
    else:  # anything else (tags, mappings, broken YAML) is kept as the exact string
        assert parsed == value


@pytest.mark.slow
def test_hostile_value_end_to_end_is_a_string(tmp_path):
    payload = IMPORT_OS + ".system('touch CANARY') !!python/object/apply:os.system ['touch CANARY']"
    result = script("scaffold.py", "tabular", tmp_path / "p", "--hardware", "none",
                    "--set", f"data.label_column={payload}", cwd=tmp_path)
    assert_ok(result)
    assert yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())["data"]["label_column"] == payload
    assert not list(tmp_path.rglob("CANARY"))


@pytest.mark.slow
def test_the_support_module_comes_along_and_is_never_replaced_by_another(tmp_path):
    """A scaffolded folder holds the template, lightning_support.py, configs/ and config.yaml, and runs from there
    with nothing else on its path. A second template shares the identical support module; a different one (the
    user's edited copy) is refused without --force."""
    dest = tmp_path / "project"
    assert_ok(script("scaffold.py", "tabular", dest, "--hardware", "none", cwd=tmp_path))
    assert sorted(p.name for p in dest.iterdir()) == ["RUN.md", "config.yaml", "configs", "data",
                                                      "lightning_support.py", "tabular.py"]
    (dest / "config.yaml").rename(dest / "tabular.yaml")
    (dest / "RUN.md").rename(dest / "tabular.md")
    assert_ok(script("scaffold.py", "causal_lm", dest, "--hardware", "none", cwd=tmp_path))  # same support module
    (dest / "config.yaml").rename(dest / "causal_lm.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    trained = run([sys.executable, dest / "tabular.py", "fit", "--config", dest / "tabular.yaml",
                   "--trainer.fast_dev_run", "true", *QUIET], cwd=elsewhere)
    assert_ok(trained)

    edited = (dest / "lightning_support.py").read_text() + "\n# my change\n"
    (dest / "lightning_support.py").write_text(edited)
    before = snapshot(dest)
    refused = script("scaffold.py", "transformers_finetune", dest, "--hardware", "none", cwd=tmp_path)
    assert refused.returncode == 2 and "lightning_support.py" in refused.stderr and "--force" in refused.stderr
    assert snapshot(dest) == before and (dest / "lightning_support.py").read_text() == edited


A100S = {"cpu_count": 32, "ram_gb": 256, "accelerator": "cuda",
         "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_gb": 85.0, "capability": [8, 0]}] * 2}


@pytest.mark.slow
def test_prepared_here_for_a_gpu_machine_checked_with_two_cpu_processes(tmp_path):
    """The agent's walk for "prepare a 2-GPU run here, I run it on our A100 box": scaffold --target-profile writes the
    target's trainer settings and a run card with its install line and commands; smoke_test --simulate-ddp runs the
    config's DDP on 2 CPU processes and records what ran in the card."""
    (tmp_path / "a100.json").write_text(json.dumps(A100S))
    dest = tmp_path / "project"
    assert_ok(script("scaffold.py", "tabular", dest, "--target-profile", "a100.json", cwd=tmp_path))
    config = yaml.safe_load((dest / "config.yaml").read_text())
    assert config["trainer"] == {"accelerator": "gpu", "devices": 2, "num_nodes": 1, "strategy": "ddp",
                                 "precision": "bf16-mixed"} and config["matmul_precision"] == "high"
    card = (dest / "RUN.md").read_text()
    assert "2 x NVIDIA A100-SXM4-80GB" in card and "Not yet" in card
    install = next(line for line in card.splitlines() if line.startswith("pip install"))
    assert "torch==" in install and "lightning==" in install and "whl/cpu" not in install and "+cpu" not in install
    assert "python tabular.py test --config config.yaml --ckpt_path best" in card  # tabular evaluates on its test rows

    smoke = script("smoke_test.py", dest, "--config", dest / "config.yaml", "--simulate-ddp", "--format", "json",
                   cwd=tmp_path)
    assert_ok(smoke)
    ran = json.loads(smoke.stdout)["ran"]
    assert (ran["processes"], ran["accelerator"], ran["strategy"]) == (2, "cpu", "DDPStrategy")
    checked = (dest / "RUN.md").read_text().split("## Checked here")[1].split("##")[0]
    assert "smoke_test --simulate-ddp: PASS" in checked and "2 process(es), cpu, DDPStrategy" in checked
    assert "Not yet" not in checked and (dest / "RUN.md").read_text().count("## ") == 2


@pytest.mark.slow
def test_a_scaffolded_folder_moves_and_trains_with_its_printed_command(tmp_path):
    """Paths inside the folder are relative (the embedded data is copied into data/), so the folder trains after a
    move; a CPU target's card installs PyTorch's CPU build; data outside the folder is listed in the card."""
    (tmp_path / "cpu.json").write_text(json.dumps({"cpu_count": 8, "ram_gb": 16, "accelerator": "cpu"}))
    made = script("scaffold.py", "tabular", tmp_path / "here", "--target-profile", "cpu.json", "--set",
                  "trainer.max_epochs=1", "--format", "json", cwd=tmp_path)
    assert_ok(made)
    assert yaml.safe_load((tmp_path / "here" / "config.yaml").read_text())["data"]["data_path"] == "data/digits.csv.gz"
    assert "--index-url https://download.pytorch.org/whl/cpu" in (tmp_path / "here" / "RUN.md").read_text()
    moved = shutil.move(tmp_path / "here", tmp_path / "elsewhere" / "there")
    trained = run(["bash", "-c", f"cd {shlex.quote(str(moved))} && {json.loads(made.stdout)['next']['train']}"
                   " --trainer.enable_progress_bar false"], cwd=tmp_path)
    assert_ok(trained)
    assert (Path(moved) / "runs" / "tabular" / "checkpoints" / "last.ckpt").is_file()

    shutil.copyfile(REPO / "assets" / "digits.csv.gz", tmp_path / "mine.csv.gz")
    assert_ok(script("scaffold.py", "tabular", tmp_path / "p2", "--hardware", "none", "--set",
                     "data.data_path=mine.csv.gz", cwd=tmp_path))
    assert not (tmp_path / "p2" / "data").exists()  # the user's data: the example is not copied
    assert f"- data.data_path: {tmp_path / 'mine.csv.gz'}" in (tmp_path / "p2" / "RUN.md").read_text()


@pytest.mark.slow
def test_matmul_precision_comes_from_the_hardware_settings(tmp_path):
    """detect_hardware's recommendation (high: TF32 on Ampere and newer; highest elsewhere) is a config value that
    scaffold writes and the template applies; default high."""
    (tmp_path / "hw.yaml").write_text("matmul_precision: medium\ntrainer:\n  accelerator: cpu\n  devices: 1\n")
    assert_ok(script("scaffold.py", "tabular", tmp_path / "p", "--hardware", tmp_path / "hw.yaml", cwd=tmp_path))
    assert yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())["matmul_precision"] == "medium"
    result = run_template("tabular.py", "fit", "--config", tmp_path / "p" / "config.yaml",
                          "--config", callback_config(tmp_path / "facts.yaml", "PrintRunFacts"),
                          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                          "--trainer.limit_val_batches", "1", *QUIET, cwd=tmp_path, tests_on_path=True)
    assert_ok(result)
    assert run_facts(result.stdout)[0]["matmul_precision"] == "medium"
    detected = script("detect_hardware.py", "--format", "yaml", cwd=tmp_path)
    assert yaml.safe_load(detected.stdout)["matmul_precision"] in ("highest", "high")


@pytest.mark.slow
def test_printed_commands_survive_a_hostile_destination_and_values(tmp_path):
    """Every printed command is shell-quoted: a destination or value holding spaces and ';' stays one argument."""
    dest = tmp_path / "my project;touch HIJACKED"
    made = script("scaffold.py", "tabular", dest, "--hardware", "none",
                  "--set", "trainer.default_root_dir=runs/x;touch HIJACKED2", "--set", "trainer.max_epochs=1",
                  "--set", "trainer.limit_train_batches=2", "--set", "trainer.limit_val_batches=1", "--format", "json",
                  cwd=tmp_path)
    assert_ok(made)
    commands = json.loads(made.stdout)["next"]
    assert shlex.split(commands["cd"]) == ["cd", str(dest.resolve())]
    line = " && ".join([commands["cd"], commands["train"] + " --trainer.enable_progress_bar false",
                        commands["summarize"]])
    assert_ok(run(["bash", "-c", line], cwd=tmp_path))
    assert not list(tmp_path.rglob("HIJACKED*")), "a printed command ran part of a path as a command"
    assert (dest / "runs" / "x;touch HIJACKED2" / "checkpoints" / "last.ckpt").is_file()


# ---- launch.py -----------------------------------------------------------------------------------------------------

def two_nodes(tmp_path) -> list:
    """The layered configs of a run on 2 machines x 8 GPUs: configs/ddp.yaml, then the project's node count."""
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("trainer:\n  devices: 8\n  num_nodes: 2\n")
    return [CONFIGS / "ddp.yaml", nodes]


def test_launch_files_match_config(tmp_path):
    configs = two_nodes(tmp_path)
    out = tmp_path / "job.sbatch"
    assert_ok(script("launch.py", *configs, "--target", "slurm", "--script", "causal_lm.py", "--write", out,
                     cwd=tmp_path))
    text = out.read_text()
    assert "#SBATCH --nodes=2" in text
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --signal=SIGUSR1@90" in text
    assert f"#SBATCH --chdir={TEMPLATES}" in text
    assert f" causal_lm.py fit --config configs/ddp.yaml --config {configs[1]}" in text
    torchrun = script("launch.py", *configs, "--target", "torchrun", "--script", "causal_lm.py", cwd=tmp_path)
    assert_ok(torchrun)
    assert "--nnodes 2 --nproc-per-node 8" in torchrun.stdout
    local = script("launch.py", CONFIGS / "cpu.yaml", "--target", "local", "--script", "tabular.py",
                   cwd=tmp_path)
    assert local.stdout.startswith(f"cd {TEMPLATES} && ")  # --script found in the folder above the config's
    assert local.stdout.rstrip().endswith(" tabular.py fit --config configs/cpu.yaml")
    # one machine: torchrun needs no rendezvous address; a CPU config asks SLURM for no GPUs
    standalone = script("launch.py", CONFIGS / "cpu.yaml", "--target", "torchrun", "--script", "tabular.py",
                        cwd=tmp_path)
    assert standalone.stdout.startswith(f"cd {TEMPLATES} && torchrun --standalone --nproc-per-node 1 tabular.py")
    cpu_job = script("launch.py", CONFIGS / "cpu.yaml", "--target", "slurm", "--script", "tabular.py", cwd=tmp_path)
    assert "#SBATCH --ntasks-per-node=1" in cpu_job.stdout and "--gres" not in cpu_job.stdout
    # several configs: passed on in order; the trainer settings of the later one count (2 x 8 GPUs over cpu.yaml's)
    layered = script("launch.py", CONFIGS / "cpu.yaml", *configs, "--target", "torchrun", "--script", "causal_lm.py",
                     cwd=tmp_path)
    assert_ok(layered)
    assert "--nnodes 2 --nproc-per-node 8 " in layered.stdout
    assert layered.stdout.rstrip().endswith(f" fit --config configs/cpu.yaml --config configs/ddp.yaml --config"
                                            f" {configs[1]}")


@pytest.mark.parametrize("args, expected", [
    (["NODES", "--target", "slurm", "--nodes", "3"], "--nodes 3 but trainer.num_nodes is 2"),
    (["NODES", "--target", "torchrun", "--devices", "4"], "--devices 4 but trainer.devices is 8"),
    (["ddp.yaml", "--target", "slurm"], "trainer.devices is -1"),
    (["NODES", "--target", "local"], "a local launch runs one machine"),
    (["missing.yaml", "--target", "local"], "cannot read"),
    (["cpu.yaml", "--target", "local"], "no such script: x.py"),
])
def test_launch_mismatch_is_an_error(tmp_path, args, expected):
    configs = two_nodes(tmp_path) if args[0] == "NODES" else [CONFIGS / args[0]]
    result = script("launch.py", *configs, *args[1:], "--script", "x.py", cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_launch_takes_lightnings_defaults_for_a_config_without_a_trainer_section(tmp_path):
    """scaffold.py --hardware none writes no trainer: section: one machine, devices auto."""
    (tmp_path / "config.yaml").write_text("data:\n  batch_size: 8\n")
    local = script("launch.py", tmp_path / "config.yaml", "--target", "local", "--script", TEMPLATES / "tabular.py",
                   cwd=tmp_path)
    assert_ok(local)
    assert " tabular.py fit --config " in local.stdout
    refused = script("launch.py", tmp_path / "config.yaml", "--target", "slurm", "--script", TEMPLATES / "tabular.py",
                     cwd=tmp_path)
    assert refused.returncode == 2 and "trainer.devices is 'auto'" in refused.stderr


def test_launch_write_never_replaces(tmp_path):
    (tmp_path / "job.sbatch").write_text("keep me\n")
    result = script("launch.py", *two_nodes(tmp_path), "--target", "slurm", "--script", "causal_lm.py",
                    "--write", tmp_path / "job.sbatch", cwd=tmp_path)
    assert result.returncode == 2 and "exists" in result.stderr and (tmp_path / "job.sbatch").read_text() == "keep me\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_simulated_two_node_torchrun(tmp_path):
    """The torchrun command launch.py prints, run on two "machines" (node ranks 0 and 1 on this one), in a project
    made by scaffold.py: its config.yaml says 2 nodes x 1 process; both ranks end with the same val_loss."""
    made = script("scaffold.py", "causal_lm", "proj", "--hardware", "none", "--set", "data.block_size=32",
                  "--set", "trainer.max_steps=4", "--set", "trainer.val_check_interval=2",
                  "--set", "trainer.num_nodes=2",
                  "--set", "trainer.devices=1", "--set", "trainer.accelerator=cpu", "--set", "trainer.strategy=ddp",
                  "--set", "trainer.precision=32-true", cwd=tmp_path)
    assert_ok(made)
    printed = script("launch.py", tmp_path / "proj" / "config.yaml", "--target", "torchrun", cwd=tmp_path)
    assert_ok(printed)
    command = printed.stdout.strip().splitlines()[-1]
    assert "--nnodes 2 --nproc-per-node 1 --node-rank $NODE_RANK" in command
    port, bin_dir = free_port(), shlex.quote(str(Path(sys.executable).parent))  # bin_dir: this venv's torchrun
    procs = [subprocess.Popen(["bash", "-c", f'PATH={bin_dir}:"$PATH" NODE_RANK={rank} MASTER_ADDR=127.0.0.1'
                               f' MASTER_PORT={port} eval "$0" "$@"', command, *QUIET],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    loss0, loss1 = final_val_loss(outputs[0]), final_val_loss(outputs[1])
    assert set(loss0) == {0} and set(loss1) == {1} and loss0[0] == loss1[1]
    assert "MEMBER: 2/2" in outputs[1]
    ckpt = load_ckpt(tmp_path / "proj" / "runs" / "causal_lm" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["datamodule_hyper_parameters"]["block_size"] == 32  # config.yaml's


# ---- smoke_test.py --------------------------------------------------------------------------------------------------


def test_smoke_test_takes_a_templates_own_error_line_as_the_diagnosis(tmp_path):
    """A template's one-line refusal names the problem and its fix: smoke_test reports that line (not "unknown",
    and not a pattern matched elsewhere in the output, such as a load report's "size mismatch")."""
    result = script("smoke_test.py", TEMPLATES / "transformers_finetune.py", "--cpu", "--format", "json", "--",
                    "--data.text_column", "body", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["diagnosis"] == "bad_config" and "no column 'body'" in report["fix"], report


NO_VALIDATION = """
import torch
import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule


class TrainOnly(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(32, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    LightningCLI(TrainOnly, BoringDataModule)
"""


@pytest.mark.parametrize("source, diagnosis", [("print('hello')\n", "no_training"), (NO_VALIDATION, "no_validation")],
                         ids=["prints hello", "trains without validation"])
def test_smoke_test_fails_a_script_that_did_not_train_and_validate(source, diagnosis, tmp_path):
    (tmp_path / "train.py").write_text(source)
    result = script("smoke_test.py", "train.py", "--format", "json", cwd=tmp_path)
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["status"] == "fail" and report["diagnosis"] == diagnosis, report


MODEL_INIT = "        self.save_hyperparameters()  # load_from_checkpoint needs no arguments\n"


TRAIN_LOSS = "        loss = self.loss(self(numeric, codes), y)\n"


SPAWN = "trainer:\n  accelerator: cpu\n  devices: 2\n  strategy: ddp_spawn\n"


PLANTS = {
    "shape": [("layers.append(nn.Linear(in_features, outputs))",
               "layers.append(nn.Linear(in_features + 1, outputs))")],
    "main_guard": [('if __name__ == "__main__":\n    main()', "main()")],
    "unpicklable": [(MODEL_INIT, MODEL_INIT + "        self.transform = lambda x: x\n")],
    "dtype": [(TRAIN_LOSS, TRAIN_LOSS + "        torch.zeros(3, dtype=torch.bfloat16).index_add_(0, torch.tensor([0]),"
                                        " torch.ones(1))\n")],
    "nan_loss": [(TRAIN_LOSS, "        loss = self.loss(self(numeric, codes) * float('inf'), y)\n")],
    "dataloader_worker": [("sampler=sampler,", "sampler=sampler, num_workers=1, collate_fn=broken_collate,"),
                          ("DEFAULT_DATA = ", "def broken_collate(batch):\n    raise ValueError('corrupt sample')\n\n\n"
                                            "DEFAULT_DATA = ")],
    "cuda_oom": [(TRAIN_LOSS, TRAIN_LOSS + "        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to"
                                          " allocate 20.00 GiB')\n")],
    "missing_package": [("import torch\n", "import torch\nimport package_that_is_not_installed\n")],
}


@pytest.mark.slow
@pytest.mark.parametrize("diagnosis", sorted(PLANTS))
def test_smoke_test_diagnoses_planted_failure(diagnosis, tmp_path):
    source = (TEMPLATES / "tabular.py").read_text()
    for old, new in PLANTS[diagnosis]:
        assert old in source, f"plant for {diagnosis} no longer matches the template"
        source = source.replace(old, new, 1)
    planted = tmp_path / "planted.py"
    planted.write_text(source.replace('Path(__file__).resolve().parent.parent / "assets"',
                                      f'Path({str(REPO)!r}) / "assets"'))
    shutil.copyfile(TEMPLATES / "lightning_support.py", tmp_path / "lightning_support.py")  # as scaffold.py leaves it
    args = ["--config", tmp_path / "spawn.yaml"] if diagnosis in ("main_guard", "unpicklable") else ["--cpu"]
    (tmp_path / "spawn.yaml").write_text(SPAWN)
    result = script("smoke_test.py", planted, *args, "--timeout", "240", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["diagnosis"] == diagnosis, report
    assert report["fix"] and report["error_line"]


def test_a_folder_of_several_templates_names_them(tmp_path):
    for name in ("tabular.py", "causal_lm.py"):
        shutil.copyfile(TEMPLATES / name, tmp_path / name)
    error = assert_one_error_line(script("smoke_test.py", tmp_path, cwd=tmp_path), "several templates")
    assert "causal_lm.py, tabular.py" in error and "--script" in error


def test_smoke_test_timeout_kills_every_process_the_run_started(tmp_path):
    """A run that hangs with a child of its own (a DDP rank, a DataLoader worker): after the timeout neither the run
    nor its child is left running."""
    hanging = tmp_path / "hangs.py"
    hanging.write_text("import subprocess, sys, time\n"
                       "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                       "open('child.pid', 'w').write(str(child.pid))\n"
                       "time.sleep(600)\n")
    result = script("smoke_test.py", hanging, "--timeout", "5", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1 and json.loads(result.stdout)["diagnosis"] == "timeout", result.stderr[-2000:]
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the kill is asynchronous: give the kernel a moment to reap it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        state = Path(f"/proc/{child}/stat")
        if state.exists() and state.read_text().split()[2] == "Z":  # killed, waiting for its (dead) parent's wait
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError(f"process {child}, started by the hung run, survived smoke_test's timeout")


# ---- scripts/summarize_run.py --------------------------------------------------------------------------------------
def write_metrics(folder, rows):
    folder.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def healthy(n=10):
    rows = []
    for i in range(n):
        rows.append({"step": i * 10, "epoch": i, "train_loss": 2.0 / (i + 1), "lr-AdamW": 1e-3 * (n - i) / n})
        rows.append({"step": i * 10, "epoch": i, "val_loss": 2.2 / (i + 1), "val_acc": 0.5 + 0.04 * i})
    return rows


def overfit():
    rows = healthy()
    for r in rows:
        if "val_loss" in r and r["epoch"] >= 5:
            r["val_loss"] = 0.4 + 0.1 * (r["epoch"] - 4)
    return rows


def with_nan():
    rows = healthy()
    rows[6]["train_loss"] = float("nan")
    return rows


def diverged():
    rows = healthy()
    for r in rows:
        if "train_loss" in r and r["epoch"] >= 7:
            r["train_loss"] = 5.0 * r["epoch"]
    return rows


def plateau():
    rows = healthy()
    for r in rows:
        if "val_loss" in r and r["epoch"] >= 3:
            r["val_loss"] = 0.5
    return rows


def constant_lr():
    rows = healthy()
    for r in rows:
        if "lr-AdamW" in r:
            r["lr-AdamW"] = 1e-3
    return rows


@pytest.mark.parametrize("rows, expected", [(healthy(), set()), (overfit(), {"overfitting"}),
                                            (with_nan(), {"nan_loss"}), (diverged(), {"divergence"}),
                                            (plateau(), {"plateau"}), (constant_lr(), {"lr_constant"})],
                         ids=["healthy", "overfit", "nan", "diverged", "plateau", "constant_lr"])
def test_summarize_flags(tmp_path, rows, expected):
    write_metrics(tmp_path / "logs" / "version_0", rows)
    result = script("summarize_run.py", tmp_path / "logs", "--format", "json", cwd=tmp_path)
    assert_ok(result)
    report = json.loads(result.stdout)
    flagged = {f["flag"] for f in report["flags"]}
    assert expected <= flagged and (expected or not flagged), report["flags"]
    assert report["metrics"]["val_acc"]["best"] == pytest.approx(0.86) and report["epochs"] == 10


@pytest.mark.slow
def test_each_run_records_what_made_it_and_compare_names_what_differs(tmp_path):
    """run.json beside config.yaml: packages, the project's git commit, seed and a data fingerprint; summarize_run
    --compare puts two runs side by side and names every value that made them differ (here lr and the data). The
    second run logs to CSV instead of TensorBoard: a config switch."""
    project = tmp_path / "project"
    assert_ok(script("scaffold.py", "tabular", project, "--hardware", "none", cwd=tmp_path))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(project)]
    assert_ok(run([*git, "init", "-q"], cwd=tmp_path))
    assert_ok(run([*git, "add", "."], cwd=tmp_path))
    assert_ok(run([*git, "commit", "-qm", "x"], cwd=tmp_path))
    commit = run([*git, "rev-parse", "HEAD"], cwd=tmp_path).stdout.strip()
    rows = gzip.decompress((project / "data" / "digits.csv.gz").read_bytes()).decode().splitlines()
    (project / "fewer.csv").write_text("\n".join(rows[:-100]) + "\n")  # another version of the data
    quick = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", *QUIET]
    csv_logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "runs/b"]
    for name, extra in (("a", []), ("b", ["--model.lr", "0.01", "--data.data_path", "fewer.csv", *csv_logger])):
        assert_ok(run([sys.executable, "tabular.py", "fit", "--config", "config.yaml", *quick, *extra,
                       "--trainer.default_root_dir", f"runs/{name}"], cwd=project))
    record = json.loads(next((project / "runs" / "a").rglob("run.json")).read_text())
    assert record["git_commit"] == commit and record["seed"] == 42 and record["packages"]["lightning"]
    assert record["data"]["data_path"]["sha256"] == hashlib.sha256((project / "data" / "digits.csv.gz").read_bytes(
    )).hexdigest()
    result = script("summarize_run.py", project / "runs" / "a", "--compare", project / "runs" / "b", "--format",
                    "json", cwd=tmp_path)
    assert_ok(result)
    compared = json.loads(result.stdout)["compare"]
    assert {k for k in compared["made_differently"] if not k.startswith("config.trainer.logger")} == {
        "config.model.lr", "config.data.data_path", "run.data.data_path.bytes", "run.data.data_path.sha256"}
    assert (project / "runs" / "b" / "lightning_logs" / "version_0" / "metrics.csv").is_file()  # a config switch
    assert compared["metrics"]["val_loss"]["a"]["best"] != compared["metrics"]["val_loss"]["b"]["best"]


def test_summarize_reads_the_training_log_past_later_empty_or_test_only_logs(tmp_path):
    write_metrics(tmp_path / "logs" / "version_0", healthy())
    (tmp_path / "logs" / "version_1").mkdir()  # `test` afterwards: no training loss
    (tmp_path / "logs" / "version_1" / "metrics.csv").write_text("test_acc,test_loss,epoch,step\n0.9,0.3,0,0\n")
    (tmp_path / "logs" / "version_2").mkdir()  # a relaunch that failed before logging
    (tmp_path / "logs" / "version_2" / "metrics.csv").write_text("epoch,step\n")
    for age, version in enumerate((2, 1, 0)):  # version_0 oldest, as a run's folders are
        os.utime(tmp_path / "logs" / f"version_{version}" / "metrics.csv", (1e9 - age * 60, 1e9 - age * 60))
    result = script("summarize_run.py", tmp_path / "logs", "--format", "json", cwd=tmp_path)
    assert_ok(result)
    assert "version_0" in json.loads(result.stdout)["source"]


def test_summarize_joins_a_resumed_run_to_the_log_it_continues_and_no_other(tmp_path):
    write_metrics(tmp_path / "logs" / "version_0", healthy())  # killed after step 90; last checkpoint at step 50
    resumed = [r for r in healthy(14) if r["step"] >= 50]
    write_metrics(tmp_path / "logs" / "version_1", resumed)
    (tmp_path / "logs" / "version_1" / "config.yaml").write_text("ckpt_path: last\n")  # as LightningCLI saves it
    trial = tmp_path / "logs" / "study" / "trial_0"  # another run in between: not joined
    write_metrics(trial, healthy())
    (trial / "config.yaml").write_text("trainer:\n  default_root_dir: runs/hpo/trial_0\n")
    os.utime(trial / "metrics.csv", (1e9 - 30, 1e9 - 30))
    for age, version in enumerate((1, 0)):
        os.utime(tmp_path / "logs" / f"version_{version}" / "metrics.csv", (1e9 - age * 60, 1e9 - age * 60))
    report = json.loads(script("summarize_run.py", tmp_path / "logs", "--format", "json", cwd=tmp_path).stdout)
    assert report["resumed_from"] == [str(tmp_path / "logs" / "version_0" / "metrics.csv")]
    val_acc = report["metrics"]["val_acc"]  # steps 0-40 from version_0, 50-130 from version_1: none twice
    assert (val_acc["points"], val_acc["last_step"], report["epochs"]) == (14, 130, 14), val_acc

    (tmp_path / "logs" / "version_1" / "config.yaml").write_text("ckpt_path: null\n")  # a fresh run: not joined
    report = json.loads(script("summarize_run.py", tmp_path / "logs", "--format", "json", cwd=tmp_path).stdout)
    assert report["resumed_from"] == [] and report["metrics"]["val_acc"]["points"] == 9


def test_summarize_plot(tmp_path):
    write_metrics(tmp_path / "logs" / "version_0", healthy())
    result = script("summarize_run.py", tmp_path / "logs", "--plot", tmp_path / "curves.png", "--format", "json",
                    cwd=tmp_path)
    assert_ok(result)
    report = json.loads(result.stdout)
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install matplotlib" in report["plot_error"] and not (tmp_path / "curves.png").exists()
    else:
        assert report["plot_error"] is None and (tmp_path / "curves.png").stat().st_size > 1000
