"""Fault tolerance and bad input: each test injects one failure into a real run of a template and checks what is kept.

The failures come from tests/faults.py, which the template loads itself from a config file (this folder on
PYTHONPATH), so the command under test is the template's own. references/checkpointing.md, "What survives what",
names these tests.
"""

import csv
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (CONFIGS, QUIET, REPO, TEMPLATES, assert_ok, assert_one_error_line, consolidate_and_validate,
                      final_val_loss, load_ckpt, load_module, logged_steps, run, save_tiny_tokenizer)

TESTS = Path(__file__).resolve().parent
CSV_LOGS = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
            "--trainer.log_every_n_steps", "1"]


def train(template: str, *args, cwd: Path, env: tuple = (), unset: tuple = (), new_session: bool = False,
          timeout: float = 600):
    """Runs a template with tests/ on PYTHONPATH and extra variables set (or unset) through `env`; this process
    keeps its own environment."""
    cmd = ["env", *[f"--unset={name}" for name in unset], f"PYTHONPATH={TESTS}", *env, sys.executable,
           TEMPLATES / template, *args]
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          start_new_session=new_session, preexec_fn=terminal_ctrl_c)


def terminal_ctrl_c() -> None:
    """Ctrl-C as in a terminal: a test run started as a background job (`pytest &`) passes SIGINT on ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fault(path: Path, name: str, **init_args) -> Path:
    """A config file that adds one callback of tests/faults.py to the Trainer."""
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": f"faults.{name}",
                                                               "init_args": init_args}]}}))
    return path


def final_step(result) -> int:
    """The global step a causal_lm.py run ended at (its after_fit line)."""
    return int(re.search(r"rank 0: step (\d+) val_loss", result.stdout).group(1))


def restored_from(result) -> str:
    match = re.search(r"Restored all states from the checkpoint at (\S+)", result.stdout + result.stderr)
    assert match, (result.stdout + result.stderr)[-3000:]
    return match.group(1)


# ---- 1. kill -9 ----------------------------------------------------------------------------------------------------
CLASSIFIER = ["--trainer.max_epochs", "4", "--trainer.deterministic", "true", *QUIET]


def test_kill_9_after_epoch_2_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    killed = train("classifier.py", "fit", "--config", fault(tmp_path / "kill.yaml", "KillAfterEpoch", epoch=1),
                   *CLASSIFIER, "--trainer.default_root_dir", "killed", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load_ckpt(last)["epoch"] == 1  # epochs count from 0: the epoch-2 checkpoint and nothing after it

    resumed = train("classifier.py", "fit", *CLASSIFIER, "--trainer.default_root_dir", "killed", "--ckpt_path",
                    "last", *CSV_LOGS, cwd=tmp_path)
    assert_ok(resumed)
    assert restored_from(resumed) == str(last)
    metrics = csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv"))))
    assert {int(r["epoch"]) for r in metrics if r.get("val_acc")} == {2, 3}  # continued with epoch 3, nothing redone

    straight = train("classifier.py", "fit", *CLASSIFIER, "--trainer.default_root_dir", "straight", cwd=tmp_path)
    assert_ok(straight)
    resumed_weights = load_ckpt(last)["state_dict"]
    straight_weights = load_ckpt(tmp_path / "straight" / "checkpoints" / "last.ckpt")["state_dict"]
    assert resumed_weights.keys() == straight_weights.keys()
    different = [k for k in straight_weights if not torch.equal(resumed_weights[k], straight_weights[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different}"


# ---- 2. SLURM preemption -----------------------------------------------------------------------------------------
LM = ["--trainer.max_steps", "12", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2", *CSV_LOGS,
      *QUIET]
SLURM_UNSET = ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")  # from a real job this test might run in
SLURM_JOB = ["SLURM_JOB_ID=4242", "SLURM_JOB_NAME=causal_lm", "SLURM_NTASKS=1", "SLURM_NTASKS_PER_NODE=1",
             "SLURM_PROCID=0", "SLURM_LOCALID=0", "SLURM_NODEID=0", "SLURM_JOB_NUM_NODES=1",
             "SLURM_NODELIST=localhost"]


@pytest.fixture(scope="module")
def uninterrupted_lm(tmp_path_factory) -> dict:
    """causal_lm.py's 12 steps with no failure: what a resumed run must end with (last.ckpt at step 12)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(train("causal_lm.py", "fit", *LM, cwd=root))
    return load_ckpt(root / "runs" / "causal_lm" / "checkpoints" / "last.ckpt")


def assert_same_run(resumed_root: Path, uninterrupted: dict, steps: int = 12) -> None:
    """The resumed run validated and saved at the uninterrupted run's steps (last.ckpt at 12; Lightning alone puts
    it at 11) and trained on the same batches in the same order: bit-equal weights on CPU."""
    resumed = load_ckpt(resumed_root / "runs" / "causal_lm" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"] == steps
    weights, expected = resumed["state_dict"], uninterrupted["state_dict"]
    different = [k for k in expected if not torch.equal(weights[k], expected[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {len(different)} tensors"


def test_slurm_preemption_saves_requeues_and_resumes_at_the_same_step(tmp_path, uninterrupted_lm):
    stub_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    stub_dir.mkdir()
    # A stand-in for SLURM's scontrol: records its arguments, then ends the job the way a requeue does.
    (stub_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nkill -9 $PPID\n')
    (stub_dir / "scontrol").chmod(0o755)
    env = (*SLURM_JOB, f"PATH={stub_dir}:{os.getenv('PATH', '/usr/bin:/bin')}")

    first = train("causal_lm.py", "fit", "--config", fault(tmp_path / "usr1.yaml", "SignalAtStep", step=6), *LM,
                  cwd=tmp_path, env=env, unset=SLURM_UNSET)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert "Handling auto-requeue signal" in first.stdout + first.stderr
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = tmp_path / "runs" / "causal_lm" / "hpc_ckpt_1.ckpt"
    assert load_ckpt(hpc)["global_step"] == 6

    requeued = train("causal_lm.py", "fit", *LM, cwd=tmp_path, env=env, unset=SLURM_UNSET)  # as SLURM reruns it
    assert_ok(requeued)
    assert restored_from(requeued).endswith("hpc_ckpt_1.ckpt")
    assert logged_steps(tmp_path / "logs") == list(range(6, 12)) and final_step(requeued) == 12  # none redone
    assert_same_run(tmp_path, uninterrupted_lm)  # the data went on at the batch after the last one trained


# ---- 3. an exception in training_step ----------------------------------------------------------------------------
def test_exception_at_step_k_leaves_a_checkpoint_that_continues_at_step_k(tmp_path, uninterrupted_lm):
    failed = train("causal_lm.py", "fit", "--config", fault(tmp_path / "raise.yaml", "RaiseInTrainingStep", step=7),
                   *LM, cwd=tmp_path)
    assert failed.returncode == 1 and "injected failure in training_step at step 7" in failed.stderr
    checkpoints = tmp_path / "runs" / "causal_lm" / "checkpoints"
    saved = checkpoints / "last-on-exception.ckpt"
    assert f"RuntimeError at step 7: saved {saved.relative_to(tmp_path)}" in failed.stderr
    assert load_ckpt(saved)["global_step"] == 7 and load_ckpt(checkpoints / "last.ckpt")["global_step"] == 4

    resumed = train("causal_lm.py", "fit", *LM, "--ckpt_path", "last", cwd=tmp_path)  # the newest last*.ckpt
    assert_ok(resumed)
    assert restored_from(resumed).endswith("last-on-exception.ckpt")
    assert logged_steps(tmp_path / "logs") == list(range(7, 12)) and final_step(resumed) == 12  # step 7 redone
    assert_same_run(tmp_path, uninterrupted_lm)


def test_exception_inside_a_gradient_accumulation_group_resumes_to_the_uninterrupted_weights(tmp_path):
    """2 batches per step, failure in the second batch of step 5: the first one's gradients were not saved, so the
    resumed run redoes both (Lightning alone goes on with the second and steps on half the gradients)."""
    accumulate = [*LM, "--trainer.accumulate_grad_batches", "2"]
    straight = train("causal_lm.py", "fit", *accumulate, "--trainer.default_root_dir", "straight", cwd=tmp_path)
    assert_ok(straight)
    failed = train("causal_lm.py", "fit", "--config",
                   fault(tmp_path / "raise.yaml", "RaiseInTrainingStep", step=5, micro_batch=1), *accumulate,
                   cwd=tmp_path)
    assert failed.returncode == 1 and "injected failure in training_step at step 5" in failed.stderr
    resumed = train("causal_lm.py", "fit", *accumulate, "--ckpt_path", "last", cwd=tmp_path)
    assert_ok(resumed)
    assert restored_from(resumed).endswith("last-on-exception.ckpt") and final_step(resumed) == 12
    assert_same_run(tmp_path, load_ckpt(tmp_path / "straight" / "checkpoints" / "last.ckpt"))


def test_failure_in_an_epochs_last_batch_right_after_a_validation_resumes_to_the_uninterrupted_weights(tmp_path):
    """10 batches per epoch, validation after the 9th, failure in the 10th: the resumed run does not validate again,
    trains that last batch (Lightning alone ended the epoch without it) and numbers its steps as before."""
    corpus = tmp_path / "corpus.txt"  # 86,500 bytes: 641 training blocks of 128, 10 batches of 64 per epoch
    corpus.write_text(("the quick brown fox jumps over the lazy dog " * 2000)[:86500])
    args = [*LM, "--data.data_path", corpus, "--data.batch_size", "64", "--trainer.max_steps", "18",
            "--trainer.val_check_interval", "9"]
    straight = train("causal_lm.py", "fit", *args, "--trainer.default_root_dir", "straight", cwd=tmp_path)
    assert_ok(straight)
    failed = train("causal_lm.py", "fit", "--config", fault(tmp_path / "raise.yaml", "RaiseInTrainingStep", step=9),
                   *args, cwd=tmp_path)
    assert failed.returncode == 1 and "injected failure in training_step at step 9" in failed.stderr
    resumed = train("causal_lm.py", "fit", *args, "--ckpt_path", "last", cwd=tmp_path)
    assert_ok(resumed)
    assert restored_from(resumed).endswith("last-on-exception.ckpt")
    assert logged_steps(tmp_path / "logs") == list(range(9, 18)) and final_step(resumed) == 18
    assert_same_run(tmp_path, load_ckpt(tmp_path / "straight" / "checkpoints" / "last.ckpt"), steps=18)


def test_ctrl_c_leaves_a_checkpoint_at_its_step(tmp_path):
    """SIGINT is what Ctrl-C sends: Lightning turns the KeyboardInterrupt into on_exception and exits 1."""
    interrupted = train("causal_lm.py", "fit", "--config", fault(tmp_path / "int.yaml", "SignalAtStep", step=5,
                                                                 signal_name="SIGINT"), *LM, cwd=tmp_path)
    assert interrupted.returncode == 1 and "KeyboardInterrupt at step 5" in interrupted.stderr
    saved = tmp_path / "runs" / "causal_lm" / "checkpoints" / "last-on-exception.ckpt"
    assert load_ckpt(saved)["global_step"] == 5


@pytest.mark.parametrize("template, args", [("causal_lm.py", LM), ("classifier.py", QUIET),
                                            ("transformers_finetune.py", QUIET)])
def test_sigterm_leaves_a_checkpoint_and_exits_143(template, args, tmp_path):
    """SIGTERM (docker stop, Kubernetes, timeout): Lightning ends the batch and raises SIGTERMException, a SystemExit
    without a code (exit 0, success); the templates exit 128 + 15, so `&&` or a scheduler sees the interruption."""
    stopped = train(template, "fit", "--config", fault(tmp_path / "term.yaml", "SignalAtStep", step=5,
                                                       signal_name="SIGTERM"), *args, cwd=tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by SIGTERM" in stopped.stderr.splitlines()[-1]
    saved = tmp_path / "runs" / template[:-3] / "checkpoints" / "last-on-exception.ckpt"
    assert load_ckpt(saved)["global_step"] == 6  # the batch under way when the signal came is finished first


def test_a_fit_without_ckpt_path_starts_fresh_next_to_an_exception_checkpoint(tmp_path):
    """Lightning's own OnExceptionCheckpoint makes every fit without --ckpt_path resume; the templates' does not."""
    failed = train("causal_lm.py", "fit", "--config", fault(tmp_path / "raise.yaml", "RaiseInTrainingStep", step=2),
                   *LM, cwd=tmp_path)
    assert failed.returncode == 1
    fresh = train("causal_lm.py", "fit", *LM, "--trainer.max_steps", "3", cwd=tmp_path)
    assert_ok(fresh)
    assert "Restored all states" not in fresh.stdout + fresh.stderr and min(logged_steps(tmp_path / "logs")) == 0


# ---- 4. NaN loss -------------------------------------------------------------------------------------------------
def test_nan_loss_stops_at_its_step_with_the_causes_and_the_smoke_test_diagnoses_it(tmp_path):
    result = train("classifier.py", "fit", "--model.lr", "1e30", *QUIET, *CSV_LOGS, cwd=tmp_path)
    error = assert_one_error_line(result, "NaN or inf at step 1", code=1)
    assert "learning rate" in error and "bf16-mixed" in error and "NaN/inf in the data" in error
    assert logged_steps(tmp_path / "logs", "train_loss") == [0]  # stopped at once instead of running on
    assert not (tmp_path / "runs" / "classifier" / "checkpoints").exists()  # no checkpoint of poisoned weights

    smoke = run([sys.executable, REPO / "scripts" / "smoke_test.py", TEMPLATES / "classifier.py", "--cpu", "--format",
                 "json", "--", "--model.lr", "1e30"], cwd=tmp_path)
    assert smoke.returncode == 1 and json.loads(smoke.stdout)["diagnosis"] == "nan_loss", smoke.stdout


def test_nan_loss_stops_every_rank_of_a_ddp_run_together(tmp_path):
    """The ranks decide together: one rank stopping alone would leave the other waiting in its next collective."""
    result = train("classifier.py", "fit", "--model.lr", "1e30", "--config", CONFIGS / "ddp.yaml",
                   "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true", *QUIET,
                   cwd=tmp_path, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and len(errors) == 2, result.stderr[-3000:]  # one line from each rank
    assert all("NaN or inf at step 1" in line for line in errors)


# ---- 5. a distributed checkpoint ---------------------------------------------------------------------------------
FSDP2 = ["--config", CONFIGS / "fsdp2.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.precision", "32-true", "--trainer.strategy.init_args.data_parallel_size", "2",
         "--trainer.use_distributed_sampler", "false",  # every rank validates the same batches: one process can match
         "--trainer.max_steps", "9", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "4",
         *CSV_LOGS, *QUIET]


def test_distributed_checkpoint_survives_a_kill_of_every_rank_and_consolidates_to_one_file(tmp_path):
    kill_all = fault(tmp_path / "kill.yaml", "SignalAtStep", step=3, signal_name="SIGKILL", process_group=True)
    killed = train("causal_lm.py", "fit", "--config", kill_all, *FSDP2, cwd=tmp_path, new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "runs" / "causal_lm" / "checkpoints" / "last.ckpt"
    assert (last / ".metadata").is_file() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2

    single, val_loss = consolidate_and_validate(last, tmp_path)
    full = load_ckpt(single)
    assert full["global_step"] == 3
    val_loss_at_save = next(state["best_model_score"] for key, state in full["callbacks"].items()
                            if key.startswith("ModelCheckpoint{'monitor': 'val_loss'"))
    assert abs(val_loss - float(val_loss_at_save)) < 1e-4, (val_loss, val_loss_at_save)

    resumed = train("causal_lm.py", "fit", *FSDP2, "--ckpt_path", "last", cwd=tmp_path, timeout=900)
    assert_ok(resumed)
    assert restored_from(resumed).endswith("last.ckpt")
    held = re.findall(r"\[rank (\d)\] FSDP2: this rank holds ([\d,]+) of ([\d,]+) parameter elements", resumed.stdout)
    assert {rank for rank, _, _ in held} == {"0", "1"}
    for _, local, total in held:  # really sharded: each of the 2 ranks holds about half
        assert int(local.replace(",", "")) <= 0.6 * int(total.replace(",", ""))
    assert logged_steps(tmp_path / "logs") == list(range(3, 9)) and final_step(resumed) == 9

    # Each rank went on with its own shard of the data where it stopped: the same result as an uninterrupted run.
    straight = train("causal_lm.py", "fit", *FSDP2, "--trainer.default_root_dir", "straight", cwd=tmp_path,
                     timeout=900)
    assert_ok(straight)
    losses = [final_val_loss(run.stdout) for run in (resumed, straight)]
    assert set(losses[0]) == {0, 1} and losses[0] == losses[1], losses


# ---- 6. bad input to every template ------------------------------------------------------------------------------
class CodePayload:
    """Pickles to a call of Path.touch: loading it with weights_only=False would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder with bad inputs and the outputs of an earlier run of each template, which must stay untouched."""
    (tmp_path / "wrong_type.yaml").write_text("trainer:\n  max_epochs: ten\n")
    (tmp_path / "unknown_key.yaml").write_text("model:\n  hiden: 3\n")
    torch.save({"state_dict": {"w": torch.ones(256, 256)}}, tmp_path / "intact.ckpt")
    data = (tmp_path / "intact.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.ckpt").write_bytes(bytes(range(256)) * 8)
    torch.save({"state_dict": {}, "hyper_parameters": CodePayload(tmp_path / "CODE_RAN")}, tmp_path / "code.ckpt")
    for name in ("classifier", "causal_lm", "transformers_finetune"):
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / name / "checkpoints" / "last.ckpt").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


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
    (["--ckpt_path", "missing.ckpt"], "checkpoint not found"),
    (["--ckpt_path", "truncated.ckpt"], "truncated or not a PyTorch checkpoint"),
    (["--ckpt_path", "corrupt.ckpt"], "truncated or not a PyTorch checkpoint"),
    (["--ckpt_path", "code.ckpt"], "could run code"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["--trainer.accelerator", "gpu"], "cannot build the Trainer"))


@pytest.fixture(scope="module")
def template_mains():
    return {name: load_module(TEMPLATES / name, f"{name[:-3]}_bad_input").main
            for name in ("classifier.py", "causal_lm.py", "transformers_finetune.py")}


@pytest.mark.parametrize("template", ["classifier.py", "causal_lm.py", "transformers_finetune.py"])
def test_bad_input_is_one_line_exit_2_and_changes_no_file(template, template_mains, workspace, capsys):
    before = snapshot(workspace)
    for args, expected in BAD_INPUTS:
        with pytest.raises(SystemExit) as exit_info:
            template_mains[template](["fit", *args, "--trainer.max_steps", "1"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert exit_info.value.code == 2 and len(errors) == 1 and expected in errors[0], (args, err[-2000:])
        assert snapshot(workspace) == before, f"{args} left files behind or changed them"


@pytest.mark.parametrize("template, args, expected", [
    ("causal_lm.py", ["--model.model_config", '{"hiden_size": 64}'], "did you mean: hidden_size"),
    ("causal_lm.py", ["--model.model_type", "gpt2", "--model.model_config", '{"n_layers": 2}'],
     "did you mean: n_layer"),
    ("transformers_finetune.py", ["--model.model_config", '{"num_hiden_layers": 2}'],
     "did you mean: num_hidden_layers"),
], ids=["llama", "gpt2", "bert"])
def test_a_misspelt_model_config_key_is_refused(template, args, expected, template_mains, workspace, capsys):
    """transformers configs keep any keyword, so the typo would change nothing, silently."""
    with pytest.raises(SystemExit) as exit_info:
        template_mains[template](["fit", *args, "--trainer.max_steps", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1 and expected in errors[0], errors


def test_finetune_names_the_line_of_a_bad_record(template_mains, workspace, capsys):
    good = "".join(json.dumps({"text": f"review {i}", "label": ["pos", "neg"][i % 2]}) + "\n" for i in range(20))
    for name, bad, expected in (("broken", '{"text": "cut off', "line 21 is not JSON"),
                                ("no_label", json.dumps({"text": "no label here"}), "line 21 has no 'label' value"),
                                ("null_label", json.dumps({"text": "x", "label": None}), "line 21 has no 'label'")):
        (workspace / f"{name}.jsonl").write_text(good + bad + "\n")
        with pytest.raises(SystemExit) as exit_info:
            template_mains["transformers_finetune.py"](["fit", "--data.data_path", f"{name}.jsonl"])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert exit_info.value.code == 2 and len(errors) == 1 and expected in errors[0], errors


SCRIPT_BAD_INPUTS = [
    ("scripts/check_env.py", ["--python", "missing/python"], "cannot run"),
    ("scripts/detect_hardware.py", ["--profile", "missing.json"], "cannot read profile"),
    ("scripts/detect_hardware.py", ["--params", "lots"], "parameter count"),
    ("scripts/scaffold.py", ["classifier", "existing.txt"], "exists and is not a folder"),
    ("scripts/scaffold.py", ["classifier", "new_project", "--hardware", "missing.yaml"], "cannot read --hardware"),
    ("scripts/scaffold.py", ["classifier", "new_project", "--set", "data.data_path=missing_photos"], "not found"),
    ("scripts/smoke_test.py", ["missing.py"], "no such script"),
    ("scripts/smoke_test.py", [TEMPLATES / "classifier.py", "--config", "missing.yaml"], "no such config"),
    ("scripts/launch.py", ["missing.yaml", "--target", "slurm"], "cannot read"),
    ("scripts/launch.py", [CONFIGS / "ddp.yaml", "--target", "torchrun", "--devices", "2", "--script",
                          TEMPLATES / "classifier.py", "--write", "existing.txt"],
     "exists"),
    ("scripts/summarize_run.py", ["missing_dir"], "no such folder"),
    ("scripts/summarize_run.py", ["empty_run", "--plot", "existing.txt"], "exists"),
    ("templates/hpo_optuna.py", ["--script", "missing.py"], "missing.py"),
    ("templates/hpo_optuna.py", ["--config", "missing.yaml"], "missing.yaml"),
]
if not torch.cuda.is_available():
    SCRIPT_BAD_INPUTS.append(("bench/bench.py", [], "no CUDA GPU here"))


@pytest.mark.parametrize("script, args, expected", SCRIPT_BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_input_to_every_script_is_one_line_and_changes_no_file(script, args, expected, workspace):
    (workspace / "existing.txt").write_text("keep me\n")
    (workspace / "empty_run").mkdir()
    before = snapshot(workspace)
    assert_one_error_line(run([sys.executable, REPO / script, *args], cwd=workspace, timeout=120), expected)
    assert snapshot(workspace) == before and (workspace / "existing.txt").read_text() == "keep me\n"


def test_fault_tolerance_block_is_the_same_in_every_template():
    """One block of code, copied: a fix in one template must reach the others (they stay self-contained)."""
    start, end = "# Fault tolerance (the same block", "# Command line"
    blocks = {name: (TEMPLATES / name).read_text().split(start)[1].split(end)[0]
              for name in ("classifier.py", "causal_lm.py", "transformers_finetune.py")}
    assert len(set(blocks.values())) == 1, "the fault-tolerance blocks differ: copy the edited one to the others"


# ---- 7. no code runs from a checkpoint or a model folder unless asked --------------------------------------------
def test_checkpoint_payload_is_live_but_never_run(tmp_path):
    marker = tmp_path / "CODE_RAN"
    torch.save({"hyper_parameters": CodePayload(marker)}, tmp_path / "code.ckpt")
    result = train("classifier.py", "test", "--ckpt_path", "code.ckpt", *QUIET, cwd=tmp_path)
    assert result.returncode == 2 and "could run code" in result.stderr and not marker.exists()
    torch.load(tmp_path / "code.ckpt", weights_only=False)  # what a careless load would do: the payload is real
    assert marker.exists()


def test_templates_checkpoints_load_with_weights_only(tmp_path):
    result = train("causal_lm.py", "fit", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                   "--trainer.limit_val_batches", "1", *QUIET, cwd=tmp_path)
    assert_ok(result)
    written = sorted(p.name for p in (tmp_path / "runs" / "causal_lm" / "checkpoints").glob("*.ckpt"))
    assert written == ["best.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"], written
    for name in written:
        assert load_ckpt(tmp_path / "runs" / "causal_lm" / "checkpoints" / name)["global_step"] == 2


@pytest.mark.parametrize("template", ["causal_lm.py", "transformers_finetune.py"])
def test_model_folder_code_runs_only_with_trust_remote_code(template, tmp_path):
    folder, marker = tmp_path / "remote_model", tmp_path / "CODE_RAN"
    folder.mkdir()
    save_tiny_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "remote_demo", "auto_map": {
        "AutoConfig": "remote_demo.RemoteDemoConfig", "AutoModelForCausalLM": "remote_demo.RemoteDemo",
        "AutoModelForSequenceClassification": "remote_demo.RemoteDemo"}}))
    (folder / "remote_demo.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    args = ["fit", "--model.name_or_path", folder, "--trainer.fast_dev_run", "true", *QUIET]
    if template == "transformers_finetune.py":
        (tmp_path / "r.csv").write_text("text,label\nthe film was great .,pos\nthe plot was dull .,neg\n" * 4)
        args += ["--data.data_path", tmp_path / "r.csv"]
    refused = train(template, *args, cwd=tmp_path)
    assert refused.returncode == 2 and "trust_remote_code true" in refused.stderr and not marker.exists()
    trusted = train(template, *args, "--model.trust_remote_code", "true", cwd=tmp_path)
    assert marker.exists(), trusted.stderr[-2000:]  # asked for: the folder's code ran (and then failed, it is a stub)


def test_every_test_named_in_the_survival_table_exists():
    table = (REPO / "references" / "checkpointing.md").read_text().split("## What survives what")[1].split("## ")[0]
    named = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", table))
    defined = {name for path in TESTS.glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert len(named) >= 9 and named <= defined, f"named in the table but not defined: {sorted(named - defined)}"
