"""scripts/summarize_run.py: flags on known curves, the training log among later ones, a resumed run joined to the log
it continues, the plot, bad input."""

import csv
import importlib.util
import json
import os

import pytest

from conftest import SCRIPTS, assert_bad_input_changes_nothing, assert_ok, assert_one_error_line, run_script


def script(name, *args, cwd, timeout=600):
    return run_script(name, *args, cwd=cwd, timeout=timeout)


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


@pytest.mark.parametrize("args, expected", [(["missing_dir"], "no such folder"), (["empty_run", "--plot", "existing.txt"], "exists")])
def test_bad_input_is_one_line_and_changes_no_file(args, expected, tmp_path):
    assert_bad_input_changes_nothing(SCRIPTS / "summarize_run.py", args, expected, tmp_path)
