"""scripts/smoke_test.py: PASS only when training and validation batches ran; each diagnosis proven by planting its
failure in a copy of the tabular template; bad usage."""

import json
import shutil

import pytest

from conftest import REPO, SCRIPTS, TEMPLATES, assert_bad_input_changes_nothing, assert_one_error_line, run_script


def script(name, *args, cwd, timeout=600):
    return run_script(name, *args, cwd=cwd, timeout=timeout)


def test_smoke_test_takes_a_templates_own_error_line_as_the_diagnosis(tmp_path):
    """A template's one-line refusal names the problem and its fix: smoke_test reports that line (not "unknown",
    and not a pattern matched elsewhere in the output, such as a load report's "size mismatch")."""
    result = script("smoke_test.py", TEMPLATES / "transformers_finetune.py", "--cpu", "--format", "json", "--",
                    "--data.text_column", "body", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["diagnosis"] == "bad_config" and "no column 'body'" in report["fix"], report


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
    result = script("smoke_test.py", "train.py", "--format", "json", cwd=tmp_path)
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["status"] == "fail" and report["diagnosis"] == diagnosis, report


MODEL_INIT = "        self.save_hyperparameters()  # load_from_checkpoint needs no arguments\n"


TRAIN_LOSS = "        loss = self.loss(self(numeric, codes), y)\n"


SPAWN = "trainer:\n  accelerator: cpu\n  devices: 2\n  strategy: ddp_spawn\n"


PLANTS = {
    "shape": [("layers.append(nn.Linear(in_features, outputs))",
               "layers.append(nn.Linear(in_features + 1, outputs))")],
    "main_guard": [('if __name__ == "__main__":\n    main()', "main()")],
    "unpicklable": [(MODEL_INIT, MODEL_INIT + "        self.transform = lambda x: x\n")],
    "dtype": [(TRAIN_LOSS, TRAIN_LOSS + "        torch.zeros(3, dtype=torch.bfloat16).index_add_(0, torch.tensor([0]),"
                                        " torch.ones(1))\n")],
    "nan_loss": [(TRAIN_LOSS, "        loss = self.loss(self(numeric, codes) * float('inf'), y)\n")],
    "dataloader_worker": [("sampler=sampler,", "sampler=sampler, num_workers=1, collate_fn=broken_collate,"),
                          ("DEFAULT_DATA = ", "def broken_collate(batch):\n    raise ValueError('corrupt sample')\n\n\n"
                                            "DEFAULT_DATA = ")],
    "cuda_oom": [(TRAIN_LOSS, TRAIN_LOSS + "        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to"
                                          " allocate 20.00 GiB')\n")],
    "missing_package": [("import torch\n", "import torch\nimport package_that_is_not_installed\n")],
}


@pytest.mark.slow
@pytest.mark.parametrize("diagnosis", sorted(PLANTS))
def test_smoke_test_diagnoses_planted_failure(diagnosis, tmp_path):
    source = (TEMPLATES / "tabular.py").read_text()
    for old, new in PLANTS[diagnosis]:
        assert old in source, f"plant for {diagnosis} no longer matches the template"
        source = source.replace(old, new, 1)
    planted = tmp_path / "planted.py"
    planted.write_text(source.replace('Path(__file__).resolve().parent.parent / "assets"',
                                      f'Path({str(REPO)!r}) / "assets"'))
    shutil.copyfile(TEMPLATES / "lightning_support.py", tmp_path / "lightning_support.py")  # as scaffold.py leaves it
    args = ["--config", tmp_path / "spawn.yaml"] if diagnosis in ("main_guard", "unpicklable") else ["--cpu"]
    (tmp_path / "spawn.yaml").write_text(SPAWN)
    result = script("smoke_test.py", planted, *args, "--timeout", "240", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["diagnosis"] == diagnosis, report
    assert report["fix"] and report["error_line"]


@pytest.mark.parametrize("args, expected", [
    (["missing.py"], "no such script: missing.py"),
    (["empty_folder"], "no .py file that imports lightning_support in that folder"),
    ([str(TEMPLATES / "tabular.py"), "--config", "missing.yaml"], "no such config"),
])
def test_smoke_test_bad_usage(tmp_path, args, expected):
    (tmp_path / "empty_folder").mkdir()
    assert_one_error_line(script("smoke_test.py", *args, cwd=tmp_path), expected)


def test_a_folder_of_several_templates_names_them(tmp_path):
    for name in ("tabular.py", "causal_lm.py"):
        shutil.copyfile(TEMPLATES / name, tmp_path / name)
    error = assert_one_error_line(script("smoke_test.py", tmp_path, cwd=tmp_path), "several templates")
    assert "causal_lm.py, tabular.py" in error and "--script" in error


@pytest.mark.parametrize("args, expected", [(["missing.py"], "no such script"),
    ([str(TEMPLATES / "tabular.py"), "--config", "missing.yaml"], "no such config")])
def test_bad_input_is_one_line_and_changes_no_file(args, expected, tmp_path):
    assert_bad_input_changes_nothing(SCRIPTS / "smoke_test.py", args, expected, tmp_path)
