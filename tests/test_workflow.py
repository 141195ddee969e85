"""The agent's path: scaffold -> smoke_test -> train -> summarize_run, for every template; plus each script's checks.

smoke_test diagnoses are proven by planting each failure in a copy of the classifier template.
"""

import csv
import importlib.util
import json
import math
import os
import shutil
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CONFIGS, REPO, TEMPLATES, assert_ok, assert_one_error_line, load_module, run

SCRIPTS = REPO / "scripts"


def script(name, *args, cwd, timeout=600):
    return run([sys.executable, SCRIPTS / name, *args], cwd=cwd, timeout=timeout)


# Per template: --set values that keep the real run short, and the validation metric summarize_run must report.
TEMPLATE_RUNS = {
    "classifier": (["trainer.max_epochs=2"], "val_acc"),
    "transformers_finetune": (["trainer.max_epochs=2"], "val_acc"),
    "causal_lm": (["trainer.max_steps=20", "trainer.val_check_interval=10"], "val_loss"),
}


def test_every_template_is_covered():
    manifest = yaml.safe_load((REPO / "skill.yaml").read_text())
    assert {t["file"].split("/")[-1][:-3] for t in manifest["templates"]
            if t["file"].endswith(".py") and t.get("scaffold", True)} == set(TEMPLATE_RUNS)


@pytest.mark.parametrize("template", sorted(TEMPLATE_RUNS))
def test_scaffold_smoke_train_summarize(template, tmp_path):
    sets, metric = TEMPLATE_RUNS[template]
    dest = tmp_path / "project"
    if template == "classifier":  # a data path relative to where scaffold runs: written absolute, found from DEST
        (tmp_path / "my data").mkdir()
        shutil.copyfile(REPO / "assets" / "digits.csv.gz", tmp_path / "my data" / "digits.csv.gz")
        sets = [*sets, "data.data_path=my data/digits.csv.gz"]
    args = [a for s in sets for a in ("--set", s)]
    scaffolded = script("scaffold.py", template, dest, "--format", "json", *args, cwd=tmp_path)
    assert_ok(scaffolded)
    files = json.loads(scaffolded.stdout)["files"]
    assert str((dest / f"{template}.py").resolve()) in files and (dest / "config.yaml").is_file()

    smoke = script("smoke_test.py", dest / f"{template}.py", "--config", dest / "config.yaml", "--format", "json",
                   cwd=tmp_path)
    assert_ok(smoke)
    assert json.loads(smoke.stdout)["status"] == "pass"
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


# ---- scaffold ----------------------------------------------------------------------------------------------------
def test_scaffold_never_overwrites_without_force(tmp_path):
    dest = tmp_path / "p"
    dest.mkdir()
    (dest / "classifier.py").write_text("# the user's own file\n")
    refused = script("scaffold.py", "classifier", dest, "--hardware", "none", cwd=tmp_path)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (dest / "classifier.py").read_text() == "# the user's own file\n"
    assert sorted(p.name for p in dest.iterdir()) == ["classifier.py"]
    forced = script("scaffold.py", "classifier", dest, "--hardware", "none", "--force", cwd=tmp_path)
    assert_ok(forced)
    assert "LightningCLI" in (dest / "classifier.py").read_text()


@pytest.mark.parametrize("args, expected", [
    (["--set", "trainer.max_epoch=3"], "nearest valid keys: trainer.max_epochs"),
    (["--set", "model.lr"], "is not key=value"),
    (["--set", "model.lr=fast"], "the template rejects this config"),
    (["--hardware", "missing.yaml"], "cannot read --hardware"),
])
def test_scaffold_bad_input_writes_nothing(tmp_path, args, expected):
    result = script("scaffold.py", "classifier", tmp_path / "p", *args, cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "p").exists()


def test_scaffold_unknown_template(tmp_path):
    result = script("scaffold.py", "resnet", tmp_path / "p", cwd=tmp_path)
    assert result.returncode == 2 and "causal_lm, classifier, transformers_finetune" in result.stderr


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


def test_hostile_value_end_to_end_is_a_string(tmp_path):
    payload = IMPORT_OS + ".system('touch CANARY') !!python/object/apply:os.system ['touch CANARY']"
    result = script("scaffold.py", "classifier", tmp_path / "p", "--hardware", "none",
                    "--set", f"data.label_column={payload}", cwd=tmp_path)
    assert_ok(result)
    assert yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())["data"]["label_column"] == payload
    assert not list(tmp_path.rglob("CANARY"))


def test_smoke_test_takes_a_templates_own_error_line_as_the_diagnosis(tmp_path):
    """A template's one-line refusal names the problem and its fix: smoke_test reports that line (not "unknown",
    and not a pattern matched elsewhere in the output, such as a load report's "size mismatch")."""
    result = script("smoke_test.py", TEMPLATES / "transformers_finetune.py", "--cpu", "--format", "json", "--",
                    "--data.text_column", "body", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["diagnosis"] == "bad_config" and "no column 'body'" in report["fix"], report


# ---- smoke_test failure plants -----------------------------------------------------------------------------------
MODEL_INIT = "        self.save_hyperparameters()  # load_from_checkpoint needs no arguments\n"
TRAIN_LOSS = "        loss = F.cross_entropy(logits, y)\n"
SPAWN = "trainer:\n  accelerator: cpu\n  devices: 2\n  strategy: ddp_spawn\n"
PLANTS = {
    "shape": [("layers.append(nn.Linear(features, num_classes))",
               "layers.append(nn.Linear(features + 1, num_classes))")],
    "main_guard": [('if __name__ == "__main__":\n    main()', "main()")],
    "unpicklable": [(MODEL_INIT, MODEL_INIT + "        self.transform = lambda x: x\n")],
    "dtype": [(TRAIN_LOSS, TRAIN_LOSS + "        torch.zeros(3, dtype=torch.bfloat16).index_add_(0, torch.tensor([0]),"
                                        " torch.ones(1))\n")],
    "nan_loss": [("        logits = self(x)\n        loss", "        logits = self(x) * float('inf')\n        loss")],
    "dataloader_worker": [("num_workers=workers,", "num_workers=1, collate_fn=broken_collate,"),
                          ("class ConfigError(ValueError):", "def broken_collate(batch):\n    raise ValueError('corrupt"
                                                           " sample')\n\n\nclass ConfigError(ValueError):")],
    "cuda_oom": [(TRAIN_LOSS, TRAIN_LOSS + "        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to"
                                          " allocate 20.00 GiB')\n")],
    "missing_package": [("import torch\n", "import torch\nimport package_that_is_not_installed\n")],
}


@pytest.mark.parametrize("diagnosis", sorted(PLANTS))
def test_smoke_test_diagnoses_planted_failure(diagnosis, tmp_path):
    source = (TEMPLATES / "classifier.py").read_text()
    for old, new in PLANTS[diagnosis]:
        assert old in source, f"plant for {diagnosis} no longer matches the template"
        source = source.replace(old, new, 1)
    planted = tmp_path / "planted.py"
    planted.write_text(source.replace('Path(__file__).resolve().parent.parent / "assets"', f'Path({str(REPO)!r}) / "assets"'))
    args = ["--config", tmp_path / "spawn.yaml"] if diagnosis in ("main_guard", "unpicklable") else ["--cpu"]
    (tmp_path / "spawn.yaml").write_text(SPAWN)
    result = script("smoke_test.py", planted, *args, "--timeout", "240", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["diagnosis"] == diagnosis, report
    assert report["fix"] and report["error_line"]


def test_check_env_fix_installs_into_the_checked_interpreter(tmp_path):
    import venv

    venv.create(tmp_path / "bare", with_pip=False)  # an interpreter without the packages
    bare = tmp_path / "bare" / ("Scripts" if os.name == "nt" else "bin") / "python"
    result = script("check_env.py", "--python", bare, "--format", "json", cwd=tmp_path)
    assert result.returncode == 1 and json.loads(result.stdout)["fix"].startswith(f"{bare} -m pip install ")


def test_smoke_test_bad_usage(tmp_path):
    result = script("smoke_test.py", tmp_path / "missing.py", cwd=tmp_path)
    assert result.returncode == 2 and "no such script" in result.stderr


# ---- launch ------------------------------------------------------------------------------------------------------
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
    local = script("launch.py", CONFIGS / "cpu.yaml", "--target", "local", "--script", "classifier.py",
                   cwd=tmp_path)
    assert local.stdout.startswith(f"cd {TEMPLATES} && ")  # --script found in the folder above the config's
    assert local.stdout.rstrip().endswith(" classifier.py fit --config configs/cpu.yaml")
    # one machine: torchrun needs no rendezvous address; a CPU config asks SLURM for no GPUs
    standalone = script("launch.py", CONFIGS / "cpu.yaml", "--target", "torchrun", "--script", "classifier.py",
                        cwd=tmp_path)
    assert standalone.stdout.startswith(f"cd {TEMPLATES} && torchrun --standalone --nproc-per-node 1 classifier.py")
    cpu_job = script("launch.py", CONFIGS / "cpu.yaml", "--target", "slurm", "--script", "classifier.py", cwd=tmp_path)
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


# ---- summarize_run flags -----------------------------------------------------------------------------------------
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


def test_summarize_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    result = script("summarize_run.py", tmp_path / "empty", cwd=tmp_path)
    assert result.returncode == 2 and "no metrics.csv or TensorBoard event files" in result.stderr
    (tmp_path / "failed" / "version_0").mkdir(parents=True)  # a run that failed before logging: a header only
    (tmp_path / "failed" / "version_0" / "metrics.csv").write_text("epoch,step,train_loss\n")
    result = script("summarize_run.py", tmp_path / "failed", cwd=tmp_path)
    assert_one_error_line(result, "holds metrics yet")


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
