"""templates/classifier.py through its real command line: training, the kept checkpoint, test and predict, resuming,
DDP, configs, its data (tables and image folders) and bad input.

Training runs are subprocesses of the template itself (as a user runs it); parse-only checks call its main().
"""

import csv
import gzip
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (ASSETS, CONFIGS, CSV_LOGS, QUIET, TEMPLATES, assert_ddp_ranks_agree, assert_ok,
                      assert_one_error_line, kept_line, load_ckpt, load_module, logged_rows, refused_in_process, run,
                      run_script, run_template)

TEST_SIZE = int(1797 * 0.15)  # default val/test fractions of the embedded digits (shared out over the classes)
TRAIN_SIZE = 1797 - 2 * TEST_SIZE
STEPS_PER_EPOCH = math.ceil(TRAIN_SIZE / 64)


def best_val_acc(stdout: str) -> float:
    """val_acc of the kept checkpoint, from fit's `best val_loss=... (epoch E, step S; val_acc=A) checkpoint=...`."""
    return kept_line(stdout)["val_acc"]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The README's main job, exactly as written, in a fresh folder."""
    cwd = tmp_path_factory.mktemp("main_job")
    start = time.perf_counter()
    result = run_template("classifier.py", "fit", cwd=cwd)
    elapsed = time.perf_counter() - start
    assert_ok(result)
    print(f"main job: {elapsed:.1f} s wall time")
    return cwd, result, elapsed


def test_fast_dev_run(tmp_path):
    result = run_template("classifier.py", "fit", "--trainer.fast_dev_run", "true", *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert not (tmp_path / "runs" / "classifier" / "checkpoints" / "last.ckpt").exists()  # fast_dev_run saves nothing


def test_main_job_reaches_accuracy_bar(main_job):
    cwd, result, elapsed = main_job
    acc = best_val_acc(result.stdout)
    print(f"best val_acc={acc:.4f} in {elapsed:.1f} s")
    assert acc >= 0.95
    checkpoints = cwd / "runs" / "classifier" / "checkpoints"
    assert (checkpoints / "best.ckpt").is_file() and (checkpoints / "last.ckpt").is_file()
    best = load_ckpt(checkpoints / "best.ckpt")
    assert best["hyper_parameters"]["num_classes"] == 10 and tuple(best["hyper_parameters"]["input_shape"]) == (64,)
    assert list((cwd / "runs" / "classifier" / "lightning_logs").glob("version_0/events.out.tfevents.*"))


def test_test_and_predict_from_best_checkpoint(main_job):
    cwd, result, _ = main_job
    best = cwd / "runs" / "classifier" / "checkpoints" / "best.ckpt"
    next_line = re.search(r"^next: (.+)$", result.stdout, re.MULTILINE).group(1)  # the command fit tells you to run
    command = shlex.split(next_line)
    assert command[0] in ("python", sys.executable)  # python only where it is this interpreter
    assert command[2] == "test" and command[-2:] == ["--ckpt_path", str(best)]
    tested = run([sys.executable, *command[1:], *QUIET], cwd=cwd)
    assert_ok(tested)
    test_acc = float(re.search(r"test_acc\D+([0-9]\.[0-9]+)", tested.stdout).group(1))
    assert test_acc >= 0.93, tested.stdout
    per_class = re.findall(r"^  (\d)  ([01]\.\d{4})  n=(\d+)", tested.stdout, re.MULTILINE)  # the table after test
    assert [c for c, _, _ in per_class] == [str(d) for d in range(10)], tested.stdout
    assert sum(int(n) for _, _, n in per_class) == TEST_SIZE
    assert abs(sum(float(a) * int(n) for _, a, n in per_class) / TEST_SIZE - test_acc) < 1e-3

    predicted = run_template("classifier.py", "predict", "--ckpt_path", "best", *QUIET, cwd=cwd)  # = that file
    assert_ok(predicted)
    out = cwd / "runs" / "classifier" / "predictions" / "best.csv"  # one path per checkpoint, however many runs
    assert f"predictions written to {out}" in predicted.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == TEST_SIZE
    correct = sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    assert abs(correct - test_acc) < 1e-3  # the written predictions are the ones the test metric scored
    with gzip.open(ASSETS / "digits.csv.gz", "rt") as f:
        labels = [r["label"] for r in csv.DictReader(f)]
    assert len({r["row"] for r in rows}) == len(rows)  # each row names its line of the data file (1 = first)
    assert all(r["label"] == labels[int(r["row"]) - 1] for r in rows)

    # test and predict wrote log folders of their own after the training's: the summary still reads the training
    summary = run_script("summarize_run.py", "runs/classifier", "--format", "json", cwd=cwd)
    assert_ok(summary)
    report = json.loads(summary.stdout)
    assert "version_0" in report["source"] and "val_acc" in report["metrics"] and report["epochs"] > 1


def test_the_best_checkpoint_alone_predicts_on_raw_rows(main_job, classifier_module):
    """Plain-Python inference, no DataModule: the model standardizes features itself and names its classes."""
    cwd, _, _ = main_job
    best = cwd / "runs" / "classifier" / "checkpoints" / "best.ckpt"
    model = classifier_module.Classifier.load_from_checkpoint(best, map_location="cpu", weights_only=True).eval()
    with gzip.open(ASSETS / "digits.csv.gz", "rt") as f:
        header, *rows = list(csv.reader(f))
    label = header.index("label")
    raw = torch.tensor([[float(v) for i, v in enumerate(r) if i != label] for r in rows])
    with torch.no_grad():
        names = [model.hparams.class_names[i] for i in model(raw).argmax(-1).tolist()]
    accuracy = sum(n == r[label] for n, r in zip(names, rows)) / len(rows)
    assert model.hparams.class_names == [str(d) for d in range(10)] and accuracy >= 0.95, accuracy


@pytest.mark.slow
def test_resume_with_ckpt_path_last_continues_at_next_epoch(tmp_path):
    first = run_template("classifier.py", "fit", "--trainer.max_epochs", "2", *QUIET, cwd=tmp_path)
    assert_ok(first)
    last = tmp_path / "runs" / "classifier" / "checkpoints" / "last.ckpt"
    assert load_ckpt(last)["global_step"] == 2 * STEPS_PER_EPOCH

    # Relaunch "the same command" with a longer budget and --ckpt_path last; log to CSV to see which epochs ran.
    second = run_template("classifier.py", "fit", "--trainer.max_epochs", "4", "--ckpt_path", "last",
                          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                          "--trainer.logger.save_dir", tmp_path / "csv", *QUIET, cwd=tmp_path)
    assert_ok(second)
    assert f"Restored all states from the checkpoint at {last}" in second.stdout + second.stderr
    # the test command fit prints: the same options, `test` for `fit`, the best checkpoint for --ckpt_path last
    best = (tmp_path / "runs" / "classifier" / "checkpoints" / "best.ckpt").resolve()
    next_command = shlex.split(re.search(r"^next: (.+)$", second.stdout, re.MULTILINE).group(1))
    assert next_command[1:] == [str(TEMPLATES / "classifier.py"), "test", "--trainer.max_epochs", "4",
                                "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                                "--trainer.logger.save_dir", str(tmp_path / "csv"), *QUIET, "--ckpt_path", str(best)]
    ckpt = load_ckpt(last)
    assert (ckpt["epoch"], ckpt["global_step"]) == (3, 4 * STEPS_PER_EPOCH)
    metrics = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    epochs = {int(r["epoch"]) for r in metrics if r.get("val_acc")}
    assert epochs == {2, 3}, f"the resumed run must train epochs 2 and 3 only, logged {sorted(epochs)}"
    # the cosine schedule stretches to the new max_epochs: epochs 2 and 3 of 4, not the old 2-epoch one restarting
    lr = ckpt["hyper_parameters"]["lr"]
    logged = [float(r["lr-AdamW"]) for r in metrics if r.get("lr-AdamW")]
    assert logged == pytest.approx([lr * (1 + math.cos(math.pi * e / 4)) / 2 for e in (2, 3)], rel=1e-5), logged

    # the summary joins the resumed run's log (CSV) to the first run's (TensorBoard), which holds epochs 0 and 1
    summary = run_script("summarize_run.py", tmp_path, "--format", "json", cwd=tmp_path)
    assert_ok(summary)
    report = json.loads(summary.stdout)
    assert report["resumed_from"] == [str(tmp_path / "runs" / "classifier" / "lightning_logs" / "version_0")]
    assert report["epochs"] == 4 and report["metrics"]["val_acc"]["points"] == 4, report


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_agree_on_every_epoch_value(tmp_path):
    """Each process sees half of the training set (half the steps per epoch); epoch-level values are reduced over
    both processes, so every rank logs and ranks checkpoints by the same numbers, with no sync_dist warning."""
    metrics = assert_ddp_ranks_agree("classifier.py", ["--trainer.max_epochs", "1"], tmp_path)
    assert {"train_loss_epoch", "train_acc", "val_loss", "val_acc"} <= set(metrics)
    ckpt = load_ckpt(tmp_path / "runs" / "classifier" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == math.ceil(math.ceil(TRAIN_SIZE / 2) / 64)


def test_print_config_round_trips(tmp_path):
    printed = run_template("classifier.py", "fit", "--print_config", cwd=tmp_path)
    assert_ok(printed)
    config = yaml.safe_load(printed.stdout)
    assert config["best_checkpoint"]["monitor"] == "val_loss" and config["last_checkpoint"]["save_last"] is True
    assert config["early_stopping"]["monitor"] == "val_loss" and config["model"]["lr"] == pytest.approx(3e-3)
    (tmp_path / "config.yaml").write_text(printed.stdout)
    result = run_template("classifier.py", "fit", "--config", "config.yaml", "--trainer.fast_dev_run", "true",
                          *QUIET, cwd=tmp_path)
    assert_ok(result)


def test_own_csv_with_named_label_column(tmp_path):
    # Two well-separated blobs with string labels in a column that is not last.
    gen = torch.Generator().manual_seed(0)
    with open(tmp_path / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "species", "b", "c"])
        for i in range(300):
            label = "cat" if i % 2 else "dog"
            centre = 2.0 if label == "cat" else -2.0
            a, b, c = (centre + torch.randn(3, generator=gen)).tolist()
            writer.writerow([a, label, b, c])
    result = run_template("classifier.py", "fit", "--data.data_path", "table.csv", "--data.label_column", "species",
                          "--trainer.max_epochs", "5", *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert best_val_acc(result.stdout) >= 0.95
    hparams = load_ckpt(tmp_path / "runs" / "classifier" / "checkpoints" / "best.ckpt")["hyper_parameters"]
    assert hparams["num_classes"] == 2 and tuple(hparams["input_shape"]) == (3,)


def test_early_stopping_says_why_it_stopped(tmp_path):
    result = run_template("classifier.py", "fit", "--trainer.max_epochs", "100", "--early_stopping.patience", "1",
                          *QUIET, cwd=tmp_path)
    assert_ok(result)
    epoch = int(re.search(r"stopped early in epoch (\d+): Monitored metric val_loss did not improve in the last 1",
                          result.stdout).group(1))
    assert epoch < 99 and load_ckpt(tmp_path / "runs" / "classifier" / "checkpoints" / "last.ckpt")["epoch"] == epoch


@pytest.mark.slow
def test_own_image_folder(tmp_path):
    """A folder of images by class: a file that is no image is refused before anything is written; predictions on
    new, unlabelled images name their files."""
    from PIL import Image

    for label, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(12):
            shade = tuple(max(0, c - 8 * i) for c in colour)
            Image.new("RGB", (20 + i, 16), shade).save(tmp_path / "images" / label / f"{i}.png")
    fit = ["fit", "--data.data_path", "images", "--data.image_size", "16", "--data.val_fraction", "0.25",
           "--data.test_fraction", "0.25", "--data.batch_size", "4", "--trainer.max_epochs", "3", *QUIET]
    (tmp_path / "images" / "red" / "saved_page.JPG").write_text("<html>not an image</html>")
    refused = run_template("classifier.py", *fit, cwd=tmp_path)
    assert "saved_page.JPG" in assert_one_error_line(refused, "not readable images")
    assert not (tmp_path / "runs").exists()

    (tmp_path / "images" / "red" / "saved_page.JPG").unlink()
    result = run_template("classifier.py", *fit, cwd=tmp_path)
    assert_ok(result)
    hparams = load_ckpt(tmp_path / "runs" / "classifier" / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert hparams["num_classes"] == 2 and tuple(hparams["input_shape"]) == (3, 16, 16)

    (tmp_path / "new").mkdir()
    for name, colour in (("a.png", (200, 30, 30)), ("b.jpg", (30, 30, 200)), ("c.png", (210, 10, 10))):
        Image.new("RGB", (18, 18), colour).save(tmp_path / "new" / name)
    best = tmp_path / "runs" / "classifier" / "checkpoints" / "best.ckpt"
    predicted = run_template("classifier.py", "predict", "--data.data_path", "images", "--data.image_size", "16",
                             "--data.predict_path", "new", "--ckpt_path", best, *QUIET, cwd=tmp_path)
    assert_ok(predicted)
    with open(re.search(r"predictions written to (\S+)", predicted.stdout).group(1)) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == [str(Path("new") / n) for n in ("a.png", "b.jpg", "c.png")]
    assert {r["prediction"] for r in rows} <= {"red", "blue"} and {r["label"] for r in rows} == {""}

    # A separate labelled folder is scored in full; data that differs from the checkpoint's is refused
    for label, colour in (("red", (230, 10, 10)), ("blue", (10, 10, 230))):
        (tmp_path / "held_out" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), colour).save(tmp_path / "held_out" / label / f"{i}.png")
    data = ["--data.data_path", "images", "--data.image_size", "16", "--ckpt_path", best, *QUIET]
    tested = run_template("classifier.py", "test", *data, "--data.test_path", "held_out", cwd=tmp_path)
    assert_ok(tested)
    assert sorted(re.findall(r"^  (\w+) +\S+  n=(\d+)", tested.stdout, re.MULTILINE)) == [("blue", "3"), ("red", "3")]
    refused = run_template("classifier.py", "predict", *data, "--data.image_size", "24", cwd=tmp_path)
    assert "input_shape 3, 16, 16; this data gives 3, 24, 24" in assert_one_error_line(refused, "the checkpoint was")
    (tmp_path / "images" / "green").mkdir()
    Image.new("RGB", (16, 16), (10, 230, 10)).save(tmp_path / "images" / "green" / "0.png")
    refused = run_template("classifier.py", "predict", *data, "--data.predict_path", "new", cwd=tmp_path)
    assert "this data gives blue, green, red" in assert_one_error_line(refused, "class_names blue, red")


# ---- parse-only checks: the template's main() in this process (no training) -----------------------------------
@pytest.fixture(scope="module")
def classifier_module():
    return load_module(TEMPLATES / "classifier.py", "classifier_template")


@pytest.fixture
def classifier_main(template_main):
    return template_main("classifier.py")


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_each_config_parses(config, classifier_main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        classifier_main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load((CONFIGS / config).read_text())["trainer"]
    for key, value in expected.items():
        if isinstance(value, dict):  # class_path + init_args: the printed form adds every default
            assert printed["trainer"][key]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= printed["trainer"][key]["init_args"].items()
        else:
            assert printed["trainer"][key] == value


@pytest.mark.parametrize("args, expected", [
    (["--trainer.max_epoch", "3"], "did you mean: trainer.max_epochs"),
    (["--data.batchsize", "8"], "did you mean: data.batch_size"),
    (["--model.lr", "fast"], 'Parser key "model.lr"'),
    (["--trainer.precision", "fp16"], 'Parser key "trainer.precision"'),
    (["--data.data_path", "no_such_file.csv"], "data not found: no_such_file.csv"),
    (["--data.val_fraction", "0.9"], "val_fraction and test_fraction"),
    (["--data.batch_size", "0"], "batch_size (0) and image_size (32) must be at least 1"),
    (["--model.dropout", "1.5"], "dropout (1.5) must be in [0, 1)"),
    (["--lr_scheduler", "StepLR"], "unrecognized arguments: --lr_scheduler"),  # the model's own schedule decides
    (["--trainer.callbacks+=LearningRateFinder"], "would not reach this template's learning-rate schedule"),
    (["test", "--ckpt_path", "best"], "checkpoint not found: runs/classifier/checkpoints/best.ckpt"),
])
def test_bad_input_gives_one_line_and_exit_2(args, expected, classifier_main, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expected in refused_in_process(classifier_main, args if args[0] == "test" else ["fit", *args], capsys)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_data_loader_workers_follow_the_data(classifier_module, tmp_path):
    """num_workers null (the default): no worker processes for a CSV held in memory; for an image folder, workers
    that decode while the model trains (Lightning's suggestion for this machine, at most 8); a set value is kept."""
    from PIL import Image
    from lightning.fabric.utilities.data import suggested_max_num_workers

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(4):
            Image.new("RGB", (10, 12), (40 * i, 90, 30)).save(tmp_path / label / f"{i}.png")
    Data = classifier_module.ClassificationData
    digits, images = Data(), Data(str(tmp_path), image_size=8, val_fraction=0.25, test_fraction=0.25, batch_size=4)
    pinned = Data(str(tmp_path), image_size=8, val_fraction=0.25, test_fraction=0.25, num_workers=0)
    for data in (digits, images, pinned):
        data.setup("fit")
    assert digits.train_dataloader().num_workers == 0 and pinned.train_dataloader().num_workers == 0
    loader = images.train_dataloader()
    assert loader.num_workers == min(8, suggested_max_num_workers(1)) >= 1 and loader.persistent_workers
    x, y = next(iter(loader))  # decoded in a worker process
    assert x.shape == (4, 3, 8, 8) and y.shape == (4,)


def test_split_holds_out_its_fractions_and_keeps_csv_rows_in_place(classifier_module):
    """int(n * fraction) held out even when every class is small (rounding each class gave none); a CSV row's split
    follows its content, so deleting a row moves only rows near a class's boundary (a permutation moved half)."""
    split, keys = classifier_module.split_by_class, classifier_module.row_keys
    small = [c for c in range(20) for _ in range(3)]
    assert {k: len(v) for k, v in split([str(i) for i in range(60)], small, 0.15, 0.15, 1).items()} == {
        "val": 9, "test": 9, "train": 42}
    features, targets = torch.randn(1000, 5, generator=torch.Generator().manual_seed(0)), torch.arange(1000) % 3

    def where(f, t):
        k = keys(f, t)
        return {k[i]: name for name, idx in split(k, t.tolist(), 0.15, 0.15, 1).items() for i in idx.tolist()}

    before, after = where(features, targets), where(features[1:], targets[1:])
    assert sum(before[k] != v for k, v in after.items()) <= 6


def test_image_folder_classes_split_and_refusals(classifier_module, tmp_path):
    """An image's class is its top-level folder (nested folders included); hidden files are skipped; the split is
    stratified and stable: one added file pushes at most one other across each boundary; an empty class folder is
    refused by name; a class too small for the validation split is named in a warning."""
    from PIL import Image

    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (len(path.name) * 20 % 255, 50, 90)).save(path)

    for label, n in (("cat", 20), ("dog", 40)):
        for i in range(n):
            image(tmp_path / label / f"{i}.png")
    image(tmp_path / "cat" / "indoor" / "x.png")  # a nested folder: still a cat
    (tmp_path / "cat" / "._0.png").write_bytes(b"\0\5\22")  # macOS metadata, not an image
    image(tmp_path / ".ipynb_checkpoints" / "y.png")
    Data = classifier_module.ClassificationData

    def splits(**kwargs):
        data = Data(str(tmp_path), image_size=6, val_fraction=0.25, test_fraction=0.25, **kwargs)
        data.setup("fit")
        return data, {name: {f.relative_to(tmp_path).as_posix() for f in data.datasets[name].files}
                      for name in ("val", "test")}

    data, before = splits()
    assert data.classes == ["cat", "dog"] and len(data.inputs) == 61
    assert data.targets[data.inputs.index(tmp_path / "cat" / "indoor" / "x.png")] == 0
    for name in ("val", "test"):  # a quarter of each class
        assert sum(f.startswith("cat/") for f in before[name]) == 5
        assert sum(f.startswith("dog/") for f in before[name]) == 10
    image(tmp_path / "dog" / "40.png")
    _, after = splits()  # 62 images: 15 each held out again
    moved = sum(len(before[name] ^ after[name]) for name in ("val", "test"))
    assert moved <= 4  # the new file, and at most one other pushed across each split's boundary (of 30 held out)

    (tmp_path / "bird").mkdir()
    with pytest.raises(classifier_module.ConfigError, match="class folder.s. bird hold no images"):
        Data(str(tmp_path), image_size=6)
    image(tmp_path / "bird" / "0.png")
    with pytest.warns(UserWarning, match="bird have too few examples"):
        splits()


def test_predict_csv_columns_are_matched_to_the_training_columns_by_name(classifier_module, tmp_path):
    """New rows whose columns come in another order predict as the same rows in training order; a missing column or
    a blank cell is refused in one line that names it."""
    with gzip.open(ASSETS / "digits.csv.gz", "rt") as f:
        header, *rows = list(csv.reader(f))[:21]
    features = [name for name in header if name != "label"]

    def write(name, columns, data_rows):
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f).writerows([columns] + [[dict(zip(header, r))[c] for c in columns] for r in data_rows])
        return str(tmp_path / name)

    Data, ConfigError = classifier_module.ClassificationData, classifier_module.ConfigError
    inputs = {}
    for name, columns in (("same.csv", features), ("reversed.csv", features[::-1])):
        data = Data(predict_path=write(name, columns, rows))
        data.setup("predict")
        inputs[name] = data.datasets["predict"].tensors[0]
    assert torch.equal(inputs["same.csv"], inputs["reversed.csv"])
    with pytest.raises(ConfigError, match=r"missing: \['pixel_5'\]"):
        Data(predict_path=write("short.csv", [c for c in features if c != "pixel_5"], rows)).setup("predict")
    rows[1][3] = ""
    with pytest.raises(ConfigError, match="line 3, column 'pixel_3': '' is not a finite number"):
        Data(data_path=write("blank.csv", header, rows))


def test_the_kept_checkpoint_is_the_lowest_validation_loss_not_an_early_tie(small_digits, tmp_path):
    """60 validation rows: accuracy ties from the first epochs on, and ModelCheckpoint keeps the older file on a tie.
    Ranked by validation loss, the kept model is the one with the lowest loss, later and at least as accurate; fit
    names its epoch, step and accuracy."""
    result = run_template("classifier.py", "fit", "--data.data_path", small_digits, "--trainer.max_epochs", "15",
                          *CSV_LOGS, *QUIET, cwd=tmp_path)
    assert_ok(result)
    rows = [r for r in logged_rows(tmp_path / "logs") if r.get("val_loss")]
    best_row = min(rows, key=lambda r: float(r["val_loss"]))
    kept = load_ckpt(tmp_path / "runs" / "classifier" / "checkpoints" / "best.ckpt")
    assert (kept["epoch"], kept["global_step"]) == (int(best_row["epoch"]), int(best_row["step"]) + 1)
    assert kept["epoch"] >= 8, "a model from the first epochs was kept"
    assert float(best_row["val_acc"]) >= max(float(r["val_acc"]) for r in rows[:3])
    line = kept_line(result.stdout)
    assert (line["epoch"], line["step"]) == (kept["epoch"], kept["global_step"])
    assert line["val_acc"] == pytest.approx(float(best_row["val_acc"]), abs=1e-4)


@pytest.mark.gpu
def test_gpu_training(tmp_path):
    """bf16-mixed on the GPU with the template's own optimizer: the shipped defaults train there."""
    result = run_template("classifier.py", "fit", "--config", CONFIGS / "gpu.yaml", "--trainer.max_epochs", "3",
                          *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert kept_line(result.stdout)["val_acc"] >= 0.8
