"""What a run trains and keeps is what the user asked for: each test runs a template or script as a user runs it."""

import csv
import gzip
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (CONFIGS, QUIET, REPO, TEMPLATES, assert_ok, assert_one_error_line, load_ckpt, load_module, run,
                      run_template, save_tiny_tokenizer)

TESTS = Path(__file__).resolve().parent


def with_tests_on_path(template: str, *args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """A template run that can load tests/faults.py callbacks by class path."""
    return run(["env", f"PYTHONPATH={TESTS}", sys.executable, TEMPLATES / template, *args], cwd=cwd, timeout=timeout)


def facts_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "faults.PrintRunFacts"}]}}))
    return path


def run_facts(output: str) -> dict:
    return {int(r): json.loads(f) for r, f in re.findall(r"^rank (\d+): (\{.*\})$", output, re.MULTILINE)}


# ---- 1. master weights in float32 whatever dtype a pretrained model was saved in ---------------------------------
@pytest.fixture(scope="module")
def float16_models(tmp_path_factory):
    """A tiny Llama and a tiny BERT classifier saved in float16 (as Llama-2 and many others are published)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("float16")
    llama, bert = root / "llama", root / "bert"
    vocab = save_tiny_tokenizer(llama)
    save_tiny_tokenizer(bert)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
                     ).to(torch.float16).save_pretrained(llama)
    BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
                                  ).to(torch.float16).save_pretrained(bert)
    assert json.loads((llama / "config.json").read_text())["dtype"] == "float16"
    return {"causal_lm.py": llama, "transformers_finetune.py": bert}


def float16_run(template: str, folder: Path, precision: str, cwd: Path) -> dict:
    (cwd / "reviews.csv").write_text("text,label\n" + "the film was great .,pos\nthe plot was dull .,neg\n" * 20)
    (cwd / "corpus.txt").write_text("the film was great . the plot was dull .\n" * 40)
    data = ["--data.data_path", "corpus.txt", "--data.block_size", "16", "--trainer.max_steps", "3",
            "--trainer.val_check_interval", "3"] if template == "causal_lm.py" else [
        "--data.data_path", "reviews.csv", "--trainer.max_epochs", "1"]
    result = run_template(template, "fit", "--model.name_or_path", folder, "--trainer.precision", precision,
                          "--trainer.limit_val_batches", "1", *data, *QUIET, cwd=cwd)
    assert_ok(result)
    return load_ckpt(next((cwd / "runs").rglob("last.ckpt")))


@pytest.mark.parametrize("template", ["causal_lm.py", "transformers_finetune.py"])
def test_a_float16_model_trains_float32_weights_and_optimizer_state_under_bf16_mixed(template, float16_models,
                                                                                     tmp_path):
    ckpt = float16_run(template, float16_models[template], "bf16-mixed", tmp_path)
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    moments = [t for state in ckpt["optimizer_states"][0]["state"].values() for k, t in state.items()
               if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_a_true_precision_trains_in_its_own_dtype(float16_models, tmp_path):
    ckpt = float16_run("causal_lm.py", float16_models["causal_lm.py"], "bf16-true", tmp_path)
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.bfloat16}


# ---- 2. the kept checkpoint: ranked by validation loss, not a tie on a coarse metric ------------------------------
@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """400 of the digits: 60 validation rows, where accuracy ties from the first epochs on."""
    path = tmp_path_factory.mktemp("small") / "small.csv"
    with gzip.open(REPO / "assets" / "digits.csv.gz", "rt") as f:
        rows = list(csv.reader(f))[:401]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


CSV_LOG = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs"]


def test_the_kept_checkpoint_is_the_lowest_validation_loss_not_an_early_tie(small_digits, tmp_path):
    result = run_template("classifier.py", "fit", "--data.data_path", small_digits, "--trainer.max_epochs", "15",
                          *CSV_LOG, *QUIET, cwd=tmp_path)
    assert_ok(result)
    rows = [r for r in csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))) if r.get("val_loss")]
    best_row = min(rows, key=lambda r: float(r["val_loss"]))
    kept = load_ckpt(tmp_path / "runs" / "classifier" / "checkpoints" / "best.ckpt")
    assert (kept["epoch"], kept["global_step"]) == (int(best_row["epoch"]), int(best_row["step"]) + 1)
    assert kept["epoch"] >= 8, "a model from the first epochs was kept"
    early = max(float(r["val_acc"]) for r in rows[:3])
    assert float(best_row["val_acc"]) >= early  # the later model is at least as good on the coarse metric too
    line = re.search(r"^best val_loss=([0-9.]+) \(epoch (\d+), step (\d+); val_acc=[0-9.]+\) checkpoint=(\S+)$",
                     result.stdout, re.M)
    assert line and (int(line.group(2)), int(line.group(3))) == (kept["epoch"], kept["global_step"]), result.stdout


def test_a_run_started_under_another_ranking_resumes_with_its_state(small_digits, tmp_path):
    """Lightning keys ModelCheckpoint and EarlyStopping state by monitor and mode: a run saved when the templates
    ranked by val_acc (max) resumes under that rule, with its best score and patience count, not silently without."""
    old_rule = ["--best_checkpoint.monitor", "val_acc", "--best_checkpoint.mode", "max",
                "--early_stopping.monitor", "val_acc", "--early_stopping.mode", "max"]
    data = ["--data.data_path", str(small_digits), *QUIET]
    assert_ok(run_template("classifier.py", "fit", *old_rule, "--trainer.max_epochs", "2", *data, cwd=tmp_path))
    last = tmp_path / "runs" / "classifier" / "checkpoints" / "last.ckpt"
    before = load_ckpt(last)["callbacks"]
    old_keys = [k for k in before if "val_acc" in k]
    assert len(old_keys) == 2  # ModelCheckpoint{'monitor': 'val_acc', ...} and EarlyStopping{...}

    resumed = run_template("classifier.py", "fit", "--trainer.max_epochs", "3", "--ckpt_path", "last", *data,
                           cwd=tmp_path)
    assert_ok(resumed)
    output = resumed.stdout + resumed.stderr
    assert "best_checkpoint keeps ranking by val_acc (max)" in output and "Be aware" not in output, output[-3000:]
    after = load_ckpt(last)["callbacks"]
    assert set(old_keys) <= set(after)
    stopping = after[next(k for k in old_keys if k.startswith("EarlyStopping"))]
    assert stopping["best_score"] >= before[next(k for k in old_keys if k.startswith("EarlyStopping"))]["best_score"]

    refused = run_template("classifier.py", "fit", "--trainer.max_epochs", "4", "--ckpt_path", "last",
                           "--best_checkpoint.monitor", "train_loss_epoch", *data, cwd=tmp_path)
    assert_one_error_line(refused, "ranked best_checkpoint by val_acc (max)")


# ---- 3. epoch-level values reduced over every process ------------------------------------------------------------
DDP_RUNS = {
    "classifier.py": ["--trainer.max_epochs", "1"],
    "causal_lm.py": ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2"],
    "transformers_finetune.py": ["--trainer.max_epochs", "1"],
}


@pytest.mark.parametrize("template", sorted(DDP_RUNS))
def test_two_process_ddp_logs_the_same_epoch_values_on_every_rank(template, tmp_path):
    result = with_tests_on_path(template, "fit", "--config", CONFIGS / "ddp.yaml", "--trainer.accelerator", "cpu",
                                "--trainer.devices", "2", "--trainer.precision", "32-true",
                                "--config", facts_config(tmp_path / "facts.yaml"), *DDP_RUNS[template], *QUIET,
                                cwd=tmp_path)
    assert_ok(result)
    assert "sync_dist" not in result.stderr, result.stderr[-3000:]
    facts = run_facts(result.stdout)
    assert sorted(facts) == [0, 1], result.stdout[-2000:]
    per_step = {"train_loss"}  # this rank's value of its last step: logged to the logger from rank 0 only
    epoch_level = {k for k in facts[0]["metrics"] if k not in per_step and not k.startswith("train/")}
    assert "val_loss" in epoch_level
    for key in epoch_level:
        assert facts[0]["metrics"][key] == facts[1]["metrics"][key], (key, facts)


# ---- 4. the float32 matmul precision is a config value that scaffold fills in ------------------------------------
def test_matmul_precision_comes_from_the_hardware_settings(tmp_path):
    (tmp_path / "hw.yaml").write_text("matmul_precision: medium\ntrainer:\n  accelerator: cpu\n  devices: 1\n")
    made = run([sys.executable, REPO / "scripts" / "scaffold.py", "classifier", tmp_path / "p", "--hardware",
                tmp_path / "hw.yaml"], cwd=tmp_path)
    assert_ok(made)
    assert yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())["matmul_precision"] == "medium"
    result = with_tests_on_path("classifier.py", "fit", "--config", tmp_path / "p" / "config.yaml",
                                "--config", facts_config(tmp_path / "facts.yaml"), "--trainer.max_epochs", "1",
                                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", *QUIET,
                                cwd=tmp_path)
    assert_ok(result)
    assert run_facts(result.stdout)[0]["matmul_precision"] == "medium"
    detected = run([sys.executable, REPO / "scripts" / "detect_hardware.py", "--format", "yaml"], cwd=tmp_path)
    assert yaml.safe_load(detected.stdout)["matmul_precision"] in ("highest", "high")  # a config key the templates take


# ---- 5. printed commands are shell-quoted ------------------------------------------------------------------------
def test_printed_commands_survive_a_hostile_destination_and_values(tmp_path):
    dest = tmp_path / "my project;touch HIJACKED"
    made = run([sys.executable, REPO / "scripts" / "scaffold.py", "classifier", dest, "--hardware", "none",
                "--set", "trainer.default_root_dir=runs/x;touch HIJACKED2", "--set", "trainer.max_epochs=1",
                "--set", "trainer.limit_train_batches=2", "--set", "trainer.limit_val_batches=1",
                "--format", "json"], cwd=tmp_path)
    assert_ok(made)
    commands = json.loads(made.stdout)["next"]
    assert shlex.split(commands["cd"]) == ["cd", str(dest.resolve())]
    script = " && ".join([commands["cd"], commands["train"] + " --trainer.enable_progress_bar false",
                          commands["summarize"]])
    assert_ok(run(["bash", "-c", script], cwd=tmp_path))
    assert not list(tmp_path.rglob("HIJACKED*")), "a printed command ran part of a path as a command"
    assert (dest / "runs" / "x;touch HIJACKED2" / "checkpoints" / "last.ckpt").is_file()


# ---- 6. PASS only when training and validation batches ran -------------------------------------------------------
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
    result = run([sys.executable, REPO / "scripts" / "smoke_test.py", "train.py", "--format", "json"], cwd=tmp_path)
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["status"] == "fail" and report["diagnosis"] == diagnosis, report


# ---- 7. an explicit checkpoint whose model options differ is refused, every form, every template -------------------
SHAPES = {  # a short fit, and a model option that changes what the checkpoint holds
    "classifier.py": (["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"],
                      ["--model.hidden_dims", "[64]"], "model.hidden_dims"),
    "causal_lm.py": (["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"],
                     ["--model.model_config", '{"num_hidden_layers": 2}'], "model.model_config"),
    "transformers_finetune.py": (["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"],
                                 ["--model.model_config", '{"num_hidden_layers": 1}'], "model.model_config"),
}


@pytest.mark.parametrize("template", sorted(SHAPES))
def test_a_checkpoint_whose_model_options_differ_is_refused_in_every_form(template, tmp_path, monkeypatch, capsys):
    fit, other, option = SHAPES[template]
    assert_ok(run_template(template, "fit", *fit, "--trainer.limit_val_batches", "1", *QUIET, cwd=tmp_path))
    checkpoints = tmp_path / "runs" / template[:-3] / "checkpoints"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [template])
    main = load_module(TEMPLATES / template, f"{template[:-3]}_options").main
    evaluate = "validate" if template == "causal_lm.py" else "test"
    extra = ["--data.test_path", str(REPO / "assets" / "sentiment.csv.gz")] if template.startswith("transformers") else []
    for args in (["fit", *other, "--ckpt_path", str(checkpoints / "last.ckpt")], ["fit", *other, "--ckpt_path", "last"],
                 [evaluate, *other, *extra, "--ckpt_path", "best"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert exit_info.value.code == 2 and len(errors) == 1 and f"was trained with {option}=" in errors[0], errors


def test_an_option_left_at_its_default_takes_the_checkpoints_value(tmp_path):
    """Resuming needs no model options repeated: `last` gets the checkpoint's, as an explicit path did."""
    small = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", *QUIET]
    assert_ok(run_template("classifier.py", "fit", "--model.hidden_dims", "[64]", "--trainer.max_epochs", "1", *small,
                           cwd=tmp_path))
    resumed = run_template("classifier.py", "fit", "--trainer.max_epochs", "2", "--ckpt_path", "last", *small,
                           cwd=tmp_path)
    assert_ok(resumed)
    ckpt = load_ckpt(tmp_path / "runs" / "classifier" / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 1 and list(ckpt["hyper_parameters"]["hidden_dims"]) == [64]
