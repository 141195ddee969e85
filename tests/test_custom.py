"""templates/custom.py and references/migration.md's conversion: the doc's plain loop converted as the doc says trains
bitwise alike step by step (--record_steps, scripts/compare_runs.py) and resumes after kill -9 to the same weights;
Fabric's version; compare_runs.py's verdicts and refusals; the main job, the stand-in data and DDP."""

import ast
import json
import re
import signal
import sys

import pytest
import torch

from conftest import (QUIET, REPO, SCRIPTS, TEMPLATES, assert_ddp_ranks_agree, assert_ok, assert_one_error_line,
                      callback_config, kept_line, load_ckpt, load_module, run, run_exported, run_script, run_template,
                      snapshot)

MIGRATION = (REPO / "references" / "migration.md").read_text()
compare_runs = load_module(SCRIPTS / "compare_runs.py", "compare_runs")


def section(heading: str) -> str:
    return MIGRATION.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def python_blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def fill_in(template: str, blocks: list) -> str:
    """The template with each definition of the doc's blocks in place of its own of the same name (methods of class
    Model inside it); a definition the template lacks (the user's Net) goes above the block's first replaced one."""
    lines = template.splitlines()
    tree = ast.parse(template)
    top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    methods = {n.name: n for n in top["Model"].body if isinstance(n, ast.FunctionDef)}
    edits = []  # (first line, last line, new lines), 1-based and inclusive; an insertion replaces nothing
    for block in blocks:
        source = block.splitlines()
        text = lambda node: source[node.lineno - 1:node.end_lineno] + [""]  # noqa: E731
        pending = []
        for node in ast.parse(block).body:
            if isinstance(node, ast.ClassDef) and node.name == "Model":
                for method in (m for m in node.body if isinstance(m, ast.FunctionDef)):
                    old = methods[method.name]
                    edits.append((old.lineno, old.end_lineno, text(method)[:-1]))
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in top:
                old = top[node.name]
                edits.append((old.lineno, old.end_lineno, pending + text(node)[:-1]))
                pending = []
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                pending += text(node) + [""]
        assert not pending, "a block's new definitions must come before one it replaces"
    for first, last, new in sorted(edits, reverse=True):
        lines[first - 1:last] = new
    return "\n".join(lines) + "\n"


def command_in_doc(*args) -> None:
    assert " ".join(map(str, args)) in MIGRATION, f"references/migration.md no longer shows: {' '.join(args)}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The doc's path, run as a user would: loop.py writes loop_steps.csv; scaffold.py custom my_project; the four
    places replaced with the doc's blocks; the doc's fit command writes steps.csv."""
    root = tmp_path_factory.mktemp("conversion")
    project = root / "my_project"
    settings = ["--set", "seed_everything=1", "--set", "trainer.max_epochs=3", "--set", "trainer.precision=32-true"]
    command_in_doc("python SKILL/scripts/scaffold.py custom my_project", *settings)
    assert_ok(run_script("scaffold.py", "custom", project, *settings, cwd=root))
    custom = project / "custom.py"
    custom.write_text(fill_in(custom.read_text(), python_blocks(section("After: custom.py filled in"))))
    (project / "loop.py").write_text(python_blocks(section("Before: a plain loop"))[0])
    command_in_doc("python loop.py")
    assert_ok(run([sys.executable, "loop.py"], cwd=project))
    fit = ["fit", "--config", "config.yaml", "--record_steps", "steps.csv"]
    command_in_doc("python custom.py", *fit)
    trained = run([sys.executable, "custom.py", *fit, *QUIET], cwd=project)
    assert_ok(trained)
    return project, fit, trained


@pytest.mark.slow
def test_the_docs_conversion_trains_bitwise_like_the_loop_step_by_step(converted):
    project, _, trained = converted
    command_in_doc("python SKILL/scripts/compare_runs.py loop_steps.csv steps.csv")
    compared = run_script("compare_runs.py", "loop_steps.csv", "steps.csv", cwd=project)
    assert_ok(compared)
    assert "PASS: every step within atol 0 + rtol 1e-06 x |B| (bitwise equal)" in compared.stdout, compared.stdout
    assert "compared 48 steps (0..47)" in compared.stdout  # 3 epochs x 16 batches, learning rates included
    lrs = sorted({round(float(line.split(",")[2]), 6) for line in (project / "steps.csv").read_text().split()[1:]})
    assert lrs == [0.49, 0.7, 1.0]  # StepLR after each epoch, as the loop's scheduler.step()
    assert float(kept_line(trained.stdout)["val_acc"]) > 0.9  # it learns (4 classes)


@pytest.mark.slow
def test_a_converted_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(converted, tmp_path):
    project, fit, _ = converted
    kill = callback_config(tmp_path / "kill.yaml", "SignalAtStep", step=40, signal_name="SIGKILL")  # epoch 3 of 3
    killed_run = [*fit[:-1], "killed_steps.csv", "--trainer.default_root_dir", "killed", *QUIET]  # fit's settings
    killed = run([sys.executable, "custom.py", *killed_run, "--config", kill], cwd=project, tests_on_path=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run([sys.executable, "custom.py", *killed_run, "--ckpt_path", "last"], cwd=project)
    assert_ok(resumed)
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    uninterrupted = load_ckpt(project / "runs" / "custom" / "checkpoints" / "last.ckpt")
    after_kill = load_ckpt(project / "killed" / "checkpoints" / "last.ckpt")
    assert after_kill["global_step"] == uninterrupted["global_step"] == 48
    for name, weight in uninterrupted["state_dict"].items():
        assert torch.equal(weight, after_kill["state_dict"][name]), name
    # the resumed run redid the steps after its checkpoint: the last row of each step matches the loop's
    compared = run_script("compare_runs.py", "loop_steps.csv", "killed_steps.csv", "--format", "json", cwd=project)
    assert_ok(compared)
    report = json.loads(compared.stdout)
    assert report["bitwise_equal"] and report["steps_compared"] == 48 and report["rows"][1] == 48


@pytest.mark.slow
def test_fabrics_version_of_the_loop_matches_it_step_by_step(converted):
    project, _, _ = converted
    (project / "fabric_loop.py").write_text(python_blocks(section("The fewest changes: Fabric"))[0])
    assert_ok(run([sys.executable, "fabric_loop.py"], cwd=project))
    compared = run_script("compare_runs.py", "loop_steps.csv", "fabric_steps.csv", cwd=project)
    assert_ok(compared)
    assert "(bitwise equal)" in compared.stdout


@pytest.mark.slow
def test_another_seed_fails_at_step_0_and_names_the_cause(converted):
    project, fit, _ = converted
    other = [*fit[:-1], "seed2.csv", "--seed_everything", "2", "--trainer.default_root_dir", "seed2", *QUIET]
    assert_ok(run([sys.executable, "custom.py", *other], cwd=project))
    compared = run_script("compare_runs.py", "loop_steps.csv", "seed2.csv", cwd=project)
    assert compared.returncode == 1, compared.stdout + compared.stderr
    assert "first diverging step 0: loss" in compared.stdout and "--seed_everything" in compared.stdout
    assert "FAIL: 48 of 48 steps differ" in compared.stdout


# ---- compare_runs.py in this process ------------------------------------------------------------------------------
def steps_file(path, rows, header="step,loss,lr"):
    path.write_text(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def test_compare_verdicts(tmp_path, capsys):
    a = steps_file(tmp_path / "a.csv", [(0, 1.0, 0.1), (1, 0.5, 0.1), (2, 0.25, 0.05)])
    same = steps_file(tmp_path / "same.csv", [(0, 1.0, 0.1), (1, 0.5, 0.1), (1, 0.5, 0.1), (2, 0.25, 0.05)])
    near = steps_file(tmp_path / "near.csv", [(0, 1.0, 0.1), (1, 0.5000001, 0.1), (2, 0.25, 0.05)])
    far = steps_file(tmp_path / "far.csv", [(0, 1.0, 0.1), (1, 0.5, 0.1), (2, 0.3, 0.1)])
    assert compare_runs.main([str(a), str(same)]) == 0
    assert "(bitwise equal)" in capsys.readouterr().out  # the repeated step 1 (a resumed run) counts once
    assert compare_runs.main([str(a), str(near)]) == 0  # 2e-7 relative: within the default rtol 1e-6
    out = capsys.readouterr().out
    assert "PASS" in out and "bitwise" not in out
    assert compare_runs.main([str(a), str(near), "--rtol", "0"]) == 1
    assert "first diverging step 1: loss" in capsys.readouterr().out
    assert compare_runs.main([str(a), str(far), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first_divergence"]["step"] == 2 and report["steps_differing"] == 1
    assert report["first_divergence"]["value"] == "loss" and "update differs" in \
        report["first_divergence"]["likely_cause"]
    assert compare_runs.main([str(a), str(far), "--steps", "2"]) == 0  # the first two steps only
    capsys.readouterr()
    inf = steps_file(tmp_path / "inf.csv", [(0, 1.0, 0.1), (1, "inf", 0.1), (2, 0.25, 0.05)])
    assert compare_runs.main([str(a), str(inf), "--rtol", "1", "--format", "json"]) == 1  # inf is no number near 0.5
    report = json.loads(capsys.readouterr().out)  # strict JSON: the infinite difference as a string
    assert report["max_abs_diff"]["loss"] == "inf" and report["first_divergence"]["step"] == 1
    assert compare_runs.main([str(inf), str(inf)]) == 0
    bom = tmp_path / "bom.csv"  # saved by a spreadsheet: a byte-order mark, and no lr column
    bom.write_bytes(b"\xef\xbb\xbfstep,loss\n0,1.0\n1,0.5\n2,0.25\n")
    capsys.readouterr()
    assert compare_runs.main([str(a), str(bom)]) == 0
    assert "lr: not compared (a file has no lr column)" in capsys.readouterr().out


@pytest.mark.parametrize("content, args, expected", [  # more cases: tests/test_bad_inputs.py
    (None, [], "cannot read"),
    ("loss,lr\n0.1,0.1\n", [], "needs a header with the columns step,loss"),
    ("step,loss,lr\n0.5,1,0.1\n", [], "step must be a whole number"),
    ("step,loss,lr\n", [], "holds no steps"),
    ("step,loss,lr\n7,1.0,0.1\n", [], "share no step numbers"),
    ("step,loss,lr\n0,1.0,0.1\n", ["--rtol", "-1"], "--rtol must be a number >= 0"),
    ("step,loss,lr\n0,1.0,0.1\n", ["--steps", "0"], "--steps must be at least 1"),
    ("step,loss,lr\n0,1.0,0.1\n", ["--atol", "x"], "invalid float value"),
])
def test_compare_refuses_bad_input_in_one_line(tmp_path, content, args, expected):
    steps_file(tmp_path / "a.csv", [(0, 1.0, 0.1)])
    if content is not None:
        (tmp_path / "b.csv").write_bytes(content.encode())
    before = snapshot(tmp_path)
    result = run([sys.executable, SCRIPTS / "compare_runs.py", "a.csv", "b.csv", *args], cwd=tmp_path, timeout=60)
    assert_one_error_line(result, expected)
    assert snapshot(tmp_path) == before


# ---- the template as shipped -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_main_job_trains_tests_and_predicts(tmp_path):
    trained = run_template("custom.py", "fit", "--record_steps", "steps.csv", *QUIET, cwd=tmp_path)
    assert_ok(trained)
    kept = kept_line(trained.stdout)
    assert float(kept["val_acc"]) > 0.95, trained.stdout[-2000:]
    command = trained.stdout.split("next: ", 1)[1].splitlines()[0]
    assert " test " in command and "best.ckpt" in command and "--record_steps" not in command
    tested = run(["bash", "-c", command], cwd=tmp_path)
    assert_ok(tested)
    assert float(re.search(r"test_acc\s*│\s*([0-9.]+)", tested.stdout).group(1)) > 0.93
    predicted = run_template("custom.py", "predict", "--ckpt_path", "best", *QUIET, cwd=tmp_path)
    assert_ok(predicted)
    rows = (tmp_path / "runs" / "custom" / "predictions" / "best.csv").read_text().splitlines()
    assert rows[0] == "index,prediction" and len(rows) == 1 + 270  # the test split: 15% of 1,797
    exported = [line for line in trained.stdout.split("next: ")[1:] if " export " in line][0].splitlines()[0]
    assert_ok(run(["bash", "-c", exported], cwd=tmp_path))  # fit's next: line -> model.pt2, forward with torch alone
    x = torch.randn(5, 1, 8, 8)
    model = load_module(TEMPLATES / "custom.py", "custom_export").Model.load_from_checkpoint(
        kept["checkpoint"], map_location="cpu", weights_only=True).eval()
    outputs, imported_lightning = run_exported(tmp_path / "exported_model", x)
    with torch.no_grad():
        assert torch.allclose(outputs, model(x), atol=1e-5) and not imported_lightning


def test_stand_in_data_runs_before_the_real_data_exists(tmp_path):
    steps_file(tmp_path / "steps.csv", [(0, 9.0, 9.0), (1, 9.0, 9.0)])  # an earlier run's: a new run starts over
    result = run_template("custom.py", "fit", "--data.fake_size", "96", "--data.data_path", "not_yet.csv",
                          "--trainer.fast_dev_run", "true", "--record_steps", "steps.csv", *QUIET, cwd=tmp_path)
    assert_ok(result)
    rows = (tmp_path / "steps.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and len(rows) == 2 and rows[1].startswith("0,") and ",9.0," not in rows[1]
    without = run_template("custom.py", "fit", "--data.data_path", "not_yet.csv", "--trainer.fast_dev_run", "true",
                           *QUIET, cwd=tmp_path)
    assert_one_error_line(without, "--data.data_path not_yet.csv: not found")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_fixed_length_schedule_resumed_with_a_longer_budget_is_one_line(tmp_path):
    """OneCycleLR (the shipped schedule) is built for the first run's steps: a resume with a larger max_epochs ends
    in one line with the two ways out, and leaves no exception checkpoint that would fail the same way."""
    short = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", *QUIET]
    assert_ok(run_template("custom.py", "fit", "--trainer.max_epochs", "1", *short, cwd=tmp_path))
    longer = run_template("custom.py", "fit", "--trainer.max_epochs", "2", "--ckpt_path", "last", *short, cwd=tmp_path)
    assert_one_error_line(longer, "the learning-rate schedule has ended (Tried to step 3 times")
    assert not (tmp_path / "runs" / "custom" / "checkpoints" / "last-on-exception.ckpt").exists()


@pytest.mark.slow
def test_two_process_ddp_ranks_agree(tmp_path):
    metrics = assert_ddp_ranks_agree("custom.py", ["--trainer.max_epochs", "2"], tmp_path)
    assert metrics["val_acc"] > 0.5  # it learns (10 classes)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["gpu.yaml", "fsdp.yaml"])
def test_gpu_training(tmp_path, config):
    result = run_template("custom.py", "fit", "--config", TEMPLATES / "configs" / config, "--trainer.devices", "1",
                          "--trainer.max_epochs", "3", *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert float(kept_line(result.stdout)["val_acc"]) > 0.9
