"""templates/lightning_support.py: its pieces by import, bad input to every template, --ckpt_path checks, and what
survives a failed run (references/checkpointing.md, "What survives what", names these tests). The failures come from
conftest.py's callbacks, loaded by class path from a config file: the command under test is the template's own.
"""

import csv
import json
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.utilities import grad_norm
from torch.utils.data import DataLoader

from conftest import (CONFIGS, CSV_LOGS, QUIET, REPO, TEMPLATES, assert_ok, assert_one_error_line, callback_config,
                      consolidate_and_validate, final_val_loss, kept_line, load_ckpt, logged_steps,
                      refused_in_process, run, run_script, run_template, save_tiny_tokenizer, snapshot)

sys.path.insert(0, str(TEMPLATES))  # the module the templates import, as they import it
import lightning_support as support  # noqa: E402
TEMPLATE_NAMES = ["tabular.py", "causal_lm.py", "transformers_finetune.py", "custom.py"]
ONE_EPOCH = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]


def checkpoints(root: Path, template: str = "causal_lm.py") -> Path:
    return root / "runs" / template[:-3] / "checkpoints"


def tabular(*args, cwd: Path):
    return run_template("tabular.py", "fit", *args, cwd=cwd)


# ---- the pieces, by import ----
def test_peak_flops_for_gpus_missing_from_lightnings_table():
    peak = support.missing_peak_tflops
    assert peak("NVIDIA H200", "bf16-mixed") == 989.0 and peak("NVIDIA H100", "bf16-mixed") == 989.0
    assert peak("NVIDIA B200", "bf16-mixed") == 2250.0 and peak("NVIDIA H200", "32-true") == 494.5
    assert peak("Tesla T4", "16-mixed") is None


def test_next_command_keeps_the_fit_options_and_quotes_them(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/my project/tabular.py"])
    fit = ["fit", "--data.data_path", "a b;c.csv", "--ckpt_path", "last", "--trainer.fast_dev_run", "false"]
    words = shlex.split(support.next_command(fit, "test", "/runs/x/best.ckpt"))
    assert words[1:] == ["/my project/tabular.py", "test", "--data.data_path", "a b;c.csv", "--trainer.fast_dev_run",
                         "false", "--ckpt_path", "/runs/x/best.ckpt"]


def test_checkpoint_rules_are_read_from_lightnings_state_keys():
    assert support.literal_rule("{'monitor': 'val_acc', 'mode': 'max', 'every_n_epochs': 1}")["monitor"] == "val_acc"
    assert support.literal_rule("{'train_time_interval': datetime.timedelta(seconds=60)}") == {}
    assert support.plain((256, 128)) == support.plain([256, 128])


def test_a_worker_error_is_reported_as_its_own_line():
    wrapped = support.ConfigError("Caught ConfigError in DataLoader worker process 0.\nOriginal Traceback (most"
                                  " recent call last):\n  File x\nlightning_support.ConfigError: cannot decode image"
                                  " a.png (broken): replace or delete it")
    assert support.one_line(wrapped) == "cannot decode image a.png (broken): replace or delete it"


def test_prediction_writer_names_rows_and_keeps_one_path_per_checkpoint(tmp_path):
    """predictions/<checkpoint>.csv under default_root_dir: the same path every run (no version folder), a first
    column naming each row's input, no .part file left."""
    class Labeller(BoringModel):
        def predict_step(self, batch, batch_idx):
            scores = self(batch).softmax(-1)
            return {"prediction": ["yes" if s > 0.5 else "no" for s in scores[:, 0].tolist()], "score": scores[:, 0]}

    class Data(L.LightningDataModule):
        predict_sources = ("file", [f"item{i}.png" for i in range(10)])

        def predict_dataloader(self):
            return DataLoader(RandomDataset(32, 10), batch_size=4)

    for _ in range(2):
        trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[support.PredictionWriter("runs/x/best.ckpt")],
                            logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.predict(Labeller(), datamodule=Data(), return_predictions=False)
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["best.csv"]
    rows = list(csv.DictReader(open(tmp_path / "predictions" / "best.csv")))
    assert [r["file"] for r in rows] == [f"item{i}.png" for i in range(10)]
    assert {r["prediction"] for r in rows} <= {"yes", "no"} and all(len(r["score"]) == 6 for r in rows)


def test_callback_state_keeps_the_names_checkpoints_carry(tmp_path, template_main):
    """Lightning keys callback state by class name (and monitor and mode): the names the templates wrote before the
    support module held these classes, so their checkpoints load."""
    cli = template_main("tabular.py")([*ONE_EPOCH, "--trainer.limit_val_batches", "1", "--trainer.default_root_dir",
                                       str(tmp_path), *QUIET], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    keys = set(load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["callbacks"])
    rule = "'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, 'train_time_interval': None}"
    assert keys == {"ResumableRandomState", f"ModelCheckpoint{{'monitor': 'val_loss', {rule}",
                    f"ModelCheckpoint{{'monitor': None, {rule}", "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"}


def test_a_template_without_its_support_module_says_how_to_get_it(tmp_path):
    shutil.copyfile(TEMPLATES / "tabular.py", tmp_path / "tabular.py")
    result = run([sys.executable, "tabular.py", "fit"], cwd=tmp_path)
    error = assert_one_error_line(result, "lightning_support.py is missing", code=1)
    assert "scripts/scaffold.py tabular DEST" in error


@pytest.mark.parametrize("template", [*TEMPLATE_NAMES, "image_classifier.py"])
def test_templates_are_the_users_story(template):
    """The machinery is imported, never copied; one marked place for the user's model; nothing imported from this
    repository but the support module."""
    source = (TEMPLATES / template).read_text()
    assert 'if __name__ == "__main__":' in source and "self.save_hyperparameters()" in source
    assert "# EDIT HERE" in source and "from lightning_support import" in source
    assert not re.search(r"^\s*(from|import)\s+(scripts|tests|templates|conftest)\b", source, re.M)
    for name in ("class StopOnNonFiniteLoss", "class ResumeAtUnfinishedBatch", "def with_nearest_keys",
                 "class PredictionWriter", "def run_cli"):
        assert name not in source, f"{template} defines {name} again: it belongs in lightning_support.py"
    # causal_lm.py pre-trains and fine-tunes (full, LoRA, QLoRA; text or conversations), and generates and exports
    limits = {"causal_lm.py": 950, "tabular.py": 860, "image_classifier.py": 830, "custom.py": 200}
    assert len(source.splitlines()) <= limits.get(template, 600)


class GradNorms(Callback):
    """Total gradient norm before clipping (on_before_optimizer_step runs first) and after the step."""

    def __init__(self):
        self.before, self.after = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.before.append(float(grad_norm(module, norm_type=2)["grad_2.0_norm_total"]))

    def on_train_batch_end(self, trainer, module, *args):
        self.after.append(float(grad_norm(module, norm_type=2)["grad_2.0_norm_total"]))


@pytest.mark.parametrize("template", ["causal_lm.py", "transformers_finetune.py"])
def test_gradients_are_clipped_with_a_fused_optimizer_under_bf16_mixed(tmp_path, template, template_main):
    """Lightning 2.6 raises when a fused AdamW meets gradient clipping under -mixed precision (the GPU default):
    clip_gradients clips in configure_gradient_clipping instead. adamw() is fused on CPU too: the GPU's path."""
    norms = GradNorms()
    cli = template_main(template)(["--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "0.01",
                                   "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                                   "--trainer.default_root_dir", str(tmp_path)], run=False, callbacks=(norms,))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 and cli.trainer.optimizers[0].defaults["fused"]
    assert min(norms.before) > 0.05  # the control: clipping had work to do
    assert norms.after == pytest.approx([0.01, 0.01], rel=1e-3)


# ---- bad input to every template: one line, exit 2, nothing written ----
class CodePayload:
    """Unpickles to Path.touch(marker): a load with weights_only=False would create the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Bad inputs, and an earlier run's outputs of each template, which must stay untouched."""
    (tmp_path / "wrong_type.yaml").write_text("trainer:\n  max_epochs: ten\n")
    (tmp_path / "unknown_key.yaml").write_text("model:\n  hiden: 3\n")
    torch.save({"state_dict": {"w": torch.ones(256, 256)}}, tmp_path / "intact.ckpt")
    data = (tmp_path / "intact.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.ckpt").write_bytes(bytes(range(256)) * 8)
    torch.save({"state_dict": {}, "hyper_parameters": CodePayload(tmp_path / "CODE_RAN")}, tmp_path / "code.ckpt")
    for name in ("tabular.py", "causal_lm.py", "transformers_finetune.py"):
        checkpoints(tmp_path, name).mkdir(parents=True)
        (checkpoints(tmp_path, name) / "last.ckpt").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    return tmp_path


BAD_INPUTS = [
    (["--data.data_path", "missing.data"], "not found"),
    (["--config", "missing.yaml"], "does not exist"),
    (["--config", "wrong_type.yaml"], "trainer.max_epochs"),
    (["--config", "unknown_key.yaml"], "model.hiden"),
    (["--trainer.max_step", "1"], "did you mean: trainer.max_steps"),
    (["--trainer.precision", "17"], "trainer.precision"),
    (["--trainer.strategy", "ddpx"], "invalid strategy name"),
    (["--trainer.accelerator", "cpu", "--trainer.devices", str(len(os.sched_getaffinity(0)) + 1)], "CPU processes"),
    (["--trainer.accelerator", "cpu", "--trainer.devices", "0,1"], "cannot build the Trainer"),
    (["--matmul_precision", "low"], "matmul_precision"),
    (["--ckpt_path", "missing.ckpt"], "checkpoint not found"),
    (["--ckpt_path", "truncated.ckpt"], "truncated or not a PyTorch checkpoint"),
    (["--ckpt_path", "corrupt.ckpt"], "truncated or not a PyTorch checkpoint"),
    (["--ckpt_path", "code.ckpt"], "could run code"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["--trainer.accelerator", "gpu"], "cannot build the Trainer"))


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_bad_input_is_one_line_exit_2_and_changes_no_file(template, template_main, workspace, capsys):
    main = template_main(template)
    before = snapshot(workspace)
    for args, expected in BAD_INPUTS:
        assert expected in refused_in_process(main, ["fit", *args, "--trainer.max_steps", "1"], capsys), args
        assert snapshot(workspace) == before, f"{args} left files behind or changed them"
    assert not (workspace / "CODE_RAN").exists()


def test_bad_input_in_a_real_process_prints_exactly_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_epoch: 3\n")
    result = tabular("--config", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "trainer.max_epoch" in result.stderr and "did you mean: trainer.max_epochs" in result.stderr


def test_checkpoint_payload_is_live_but_never_run(tmp_path):
    marker = tmp_path / "CODE_RAN"
    torch.save({"hyper_parameters": CodePayload(marker)}, tmp_path / "code.ckpt")
    result = run_template("tabular.py", "test", "--ckpt_path", "code.ckpt", *QUIET, cwd=tmp_path)
    assert result.returncode == 2 and "could run code" in result.stderr and not marker.exists()
    torch.load(tmp_path / "code.ckpt", weights_only=False)  # what a careless load would do: the payload is real
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("template", ["causal_lm.py", "transformers_finetune.py"])
def test_model_folder_code_runs_only_with_trust_remote_code(template, tmp_path):
    folder, marker = tmp_path / "remote_model", tmp_path / "CODE_RAN"
    folder.mkdir()
    save_tiny_tokenizer(folder)
    demo = "remote_demo.RemoteDemo"
    (folder / "config.json").write_text(json.dumps({"model_type": "remote_demo", "auto_map": {
        "AutoConfig": demo + "Config", "AutoModelForCausalLM": demo, "AutoModelForSequenceClassification": demo}}))
    (folder / "remote_demo.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    args = ["fit", "--model.name_or_path", folder, "--trainer.fast_dev_run", "true", *QUIET]
    if template == "transformers_finetune.py":
        (tmp_path / "r.csv").write_text("text,label\nthe film was great .,pos\nthe plot was dull .,neg\n" * 4)
        args += ["--data.data_path", tmp_path / "r.csv"]
    refused = run_template(template, *args, cwd=tmp_path)
    assert refused.returncode == 2 and "trust_remote_code true" in refused.stderr and not marker.exists()
    run_template(template, *args, "--model.trust_remote_code", "true", cwd=tmp_path)
    assert marker.exists()  # asked for: the folder's code ran (and then failed, it is a stub)


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_no_logger_drops_only_the_learning_rate_monitor(template, template_main, tmp_path):
    """Without a logger LearningRateMonitor would raise at the start of fit: it is left out then, and only then."""
    main = template_main(template)
    for logger, monitors in (("false", 0), ("true", 1)):
        trainer = main(["--trainer.logger", logger, "--trainer.default_root_dir", str(tmp_path)], run=False).trainer
        assert sum(isinstance(c, LearningRateMonitor) for c in trainer.callbacks) == monitors
        assert sum(isinstance(c, ModelCheckpoint) for c in trainer.callbacks) == 2  # best and last stay


@pytest.mark.parametrize("callback", ["early_stopping", "best_checkpoint"])
def test_a_monitor_that_is_not_logged_is_one_line_and_no_checkpoint(callback, template_main, capsys, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = refused_in_process(template_main("tabular.py"), [
        "fit", f"--{callback}.monitor", "val_los", *ONE_EPOCH, "--trainer.limit_val_batches", "2", *QUIET], capsys)
    assert "val_los" in error and "val_loss" in error
    assert not checkpoints(tmp_path, "tabular.py").exists()  # a config mistake: nothing to resume


@pytest.mark.parametrize("template", ["tabular.py", "transformers_finetune.py"])
def test_a_run_that_ends_before_its_first_validation_ends_normally(template, tmp_path):
    """Early stopping's metric is logged after validation only: a cut-short epoch ends without it."""
    result = run_template(template, "fit", "--trainer.max_steps", "3", *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert "`max_steps=3` reached" in result.stdout + result.stderr


# ---- --ckpt_path: the checkpoint's model and rules ----
SHAPES = {  # a short fit, and a model option that changes what the checkpoint holds
    "tabular.py": (ONE_EPOCH, ["--model.hidden_dims", "[64]"], "model.hidden_dims"),
    "causal_lm.py": (["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"],
                     ["--model.model_config", '{"num_hidden_layers": 2}'], "model.model_config"),
    "transformers_finetune.py": (ONE_EPOCH, ["--model.model_config", '{"num_hidden_layers": 1}'], "model.model_config"),
    "custom.py": (ONE_EPOCH, ["--model.lr", "0.01"], "model.lr"),
}


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_a_checkpoint_whose_model_options_differ_is_refused_in_every_form(template, template_main, tmp_path,
                                                                          monkeypatch, capsys):
    """LightningCLI silently rebuilt an explicit checkpoint's model over the options given, and `last` failed to
    load: every form refuses in one line, naming the option."""
    fit, other, option = SHAPES[template]
    assert_ok(run_template(template, "fit", *fit, "--trainer.limit_val_batches", "1", *QUIET, cwd=tmp_path))
    monkeypatch.chdir(tmp_path)
    main = template_main(template)
    evaluate = "validate" if template == "causal_lm.py" else "test"
    held_out = ["--data.test_path", str(REPO / "assets" / "sentiment.csv.gz")] if template[0] == "t" else []
    for args in (["fit", *other, "--ckpt_path", str(checkpoints(tmp_path, template) / "last.ckpt")],
                 ["fit", *other, "--ckpt_path", "last"], [evaluate, *other, *held_out, "--ckpt_path", "best"]):
        assert f"was trained with {option}=" in refused_in_process(main, args, capsys), args


@pytest.mark.slow
def test_an_option_left_at_its_default_takes_the_checkpoints_value(tmp_path):
    """Resuming needs no model options repeated: `last` gets the checkpoint's, as an explicit path does."""
    small = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", *QUIET]
    assert_ok(tabular("--model.hidden_dims", "[64]", "--trainer.max_epochs", "1", *small, cwd=tmp_path))
    assert_ok(tabular("--trainer.max_epochs", "2", "--ckpt_path", "last", *small, cwd=tmp_path))
    ckpt = load_ckpt(checkpoints(tmp_path, "tabular.py") / "last.ckpt")
    assert ckpt["epoch"] == 1 and list(ckpt["hyper_parameters"]["hidden_dims"]) == [64]


@pytest.mark.slow
def test_a_run_started_under_another_ranking_resumes_with_its_state(small_digits, tmp_path):
    """Lightning keys checkpoint and early-stopping state by monitor and mode: a run saved ranking by val_acc (max)
    resumes under that rule with its best score and patience, not silently without; another rule is refused."""
    old_rule = ["--best_checkpoint.monitor", "val_acc", "--best_checkpoint.mode", "max",
                "--early_stopping.monitor", "val_acc", "--early_stopping.mode", "max"]
    data = ["--data.data_path", str(small_digits), *QUIET]
    assert_ok(tabular(*old_rule, "--trainer.max_epochs", "2", *data, cwd=tmp_path))
    last = checkpoints(tmp_path, "tabular.py") / "last.ckpt"
    before = load_ckpt(last)["callbacks"]
    old_keys = [k for k in before if "val_acc" in k]
    assert len(old_keys) == 2  # ModelCheckpoint{'monitor': 'val_acc', ...} and EarlyStopping{...}

    resumed = tabular("--trainer.max_epochs", "3", "--ckpt_path", "last", *data, cwd=tmp_path)
    assert_ok(resumed)
    output = resumed.stdout + resumed.stderr
    assert "best_checkpoint keeps ranking by val_acc (max)" in output and "Be aware" not in output, output[-3000:]
    assert kept_line(resumed.stdout)["val_acc"] >= 0.5
    after = load_ckpt(last)["callbacks"]
    assert set(old_keys) <= set(after)
    stopping = next(k for k in old_keys if k.startswith("EarlyStopping"))
    assert after[stopping]["best_score"] >= before[stopping]["best_score"]  # carried on, not restarted from -inf

    refused = tabular("--trainer.max_epochs", "4", "--ckpt_path", "last", "--best_checkpoint.monitor",
                      "train_loss_epoch", *data, cwd=tmp_path)
    assert_one_error_line(refused, "ranked best_checkpoint by val_acc (max)")


# ---- what survives what: failures injected into real runs ----
def restored_from(result) -> str:
    match = re.search(r"Restored all states from the checkpoint at (\S+)", result.stdout + result.stderr)
    assert match, (result.stdout + result.stderr)[-3000:]
    return match.group(1)


def final_step(result) -> int:
    """The global step a causal_lm.py run ended at (its after_fit line)."""
    return int(re.search(r"rank 0: step (\d+) val_loss", result.stdout).group(1))


def train(template: str, *args, cwd: Path, **kwargs):
    return run_template(template, *args, cwd=cwd, tests_on_path=True, **kwargs)


def lm_fit(*args, cwd: Path, **kwargs):
    return train("causal_lm.py", "fit", *args, cwd=cwd, **kwargs)


def injected(callback: str, init: dict, *args, cwd: Path, template: str = "causal_lm.py", **kwargs):
    """A fit with one of conftest's callbacks added."""
    config = callback_config(cwd / "inject.yaml", callback, **init)
    return train(template, "fit", "--config", config, *args, cwd=cwd, **kwargs)


def fails_at(step: int, *args, cwd: Path, micro_batch: int = 0):
    failed = injected("RaiseInTrainingStep", {"step": step, "micro_batch": micro_batch}, *args, cwd=cwd)
    assert failed.returncode == 1 and f"injected failure in training_step at step {step}" in failed.stderr
    return failed


def resumed_from_exception(*args, cwd: Path):
    """--ckpt_path last: the newest last*.ckpt, the exception's."""
    resumed = lm_fit(*args, "--ckpt_path", "last", cwd=cwd)
    assert_ok(resumed)
    assert restored_from(resumed).endswith("last-on-exception.ckpt")
    return resumed


def straight(template: str, *args, cwd: Path, **kwargs):
    """The run without a failure, under straight/."""
    result = train(template, "fit", *args, "--trainer.default_root_dir", "straight", cwd=cwd, **kwargs)
    assert_ok(result)
    return result


def assert_same_run(resumed: Path, uninterrupted: dict, steps: int = None) -> None:
    """The resumed run saved at the uninterrupted run's step (last.ckpt at 12; Lightning alone puts it at 11) and
    trained on the same batches in the same order: bit-equal weights on CPU."""
    resumed = load_ckpt(resumed)
    assert resumed["global_step"] == uninterrupted["global_step"] == (steps or resumed["global_step"])
    weights, expected = resumed["state_dict"], uninterrupted["state_dict"]
    assert weights.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(weights[k], expected[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different}"


STRAIGHT = Path("straight/checkpoints/last.ckpt")
CLASSIFIER = ["--trainer.max_epochs", "4", "--trainer.deterministic", "true", *QUIET]


@pytest.mark.slow
def test_kill_9_after_epoch_2_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    killed = injected("KillAfterEpoch", {"epoch": 1}, *CLASSIFIER, "--trainer.default_root_dir", "killed",
                      cwd=tmp_path, template="tabular.py")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load_ckpt(last)["epoch"] == 1  # epochs count from 0: the epoch-2 checkpoint and nothing after it

    resumed = train("tabular.py", "fit", *CLASSIFIER, "--trainer.default_root_dir", "killed", "--ckpt_path",
                    "last", *CSV_LOGS, cwd=tmp_path)
    assert_ok(resumed)
    assert restored_from(resumed) == str(last)
    metrics = csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv"))))
    assert {int(r["epoch"]) for r in metrics if r.get("val_acc")} == {2, 3}  # continued with epoch 3, nothing redone
    straight("tabular.py", *CLASSIFIER, cwd=tmp_path)
    assert_same_run(last, load_ckpt(tmp_path / STRAIGHT))


LM = ["--trainer.max_steps", "12", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2", *CSV_LOGS,
      *QUIET]
LM_LAST = checkpoints(Path()) / "last.ckpt"
SLURM_UNSET = ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")  # from a real job this test might run in
SLURM_JOB = [f"SLURM_{v}" for v in ("JOB_ID=4242", "JOB_NAME=causal_lm", "NTASKS=1", "NTASKS_PER_NODE=1", "PROCID=0",
                                    "LOCALID=0", "NODEID=0", "JOB_NUM_NODES=1", "NODELIST=localhost")]


@pytest.fixture(scope="module")
def uninterrupted_lm(tmp_path_factory) -> dict:
    """causal_lm.py's 12 steps with no failure: what a resumed run must end with."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(lm_fit(*LM, cwd=root))
    return load_ckpt(root / LM_LAST)


@pytest.mark.slow
def test_slurm_preemption_saves_requeues_and_resumes_at_the_same_step(tmp_path, uninterrupted_lm):
    stub_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    stub_dir.mkdir()
    # A stand-in for SLURM's scontrol: records its arguments, then ends the job the way a requeue does.
    (stub_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nkill -9 $PPID\n')
    (stub_dir / "scontrol").chmod(0o755)
    env = (*SLURM_JOB, f"PATH={stub_dir}:{os.getenv('PATH', '/usr/bin:/bin')}")

    first = injected("SignalAtStep", {"step": 6}, *LM, cwd=tmp_path, env=env, unset=SLURM_UNSET)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert "Handling auto-requeue signal" in first.stdout + first.stderr
    assert calls.read_text().split() == ["requeue", "4242"]
    assert load_ckpt(tmp_path / "runs" / "causal_lm" / "hpc_ckpt_1.ckpt")["global_step"] == 6

    requeued = lm_fit(*LM, cwd=tmp_path, env=env, unset=SLURM_UNSET)  # as SLURM reruns it
    assert_ok(requeued)
    assert restored_from(requeued).endswith("hpc_ckpt_1.ckpt")
    assert logged_steps(tmp_path / "logs") == list(range(6, 12)) and final_step(requeued) == 12  # none redone
    assert_same_run(tmp_path / LM_LAST, uninterrupted_lm, 12)  # the data went on after the last batch trained


@pytest.mark.slow
def test_exception_at_step_k_leaves_a_checkpoint_that_continues_at_step_k(tmp_path, uninterrupted_lm):
    failed = fails_at(7, *LM, cwd=tmp_path)
    saved = checkpoints(tmp_path) / "last-on-exception.ckpt"
    assert f"RuntimeError at step 7: saved {saved.relative_to(tmp_path)}" in failed.stderr
    assert load_ckpt(saved)["global_step"] == 7 and load_ckpt(tmp_path / LM_LAST)["global_step"] == 4

    resumed = resumed_from_exception(*LM, cwd=tmp_path)
    assert logged_steps(tmp_path / "logs") == list(range(7, 12)) and final_step(resumed) == 12  # step 7 redone
    assert_same_run(tmp_path / LM_LAST, uninterrupted_lm, 12)


@pytest.mark.slow
@pytest.mark.parametrize("extra, step, micro_batch, steps", [
    # 2 batches per step, failure in the second batch of step 5: the first one's gradients were not saved, so the
    # resumed run redoes both (Lightning alone goes on with the second and steps on half the gradients)
    (["--trainer.accumulate_grad_batches", "2"], 5, 1, 12),
    # 10 batches per epoch, validation after the 9th, failure in the 10th: the resumed run does not validate again,
    # trains that last batch (Lightning alone ended the epoch without it) and numbers its steps as before
    (["--data.data_path", "corpus.txt", "--data.batch_size", "64", "--trainer.max_steps", "18",
      "--trainer.val_check_interval", "9"], 9, 0, 18),
], ids=["inside_a_gradient_accumulation_group", "in_an_epochs_last_batch_right_after_a_validation"])
def test_a_failure_resumes_to_the_uninterrupted_weights(extra, step, micro_batch, steps, tmp_path):
    # 86,500 bytes: 641 training blocks of 128, 10 batches of 64 per epoch
    (tmp_path / "corpus.txt").write_text(("the quick brown fox jumps over the lazy dog " * 2000)[:86500])
    args = [*LM, *extra]
    straight("causal_lm.py", *args, cwd=tmp_path)
    fails_at(step, *args, cwd=tmp_path, micro_batch=micro_batch)
    resumed = resumed_from_exception(*args, cwd=tmp_path)
    assert logged_steps(tmp_path / "logs") == list(range(step, steps)) and final_step(resumed) == steps
    assert_same_run(tmp_path / LM_LAST, load_ckpt(tmp_path / STRAIGHT), steps)


@pytest.mark.slow
def test_ctrl_c_leaves_a_checkpoint_at_its_step(tmp_path):
    """SIGINT is what Ctrl-C sends: Lightning turns the KeyboardInterrupt into on_exception and exits 1."""
    interrupted = injected("SignalAtStep", {"step": 5, "signal_name": "SIGINT"}, *LM, cwd=tmp_path)
    assert interrupted.returncode == 1 and "KeyboardInterrupt at step 5" in interrupted.stderr
    assert load_ckpt(checkpoints(tmp_path) / "last-on-exception.ckpt")["global_step"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("template, args", [("causal_lm.py", LM), ("tabular.py", QUIET),
                                            ("transformers_finetune.py", QUIET)])
def test_sigterm_leaves_a_checkpoint_and_exits_143(template, args, tmp_path):
    """SIGTERM (docker stop, Kubernetes, timeout): Lightning ends the batch and raises SIGTERMException, a SystemExit
    without a code (exit 0, success); the templates exit 128 + 15, so `&&` or a scheduler sees the interruption."""
    stopped = injected("SignalAtStep", {"step": 5, "signal_name": "SIGTERM"}, *args, cwd=tmp_path, template=template)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by SIGTERM" in stopped.stderr.splitlines()[-1]
    saved = checkpoints(tmp_path, template) / "last-on-exception.ckpt"
    assert load_ckpt(saved)["global_step"] == 6  # the batch under way when the signal came is finished first


@pytest.mark.slow
def test_a_fit_without_ckpt_path_starts_fresh_next_to_an_exception_checkpoint(tmp_path):
    """Lightning's own OnExceptionCheckpoint makes every fit without --ckpt_path resume; the templates' does not."""
    fails_at(2, *LM, cwd=tmp_path)
    fresh = lm_fit(*LM, "--trainer.max_steps", "3", cwd=tmp_path)
    assert_ok(fresh)
    assert "Restored all states" not in fresh.stdout + fresh.stderr and min(logged_steps(tmp_path / "logs")) == 0


@pytest.mark.slow
def test_nan_loss_stops_at_its_step_with_the_causes_and_the_smoke_test_diagnoses_it(tmp_path):
    result = train("tabular.py", "fit", "--model.lr", "1e30", *QUIET, *CSV_LOGS, cwd=tmp_path)
    error = assert_one_error_line(result, "NaN or inf at step 1", code=1)
    assert "learning rate" in error and "bf16-mixed" in error and "NaN/inf in the data" in error
    assert logged_steps(tmp_path / "logs", "train_loss") == [0]  # stopped at once instead of running on
    assert not checkpoints(tmp_path, "tabular.py").exists()  # no checkpoint of poisoned weights

    smoke = run_script("smoke_test.py", TEMPLATES / "tabular.py", "--cpu", "--format", "json", "--",
                       "--model.lr", "1e30", cwd=tmp_path)
    assert smoke.returncode == 1 and '"diagnosis": "nan_loss"' in smoke.stdout, smoke.stdout


@pytest.mark.slow
def test_nan_loss_stops_every_rank_of_a_ddp_run_together(tmp_path):
    """The ranks decide together: one rank stopping alone would leave the other waiting in its next collective."""
    result = train("tabular.py", "fit", "--model.lr", "1e30", "--config", CONFIGS / "ddp.yaml", "--trainer.accelerator",
                   "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true", *QUIET, cwd=tmp_path, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and len(errors) == 2, result.stderr[-3000:]  # one line from each rank
    assert all("NaN or inf at step 1" in line for line in errors)


FSDP2 = ["--config", CONFIGS / "fsdp2.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.precision", "32-true", "--trainer.strategy.init_args.data_parallel_size", "2",
         "--trainer.use_distributed_sampler", "false",  # every rank validates the same batches: one process can match
         "--trainer.max_steps", "9", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "4",
         *CSV_LOGS, *QUIET]


@pytest.mark.slow
def test_distributed_checkpoint_survives_a_kill_of_every_rank_and_consolidates_to_one_file(tmp_path):
    killed = injected("SignalAtStep", {"step": 3, "signal_name": "SIGKILL", "process_group": True}, *FSDP2,
                      cwd=tmp_path, new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / LM_LAST
    assert (last / ".metadata").is_file() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2

    single, val_loss = consolidate_and_validate(last, tmp_path)
    full = load_ckpt(single)
    assert full["global_step"] == 3
    val_loss_at_save = next(state["best_model_score"] for key, state in full["callbacks"].items()
                            if key.startswith("ModelCheckpoint{'monitor': 'val_loss'"))
    assert abs(val_loss - float(val_loss_at_save)) < 1e-4, (val_loss, val_loss_at_save)

    resumed = lm_fit(*FSDP2, "--ckpt_path", "last", cwd=tmp_path, timeout=900)
    assert_ok(resumed)
    assert restored_from(resumed).endswith("last.ckpt")
    held = re.findall(r"\[rank (\d)\] FSDP2: this rank holds ([\d,]+) of ([\d,]+) parameter elements", resumed.stdout)
    assert {rank for rank, _, _ in held} == {"0", "1"}
    for _, local, total in held:  # really sharded: each of the 2 ranks holds about half
        assert int(local.replace(",", "")) <= 0.6 * int(total.replace(",", ""))
    assert logged_steps(tmp_path / "logs") == list(range(3, 9)) and final_step(resumed) == 9

    # Each rank went on with its own shard of the data where it stopped: the same result as an uninterrupted run.
    losses = [final_val_loss(r.stdout) for r in (resumed, straight("causal_lm.py", *FSDP2, cwd=tmp_path, timeout=900))]
    assert set(losses[0]) == {0, 1} and losses[0] == losses[1], losses


def test_templates_checkpoints_load_with_weights_only(tmp_path):
    assert_ok(run_template("causal_lm.py", "fit", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                           "--trainer.limit_val_batches", "1", *QUIET, cwd=tmp_path))
    written = sorted(p.name for p in checkpoints(tmp_path).glob("*.ckpt"))
    assert written == ["best.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"], written
    for name in written:
        assert load_ckpt(checkpoints(tmp_path) / name)["global_step"] == 2


def test_every_test_named_in_the_survival_table_exists():
    table = (REPO / "references" / "checkpointing.md").read_text().split("## What survives what")[1].split("## ")[0]
    named = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", table))
    defined = {name for path in (REPO / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert len(named) >= 9 and named <= defined, f"named in the table but not defined: {sorted(named - defined)}"
