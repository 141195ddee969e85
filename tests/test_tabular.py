"""templates/tabular.py on CPU: the README's main job (the kept model, its test and predict commands, raw-row
inference), resuming, DDP, configs and bad options; the task read from the target column, regression in the
target's units, categories, missing values and dropped columns, imbalance, the baseline beside every result, K-fold
runs (fit, resume, test, predict), summarize_run's baseline flag, and bad tables.

Tables are the embedded digits or made here with a known signal, so the reachable score is known.
"""

import csv
import gzip
import json
import math
import random
import re
import shlex
import sys
import time

import pytest
import torch
import yaml

from conftest import (CONFIGS, CSV_LOGS, QUIET, TEMPLATES, assert_ddp_ranks_agree, assert_bad_input_changes_nothing,
                      assert_ok, kept_line, load_ckpt, load_module, logged_rows, refused_in_process, run, run_exported,
                      run_script, run_template)

NOISE = 0.5  # standard deviation of the noise in the made regression table
EFFECT = {"red": 1.5, "green": -1.0, "blue": 0.0}


def regression_table(path, rows=600, seed=1, missing=0.1):
    """price = 100 + 3*x1 - 2*x2 + 0.5*x3 + colour effect + N(0, NOISE^2); x3 is missing in `missing` of the rows;
    an ID and a constant column that should be dropped. Returns the R^2 the noise allows."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["house_id", "x1", "x2", "x3", "colour", "const", "price"])
        for i in range(rows):
            x1, x2, x3 = rng.gauss(0, 1), rng.gauss(0, 1), rng.gauss(0, 1)
            colour = rng.choice(list(EFFECT))
            y = 100 + 3 * x1 - 2 * x2 + 0.5 * x3 + EFFECT[colour] + rng.gauss(0, NOISE)
            writer.writerow([f"H{i:05d}", f"{x1:.4f}", f"{x2:.4f}", "" if rng.random() < missing else f"{x3:.4f}",
                             colour, "1", f"{y:.4f}"])
    signal = 9 + 4 + 0.25 + sum((v - sum(EFFECT.values()) / 3) ** 2 for v in EFFECT.values()) / 3
    return signal / (signal + NOISE ** 2)


def metric(stdout: str, name: str) -> float:
    """A metric from Lightning's test table or fit's lines."""
    return float(re.search(rf"{name}\D+?([-0-9.]+)", stdout).group(1))


# ---- the task ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, override, task", [
    (["yes", "no"] * 20, None, "classification"),  # text
    (["true", "false"] * 20, None, "classification"),
    ([str(i % 10) for i in range(1797)], None, "classification"),  # the digits: 10 whole numbers
    ([str(i % 3 + 1) for i in range(60)], None, "classification"),  # 3 classes in a small table
    ([str(25 + i % 214) for i in range(442)], None, "regression"),  # 214 whole numbers in 442 rows (diabetes)
    ([f"{i / 7:.3f}" for i in range(100)], None, "regression"),  # fractions
    ([str(i % 20) for i in range(100)], None, "regression"),  # 20 values in 100 rows: more than 10 and 5%
    ([str(i % 3) for i in range(60)], "regression", "regression"),  # --model.task decides
])
def test_the_task_follows_the_target_column(values, override, task):
    tabular = load_module(TEMPLATES / "tabular.py", "tabular_task")
    chosen, why = tabular.decide_task(values, "y", override)
    assert chosen == task
    assert "'y'" in why or why == f"--model.task {override}"


def test_a_continuous_target_is_regression_in_its_own_units(tmp_path):
    """The failure this template exists for: a continuous target made hundreds of classes. Here it is regression;
    test reaches the R^2 the noise allows; predictions and the checkpoint alone give prices, not z-scores."""
    ceiling = regression_table(tmp_path / "houses.csv")
    options = ["--data.data_path", "houses.csv", "--data.label_column", "price", *QUIET]
    fit = run_template("tabular.py", "fit", *options, cwd=tmp_path)
    assert_ok(fit)
    assert "task: regression ('price' holds" in fit.stdout
    assert "'house_id' (a different value in every row: an ID)" in fit.stderr
    assert "'const' (one value in every row)" in fit.stderr
    assert re.search(r"least squares: val_mae=[0-9.]+, val_rmse=[0-9.]+, val_r2=0\.9", fit.stdout)
    test = run_template("tabular.py", "test", *options, "--ckpt_path", "best", cwd=tmp_path)
    assert_ok(test)
    assert metric(test.stdout, "test_r2") > ceiling - 0.03, (ceiling, test.stdout)
    assert metric(test.stdout, "test_rmse") < 2 * NOISE

    new = tmp_path / "new.csv"
    new.write_text("colour,x2,x1,x3\npurple,0,1,\nred,-1,0,0.5\n")  # columns reordered, an unseen colour, a gap
    predicted = run_template("tabular.py", "predict", *options, "--ckpt_path", "best", "--data.predict_path", new,
                             cwd=tmp_path)
    assert_ok(predicted)
    assert "1 categorical value(s) not in the model's vocabulary" in predicted.stdout + predicted.stderr
    with open(tmp_path / "runs" / "tabular" / "predictions" / "best.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["line"] for r in rows] == ["2", "3"]
    assert abs(float(rows[1]["prediction"]) - (100 + 2 + 0.25 + 1.5)) < 1.0  # in dollars, not z-scores

    tabular = load_module(TEMPLATES / "tabular.py", "tabular_units")
    model = tabular.TabularModel.load_from_checkpoint(tmp_path / "runs" / "tabular" / "checkpoints" / "best.ckpt",
                                                      weights_only=True).eval()
    with torch.no_grad():
        alone = model.in_target_units(model(*model.encode_rows([{"x1": "0", "x2": "-1", "x3": "0.5",
                                                                  "colour": "red"}])))
    assert float(alone) == pytest.approx(float(rows[1]["prediction"]), abs=1e-3)


# ---- the README's main job and the run machinery, through tabular.py --------------------------------------------
@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The README's main job, exactly as written, in a fresh folder."""
    cwd = tmp_path_factory.mktemp("main_job")
    start = time.perf_counter()
    result = run_template("tabular.py", "fit", cwd=cwd)
    elapsed = time.perf_counter() - start
    assert_ok(result)
    print(f"main job: {elapsed:.1f} s wall time")
    return cwd, result, elapsed


def test_the_main_job_classifies_the_digits_with_the_baselines_beside(main_job):
    cwd, fit, elapsed = main_job
    assert "task: classification ('label' holds 10 distinct whole numbers in 1797 rows" in fit.stdout
    kept = kept_line(fit.stdout)
    print(f"best val_acc={kept['val_acc']:.4f} in {elapsed:.1f} s")
    assert kept["val_acc"] >= 0.95 and kept["val_f1"] >= 0.95 and kept["val_auroc"] >= 0.99
    assert "majority class: val_acc=0.1" in fit.stdout and "logistic regression: val_acc=0.9" in fit.stdout
    checkpoints = cwd / "runs" / "tabular" / "checkpoints"
    assert (checkpoints / "best.ckpt").is_file() and (checkpoints / "last.ckpt").is_file()
    assert list((cwd / "runs" / "tabular" / "lightning_logs").glob("version_0/events.out.tfevents.*"))


def test_the_next_command_tests_the_kept_model_and_predict_writes_what_test_scored(main_job):
    cwd, fit, _ = main_job
    best = cwd / "runs" / "tabular" / "checkpoints" / "best.ckpt"
    # what fit tells you to run: evaluate, predict, resume (shell lines, with a comment each)
    lines = [shlex.split(line, comments=True) for line in re.findall(r"^next: (.+)$", fit.stdout, re.MULTILINE)]
    assert [line[2] for line in lines] == ["test", "predict", "export", "fit"]
    assert lines[2][-4:] == ["--out", "exported_model", "--ckpt_path", str(best)] and lines[3][-1] == "last"
    command = lines[0]
    assert command[0] in ("python", sys.executable)  # python only where it is this interpreter
    assert command[2] == "test" and command[-2:] == ["--ckpt_path", str(best)]
    tested = run([sys.executable, *command[1:], *QUIET], cwd=cwd)
    assert_ok(tested)
    test_acc = float(re.search(r"(?<!\w)test_acc\W+([0-9.]+)", tested.stdout).group(1))  # not baseline_test_acc
    assert test_acc >= 0.93 and "per-class test accuracy: 0 " in tested.stdout
    assert "baselines on the same test rows" in tested.stdout

    predicted = run([sys.executable, *lines[1][1:], *QUIET], cwd=cwd)  # the printed predict line: that file
    assert_ok(predicted)
    out = cwd / "runs" / "tabular" / "predictions" / "best.csv"  # one path per checkpoint, however many runs
    assert f"predictions written to {out}" in predicted.stdout
    rows = list(csv.DictReader(open(out)))
    assert abs(sum(r["prediction"] == r["label"] for r in rows) / len(rows) - test_acc) < 1e-3
    with gzip.open(TEMPLATES.parent / "assets" / "digits.csv.gz", "rt") as f:
        labels = [r["label"] for r in csv.DictReader(f)]
    assert all(r["label"] == labels[int(r["line"]) - 2] for r in rows)  # each row names its line in the file

    # test and predict wrote log folders of their own after the training's: the summary still reads the training
    report = json.loads(run_script("summarize_run.py", "runs/tabular", "--format", "json", cwd=cwd).stdout)
    assert "version_0" in report["source"] and "val_acc" in report["metrics"] and report["epochs"] > 1


@pytest.mark.slow
def test_predict_on_two_processes_writes_one_file_in_dataset_order(main_job):
    """Each process writes its share; rank 0 joins them: the same file as one process writes, no part left."""
    cwd = main_job[0]
    out, options = cwd / "runs" / "tabular" / "predictions" / "best.csv", ["predict", "--ckpt_path", "best", *QUIET]
    assert_ok(run_template("tabular.py", *options, cwd=cwd))
    alone = out.read_text()
    two = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    assert_ok(run_template("tabular.py", *options, *two, cwd=cwd))
    assert out.read_text() == alone and sorted(p.name for p in out.parent.iterdir()) == ["best.csv"]


def test_the_best_checkpoint_alone_predicts_on_raw_rows(main_job):
    """Plain-Python inference, no DataModule: the checkpoint encodes raw rows itself and names its classes."""
    cwd, _, _ = main_job
    module = load_module(TEMPLATES / "tabular.py", "tabular_inference")
    model = module.TabularModel.load_from_checkpoint(cwd / "runs" / "tabular" / "checkpoints" / "best.ckpt",
                                                     map_location="cpu", weights_only=True).eval()
    with gzip.open(TEMPLATES.parent / "assets" / "digits.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))
    with torch.no_grad():
        predicted = model(*model.encode_rows(rows)).argmax(-1).tolist()
    classes = model.hparams.target["classes"]
    accuracy = sum(classes[i] == r["label"] for i, r in zip(predicted, rows)) / len(rows)
    assert accuracy >= 0.95, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_export_is_a_program_that_gives_the_checkpoints_outputs_with_torch_alone(task, tmp_path):
    """`export` writes model.pt2 (torch.export: imputation, standardization, category codes inside) and about.json;
    run by a process that imports torch alone, it gives the checkpoint's probabilities (or values in the target's
    units) on raw rows, missing cells and unseen categories included."""
    data = []
    if task == "regression":
        regression_table(tmp_path / "table.csv", rows=300)
        data = ["--data.data_path", "table.csv", "--data.label_column", "price"]
    assert_ok(run_template("tabular.py", "fit", *data, "--trainer.max_epochs", "2", *QUIET, cwd=tmp_path))
    assert_ok(run_template("tabular.py", "export", "--out", "exported", cwd=tmp_path))
    with (open(tmp_path / "table.csv") if data else gzip.open(TEMPLATES.parent / "assets" / "digits.csv.gz", "rt")) as f:
        rows = list(csv.DictReader(f))[:50]
    rows[0] = {k: "" for k in rows[0]}  # every cell missing
    if data:
        rows[1]["colour"] = "ultraviolet"  # a category never seen in training
    model = load_module(TEMPLATES / "tabular.py", f"tabular_export_{task}").TabularModel.load_from_checkpoint(
        tmp_path / "runs" / "tabular" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True).eval()
    numeric, codes = model.encode_rows(rows)
    about = json.loads((tmp_path / "exported" / "about.json").read_text())["inputs"]
    assert about["numeric"] == model.hparams.features["numeric"] and all(  # the codes are the lists' indices
        codes[2, j] == values.index(rows[2][name]) for j, (name, values) in enumerate(about["codes"].items()))
    with torch.no_grad():
        expected = model.in_table_terms(numeric, codes)
    outputs, imported_lightning = run_exported(tmp_path / "exported", numeric, codes)
    assert torch.allclose(outputs, expected, atol=1e-5) and not imported_lightning


@pytest.mark.slow
def test_a_resumed_run_with_a_longer_budget_continues_at_the_next_epoch_on_the_longer_schedule(tmp_path):
    first = run_template("tabular.py", "fit", "--trainer.max_epochs", "2", *QUIET, cwd=tmp_path)
    assert_ok(first)
    last = tmp_path / "runs" / "tabular" / "checkpoints" / "last.ckpt"
    steps_per_epoch = load_ckpt(last)["global_step"] // 2
    second = run_template("tabular.py", "fit", "--trainer.max_epochs", "4", "--ckpt_path", "last",
                          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                          "--trainer.logger.save_dir", tmp_path / "csv", *QUIET, cwd=tmp_path)
    assert_ok(second)
    assert f"Restored all states from the checkpoint at {last}" in second.stdout + second.stderr
    ckpt = load_ckpt(last)
    assert (ckpt["epoch"], ckpt["global_step"]) == (3, 4 * steps_per_epoch)
    metrics = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    assert {int(r["epoch"]) for r in metrics if r.get("val_acc")} == {2, 3}
    # the cosine stretches to the new max_epochs: epochs 2 and 3 of 4, not the old schedule's end (0)
    lr = ckpt["hyper_parameters"]["lr"]
    key = next(k for k in metrics[0] if k.startswith("lr-AdamW"))
    logged = [float(r[key]) for r in metrics if r.get(key)]
    assert logged == pytest.approx([lr * (1 + math.cos(math.pi * e / 4)) / 2 for e in (2, 3)], rel=1e-5), logged
    # the summary joins the resumed run's log (CSV) to the first run's (TensorBoard), which holds epochs 0 and 1
    report = json.loads(run_script("summarize_run.py", tmp_path, "--format", "json", cwd=tmp_path).stdout)
    assert report["resumed_from"] == [str(tmp_path / "runs" / "tabular" / "lightning_logs" / "version_0")]
    assert report["epochs"] == 4 and report["metrics"]["val_acc"]["points"] == 4, report


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_agree_on_every_epoch_value(tmp_path):
    """Each process sees half of the training rows; epoch-level values are reduced over both processes, so every
    rank logs and ranks checkpoints by the same numbers, with no sync_dist warning."""
    metrics = assert_ddp_ranks_agree("tabular.py", ["--trainer.max_epochs", "1"], tmp_path)
    assert {"train_loss_epoch", "val_loss", "val_acc", "val_f1"} <= set(metrics)


def test_the_kept_checkpoint_is_the_lowest_validation_loss_not_an_early_tie(small_digits, tmp_path):
    """60 validation rows: accuracy ties from the first epochs on, and ModelCheckpoint keeps the older file on a tie.
    Ranked by validation loss, the kept model is the one with the lowest loss; fit names its epoch, step and
    accuracy."""
    result = run_template("tabular.py", "fit", "--data.data_path", small_digits, "--trainer.max_epochs", "15",
                          *CSV_LOGS, *QUIET, cwd=tmp_path)
    assert_ok(result)
    rows = [r for r in logged_rows(tmp_path / "logs") if r.get("val_loss")]
    best_row = min(rows, key=lambda r: float(r["val_loss"]))
    kept = load_ckpt(tmp_path / "runs" / "tabular" / "checkpoints" / "best.ckpt")
    assert (kept["epoch"], kept["global_step"]) == (int(best_row["epoch"]), int(best_row["step"]) + 1)
    line = kept_line(result.stdout)
    assert (line["epoch"], line["step"]) == (kept["epoch"], kept["global_step"])
    assert line["val_acc"] == pytest.approx(float(best_row["val_acc"]), abs=1e-4)


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_each_config_parses(config, template_main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        template_main("tabular.py")(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in yaml.safe_load((CONFIGS / config).read_text())["trainer"].items():
        if isinstance(value, dict):  # class_path + init_args: the printed form adds every default
            assert printed["trainer"][key]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= printed["trainer"][key]["init_args"].items()
        else:
            assert printed["trainer"][key] == value


def test_print_config_round_trips(tmp_path):
    printed = run_template("tabular.py", "fit", "--print_config", cwd=tmp_path)
    assert_ok(printed)
    config = yaml.safe_load(printed.stdout)
    assert config["best_checkpoint"]["monitor"] == "val_loss" and config["last_checkpoint"]["save_last"] is True
    (tmp_path / "config.yaml").write_text(printed.stdout)
    assert_ok(run_template("tabular.py", "fit", "--config", "config.yaml", "--trainer.fast_dev_run", "true", *QUIET,
                           cwd=tmp_path))
    assert not (tmp_path / "runs" / "tabular" / "checkpoints" / "last.ckpt").exists()  # fast_dev_run saves nothing


@pytest.mark.parametrize("args, expected", [
    (["--trainer.max_epoch", "3"], "did you mean: trainer.max_epochs"),
    (["--data.batchsize", "8"], "did you mean: data.batch_size"),
    (["--model.lr", "fast"], 'Parser key "model.lr"'),
    (["--trainer.precision", "fp16"], 'Parser key "trainer.precision"'),
    (["--data.data_path", "no_such_file.csv"], "data not found: no_such_file.csv"),
    (["--data.batch_size", "0"], "data.batch_size is 0: it must be at least 1"),
    (["--model.dropout", "1.5"], "model.dropout is 1.5: it must be at most 1"),
    (["--lr_scheduler", "StepLR"], "unrecognized arguments: --lr_scheduler"),  # the model's own schedule decides
    (["--trainer.callbacks+=LearningRateFinder"], "would not reach this template's learning-rate schedule"),
    (["test", "--ckpt_path", "best"], "checkpoint not found: runs/tabular/checkpoints/best.ckpt"),
])
def test_bad_options_are_one_line_and_write_nothing(args, expected, template_main, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = template_main("tabular.py")
    assert expected in refused_in_process(main, args if args[0] == "test" else ["fit", *args], capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.gpu
def test_gpu_training(tmp_path):
    """bf16-mixed on the GPU with the template's own optimizer: the shipped defaults train there."""
    result = run_template("tabular.py", "fit", "--config", CONFIGS / "gpu.yaml", "--trainer.max_epochs", "5",
                          *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert kept_line(result.stdout)["val_acc"] >= 0.9


def imbalanced_table(path):
    """1,000 rows, one in ten "fraud"."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "plan", "outcome"])
        for i in range(1000):
            rare = i % 10 == 0
            writer.writerow([f"{rng.gauss(2 if rare else 0, 1):.3f}", rng.choice(["a", "b"]), "fraud" if rare else "ok"])


def test_balanced_class_weights_weigh_the_rare_class_nine_times(tmp_path):
    imbalanced_table(tmp_path / "rare.csv")
    tabular = load_module(TEMPLATES / "tabular.py", "tabular_weights")
    cli = tabular.main(["--data.data_path", str(tmp_path / "rare.csv"), "--data.label_column", "outcome",
                        "--model.class_weights", "balanced"], run=False)
    fraud, ok = cli.model.class_weights.tolist()  # classes in order: ["fraud", "ok"]
    assert fraud / ok == pytest.approx(9, rel=0.05) and (fraud + 9 * ok) / 10 == pytest.approx(1, rel=0.05)
    plain = tabular.main(["--data.data_path", str(tmp_path / "rare.csv"), "--data.label_column", "outcome"], run=False)
    assert plain.model.class_weights.tolist() == [1.0, 1.0]


def test_the_balanced_sampler_draws_the_classes_about_equally(tmp_path):
    imbalanced_table(tmp_path / "rare.csv")
    tabular = load_module(TEMPLATES / "tabular.py", "tabular_sampler")
    data = tabular.TableData(data_path=str(tmp_path / "rare.csv"), label_column="outcome", balanced_sampler=True)
    data.setup("fit")
    drawn = torch.cat([batch[2] for batch in data.train_dataloader()])
    assert len(drawn) == len(data.rows_of["train"]) and 0.4 < drawn.float().mean() < 0.6  # not 0.9 "ok"


def test_small_tables_get_every_split_and_a_blank_test_target_is_left_out(tmp_path):
    """30 rows: validation and test rows exist in the stated shares, so fit keeps a model and test scores it; a
    test table's rows without a target are left out with a warning, not scored as NaN."""
    rows = "".join(f"{i % 7},{'abc'[i % 3]},{2 * (i % 7) + (i % 3):.1f}\n" for i in range(30))
    (tmp_path / "small.csv").write_text("x,c,y\n" + rows)
    (tmp_path / "held_out.csv").write_text("x,c,y\n1,a,2.0\n2,b,\n3,c,8.0\n")
    options = ["--data.data_path", "small.csv", "--data.label_column", "y", "--trainer.max_epochs", "3", *QUIET]
    assert_ok(run_template("tabular.py", "fit", *options, cwd=tmp_path))
    tested = run_template("tabular.py", "test", *options, "--ckpt_path", "best", "--data.test_path", "held_out.csv",
                          cwd=tmp_path)
    assert_ok(tested)
    assert "1 row(s) have no 'y' value: left out of the test" in tested.stderr
    assert math.isfinite(metric(tested.stdout, "test_mae"))


def test_a_copy_of_the_target_is_dropped_even_with_spaces_after_commas(tmp_path):
    rows = "".join(f"{i * 0.1:.1f}, {'ab'[i % 2]}, {'ab'[i % 2]}\n" for i in range(40))
    (tmp_path / "leak.csv").write_text("x, label, label_copy\n" + rows)
    tabular = load_module(TEMPLATES / "tabular.py", "tabular_leak")
    with pytest.warns(UserWarning, match="'label_copy' \\(a copy of the target\\)"):
        data = tabular.TableData(data_path=str(tmp_path / "leak.csv"), label_column="label")
    assert data.features["categorical"] == [] and data.features["numeric"] == ["x"]


@pytest.mark.parametrize("sep, decimal", [(";", ","), ("\t", ".")])
def test_an_excel_table_with_semicolons_and_decimal_commas_reads_as_numbers(sep, decimal, tmp_path):
    rows = "".join(f"r{i % 3}{sep}{i * 1.5:.1f}{sep}{i * 30.25:.2f}\n".replace(".", decimal) for i in range(40))
    (tmp_path / "excel.csv").write_text(f"région{sep}surface{sep}prix\n" + rows)
    tabular = load_module(TEMPLATES / "tabular.py", "tabular_excel")
    data = tabular.TableData(data_path=str(tmp_path / "excel.csv"), label_column="prix")
    assert data.task == "regression" and data.features["numeric"] == ["surface"]
    assert data.features["categorical"] == ["région"]


# ---- folds ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_folds_train_resume_test_and_predict_as_one_model(tmp_path):
    regression_table(tmp_path / "houses.csv", rows=300)
    options = ["--data.data_path", "houses.csv", "--data.label_column", "price", "--data.folds", "3", *QUIET]
    fit = run_template("tabular.py", "fit", *options, "--trainer.max_epochs", "2", cwd=tmp_path)
    assert_ok(fit)
    root = tmp_path / "runs" / "tabular"
    assert all((root / f"fold_{k}" / "checkpoints" / "best.ckpt").is_file() for k in range(3))
    assert re.search(r"val_r2: [-0-9.]+ \+/- [0-9.]+  \(([-0-9.]+, ){2}[-0-9.]+\)", fit.stdout)
    assert fit.stdout.count("next:") == 3 and "test" in fit.stdout.split("next:")[1]  # once for all the folds

    resumed = run_template("tabular.py", "fit", *options, "--trainer.max_epochs", "3", "--ckpt_path", "last",
                           cwd=tmp_path)
    assert_ok(resumed)
    assert resumed.stdout.count("Restored all states from the checkpoint") + resumed.stderr.count(
        "Restored all states from the checkpoint") == 3  # each fold from its own last.ckpt
    assert all(load_ckpt(root / f"fold_{k}" / "checkpoints" / "last.ckpt")["epoch"] == 2 for k in range(3))

    test = run_template("tabular.py", "test", *options, "--ckpt_path", "best", cwd=tmp_path)
    assert_ok(test)
    assert "---- 3 folds (test) ----" in test.stdout and re.search(r"test_r2: [-0-9.]+ \+/- ", test.stdout)

    predicted = run_template("tabular.py", "predict", *options, "--ckpt_path", "best", cwd=tmp_path)
    assert_ok(predicted)
    with open(root / "predictions" / "folds-best.csv") as f:
        rows = list(csv.DictReader(f))
    tabular = load_module(TEMPLATES / "tabular.py", "tabular_folds")
    data = tabular.TableData(data_path=str(tmp_path / "houses.csv"), label_column="price", folds=3)
    numeric, codes = data.numeric[data.rows_of["test"]], data.codes[data.rows_of["test"]]
    models = [tabular.TabularModel.load_from_checkpoint(root / f"fold_{k}" / "checkpoints" / "best.ckpt",
                                                        weights_only=True).eval() for k in range(3)]
    with torch.no_grad():
        mean = torch.stack([m.in_target_units(m(numeric, codes)) for m in models]).mean(0)
    assert len(rows) == len(mean) and [float(r["prediction"]) for r in rows] == pytest.approx(mean.tolist(),
                                                                                               abs=1e-3)


def test_a_study_with_folds_scores_each_trial_on_one_split(tmp_path):
    """hpo_optuna.py on a folds config: a trial is one run with fold 0 validating (not K runs), and the exported
    config keeps the folds for the final training."""
    import yaml

    regression_table(tmp_path / "houses.csv", rows=200)
    result = run([sys.executable, TEMPLATES.parent / "scripts" / "hpo_optuna.py", "--script", TEMPLATES / "tabular.py",
                  "--n-trials", "1", "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--output",
                  tmp_path / "best.yaml", "--set", "--data.data_path", "houses.csv", "--data.label_column", "price",
                  "--data.folds", "3", "--trainer.max_epochs", "1", *QUIET], cwd=tmp_path)
    assert_ok(result)
    assert "---- fold" not in result.stdout and not list(tmp_path.rglob("fold_*"))
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["data"]["folds"] == 3


def test_a_network_worse_than_its_baseline_is_flagged(tmp_path):
    """One epoch on a linear table: least squares wins, and summarize_run says so."""
    regression_table(tmp_path / "houses.csv", rows=300)
    fit = run_template("tabular.py", "fit", "--data.data_path", "houses.csv", "--data.label_column", "price",
                       "--trainer.max_epochs", "1", *QUIET, cwd=tmp_path)
    assert_ok(fit)
    summary = run_script("summarize_run.py", tmp_path / "runs" / "tabular", cwd=tmp_path)
    assert_ok(summary)
    assert "below_baseline" in summary.stdout and "val_r2" in summary.stdout


# ---- bad tables ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("table, args, expected", [
    ("x,y\n1,a\n2,a\n3,a\n", [], "'y' holds one class ('a')"),
    ("x,y\n1,2.5\n2,inf\n3,4.5\n", ["--model.task", "regression"], "'y' value 'inf' (line 3) is not a finite number"),
    ("x,y\n1,2\n2\n", [], "line 3 has 1 cells, the header 2"),
    ("x,z\n1,2\n", [], "has no column 'y'"),
    ("x,y,y\n1,0,0\n2,1,1\n", [], "column name(s) 'y' appear more than once"),
    ("x,y\n" + "".join(f"{i % 5},{i % 2}\n" for i in range(40)), ["--data.val_fraction", "0"],
     "leave no validation rows"),
    ("y,id\n1,a\n2,b\n" + "".join(f"{i % 2},{i}\n" for i in range(30)), [], "no usable feature columns besides 'y'"),
])
def test_a_bad_table_is_one_line_and_changes_no_file(table, args, expected, tmp_path):
    (tmp_path / "table.csv").write_text(table)
    assert_bad_input_changes_nothing(TEMPLATES / "tabular.py", ["fit", "--data.data_path", "table.csv",
                                                                "--data.label_column", "y", *args], expected,
                                     tmp_path)


def test_folds_under_several_processes_are_refused(tmp_path):
    result = run_template("tabular.py", "fit", "--data.folds", "3", "--trainer.devices", "2",
                          "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", cwd=tmp_path)
    assert result.returncode == 2 and "folds trains its models one after another" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_help_names_the_options_a_table_needs(tmp_path):
    result = run([sys.executable, TEMPLATES / "tabular.py", "fit", "--help"], cwd=tmp_path)
    assert_ok(result)
    for option in ("--data.label_column", "--model.task", "--data.folds", "--model.class_weights",
                   "--data.balanced_sampler", "--model.loss"):
        assert option in result.stdout

