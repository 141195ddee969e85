"""scripts/hpo_optuna.py: pruning, crash-safe storage, two workers on one study, exported config, the template of the
folder it runs in, bad input."""

import json
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import (QUIET, SCRIPTS, TEMPLATES, assert_bad_input_changes_nothing, assert_ok, assert_one_error_line,
                      load_module, run, run_script, run_template, save_tiny_backbone)

HPO = SCRIPTS / "hpo_optuna.py"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
GOOD = [{"model.lr": lr, "model.dropout": 0.1, "data.batch_size": 64} for lr in (0.003, 0.005)]
BAD = [{"model.lr": lr, "model.dropout": 0.1, "data.batch_size": 64} for lr in (1e-6, 2e-6)]  # barely learn


def hpo_cmd(tmp_path, *args, epochs=4, name="hpo"):
    script = [] if "--script" in args else ["--script", TEMPLATES / "tabular.py"]
    return [sys.executable, HPO, *script, "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--study-name", name,
            "--runs", tmp_path / "runs", *args, "--set", "--trainer.max_epochs", str(epochs), *QUIET]


def load(tmp_path, name="hpo"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.db'}")


@pytest.mark.slow
def test_study_prunes_a_bad_region_and_exports_a_config_that_trains(tmp_path):
    diverging = {"model.lr": 1e30, "model.dropout": 0.1, "data.batch_size": 64}  # NaN loss: fails, the study goes on
    enqueue = [a for p in GOOD + [diverging] + BAD for a in ("--enqueue", json.dumps(p))]
    start = time.perf_counter()
    result = run(hpo_cmd(tmp_path, "--n-trials", "4", "--output", tmp_path / "best.yaml", *enqueue), cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert_ok(result)
    print(f"4-trial study: {elapsed:.0f} s")
    trials = load(tmp_path).trials
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE] * 2
    assert any(t.state == TrialState.PRUNED and t.params["model.lr"] < 1e-5 for t in trials)
    assert [t.params["model.lr"] for t in trials if t.state == TrialState.FAIL] == [1e30]
    assert "PRUNED" in result.stdout and "best: trial" in result.stdout
    assert "last-on-exception" not in result.stderr  # pruned trials are not resumed: no checkpoint, no advice

    # the exported config trains as it is, its checkpoints in the new run's own folder
    trained = run_template("tabular.py", "fit", "--config", tmp_path / "best.yaml", "--trainer.max_epochs", "2",
                           "--trainer.default_root_dir", "final", *QUIET, cwd=tmp_path)
    assert_ok(trained)
    assert "best val_loss=" in trained.stdout and (tmp_path / "final" / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
def test_killed_study_resumes_without_losing_finished_trials(tmp_path):
    cmd = [str(c) for c in hpo_cmd(tmp_path, "--n-trials", "4", "--output", tmp_path / "best.yaml", epochs=6)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    finished = []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            finished = load(tmp_path).get_trials(states=FINISHED)
        except Exception:  # the study may not exist yet
            continue
        if len(finished) >= 2:
            proc.kill()  # SIGKILL: no clean-up, like a crashed machine
            break
    proc.wait()
    assert len(finished) >= 2 and proc.returncode != 0, "the study ended before it could be killed"
    before = {t.number: t.value for t in load(tmp_path).get_trials(states=FINISHED)}

    resumed = run(cmd, cwd=tmp_path)
    assert_ok(resumed)
    after = load(tmp_path).get_trials(states=FINISHED)
    assert len(after) >= 4
    assert {t.number: t.value for t in after if t.number in before} == before  # finished trials kept as they were


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    procs = [subprocess.Popen([str(c) for c in hpo_cmd(tmp_path, "--n-trials", "4", "--output",
                                                        tmp_path / f"best{i}.yaml", epochs=3)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    trials = load(tmp_path).trials
    numbers = [t.number for t in trials]
    finished = [t for t in trials if t.state in FINISHED]
    assert len(numbers) == len(set(numbers))
    assert 4 <= len(finished) <= 5  # each worker stops once the study holds 4; one may finish a trial in flight
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.parametrize("args, expected", [  # more cases: tests/test_bad_inputs.py
    (["--space", "space.yaml"], "model.lrr"),
    (["--storage", "sqlite:////no/such/dir/study.db"], "cannot open storage"),
    (["--n-trial", "3"], "unrecognized arguments: --n-trial"),  # no abbreviations: a typo is not --n-trials
    (["--set", "trainer.max_epochs=2"], "--set passes the template's own options"),
    (["--scale-batch-size", "--set", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
     "refuses distributed strategies"),  # Lightning raises ValueError, even for DDP on one device
    (["--scale-batch-size", "--set", "--trainer.callbacks+=BatchSizeFinder"], "drop one of them"),
    (["--script", "missing.py"], "missing.py"), (["--config", "missing.yaml"], "missing.yaml"),
])
def test_bad_input_is_one_line_and_changes_no_file(tmp_path, args, expected):
    (tmp_path / "space.yaml").write_text("model.lrr:\n  type: float\n  low: 0.001\n  high: 0.1\n")
    storage = [] if "--storage" in args else ["--storage", "sqlite:///study.db"]  # neither it nor runs/ is made
    base = ["--script", TEMPLATES / "tabular.py", "--n-trials", "1", "--runs", "runs", *storage]
    assert_bad_input_changes_nothing(HPO, [*base, *args], expected, tmp_path)  # args last: --set takes the rest


def test_study_over_another_template_with_a_yaml_space(tmp_path):
    """transformers_finetune.py (its default tiny model) with a --space file in the documented shape: YAML reads
    1e-4 as a string, which must still be a float bound."""
    (tmp_path / "space.yaml").write_text("model.learning_rate: {type: float, low: 1e-4, high: 3e-3, log: true}\n")
    result = run(hpo_cmd(tmp_path, "--script", TEMPLATES / "transformers_finetune.py", "--space", "space.yaml",
                         "--n-trials", "1", "--output", tmp_path / "best.yaml", epochs=1), cwd=tmp_path)
    assert_ok(result)
    (trial,) = load(tmp_path).trials
    assert trial.state == TrialState.COMPLETE and 1e-4 <= trial.params["model.learning_rate"] <= 3e-3


@pytest.mark.parametrize("script", ["tabular.py", "image_classifier.py", "transformers_finetune.py", "causal_lm.py"])
def test_each_templates_default_space_names_its_own_keys(script, tmp_path, monkeypatch):
    """No --space: the space for that template, whose keys the template accepts (the tabular model.lr was
    refused by the others)."""
    hpo = load_module(HPO, "hpo_spaces")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script])
    module = hpo.load_script(TEMPLATES / script)
    base = ["--trainer.fast_dev_run", "true"]
    if script == "image_classifier.py":  # offline: a local backbone, and images outside this folder's runs/
        shapes = module.make_shapes(tmp_path / "data" / "shapes", ("circle", "square"), per_class=4, size=16)
        base += ["--model.backbone", str(save_tiny_backbone(tmp_path / "backbone")), "--data.data_path", str(shapes)]
    checked = hpo.check_space(module, base, hpo.SEARCH_SPACES[script])
    assert set(checked) == set(hpo.SEARCH_SPACES[script])
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_study_over_a_printed_fit_config(tmp_path):
    """A `fit --print_config` file (it holds ckpt_path, a fit-only key) works as the study's base config."""
    printed = run_template("tabular.py", "fit", "--print_config", cwd=tmp_path)
    assert_ok(printed)
    (tmp_path / "config.yaml").write_text(printed.stdout)
    result = run(hpo_cmd(tmp_path, "--config", tmp_path / "config.yaml", "--n-trials", "1", "--output",
                         tmp_path / "best.yaml", epochs=1), cwd=tmp_path)
    assert_ok(result)
    assert "COMPLETE" in result.stdout and (tmp_path / "best.yaml").is_file()


@pytest.mark.slow
def test_the_template_of_the_folder_it_runs_in(tmp_path):
    """From a folder scaffold.py made, no --script: its template (the file importing lightning_support), whose
    checkpoints and logs go under runs/hpo there; from a folder without one, one line naming --script."""
    assert_ok(run_script("scaffold.py", "tabular", tmp_path / "proj", "--hardware", "none", cwd=tmp_path))
    result = run([sys.executable, HPO, "--config", "config.yaml", "--n-trials", "1", "--storage",
                  f"sqlite:///{tmp_path / 'study.db'}", "--set", "--trainer.max_epochs", "1", *QUIET],
                 cwd=tmp_path / "proj")
    assert_ok(result)
    assert "best: trial 0, val_loss=" in result.stdout and (tmp_path / "proj" / "best_config.yaml").is_file()
    assert (tmp_path / "proj" / "runs" / "hpo" / "hpo" / "trial_0" / "checkpoints" / "best.ckpt").is_file()
    refused = run([sys.executable, HPO, "--n-trials", "1"], cwd=tmp_path)
    assert "pass --script" in assert_one_error_line(refused, "no template in")

