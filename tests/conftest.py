"""Shared test helpers: paths, the one subprocess runner, tiny models and tables, and the callbacks tests inject.

Markers: `gpu` (needs CUDA; skipped without it) and `slow` (fault injection, several processes, long runs):
`python -m pytest -m "not slow"` is the quick pass.

Templates load the callbacks at the end of this file by class path (`conftest.KillAfterEpoch`) from a config file,
with this folder on PYTHONPATH (run(..., tests_on_path=True)), so the command under test is the template's own.
"""

import csv
import gzip
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TEMPLATES = REPO / "templates"
CONFIGS = TEMPLATES / "configs"
SCRIPTS = REPO / "scripts"
ASSETS = REPO / "assets"

# Test files run in parallel (pyproject's addopts): one torch thread per process then, or the workers' threads
# outnumber the cores and every run slows down (the runs here are tiny; their results do not depend on it).
PARALLEL = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1"
THREADS = ["OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"] if PARALLEL else []

# Options that make every real training run quiet without changing what it exercises.
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
CSV_LOGS = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
            "--trainer.log_every_n_steps", "1"]


def shipped_files() -> list:
    """Relative paths the Hermes client copies: the repository's files minus dotfiles and caches."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        paths = [Path(p) for p in listed.stdout.splitlines()]
    else:  # not a git checkout: everything on disk
        paths = [p.relative_to(REPO) for p in REPO.rglob("*") if p.is_file()]
    return sorted(p for p in paths if (REPO / p).is_file() and not any(
        part.startswith(".") or part == "__pycache__" for part in p.parts) and p.suffix != ".pyc")


# ---- running things as a user runs them ---------------------------------------------------------------------------
def run(cmd: list, cwd: Path, timeout: float = 600, env: tuple = (), unset: tuple = (), tests_on_path: bool = False,
        new_session: bool = False) -> subprocess.CompletedProcess:
    """Runs a command; stdout and stderr kept apart. Variables are set (env, "NAME=value") or unset through the
    `env` program, so this process keeps its own environment; tests_on_path lets a template load this folder's
    callbacks by class path."""
    prefix = [*[f"--unset={name}" for name in unset], *([f"PYTHONPATH={TESTS}"] if tests_on_path else []), *THREADS,
              *env]
    cmd = [str(c) for c in (["env", *prefix] if prefix else []) + list(cmd)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          start_new_session=new_session, preexec_fn=terminal_ctrl_c)


def terminal_ctrl_c() -> None:
    """Ctrl-C as in a terminal: a test run started as a background job (`pytest &`) passes SIGINT on ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_template(name: str, *args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, TEMPLATES / name, *args], cwd=cwd, **kwargs)


def run_script(name: str, *args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, SCRIPTS / name, *args], cwd=cwd, **kwargs)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n" \
                                   f"{result.stderr[-5000:]}"


def assert_one_error_line(result: subprocess.CompletedProcess, expected: str, code: int = 2) -> str:
    """Exit `code` (2: usage), no traceback, and exactly one error line that says what is wrong (info lines may
    precede it); returns that line."""
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    return errors[0]


def refused_in_process(main, args: list, capsys) -> str:
    """A template's main(args) in this process: exit 2 and one error line, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1, (args, errors)
    return errors[0]


def run_exported(folder: Path, *inputs) -> tuple:
    """(outputs, whether lightning was imported) of an `export`ed model.pt2 run on inputs by a process that imports
    torch alone, as wherever the model is served."""
    import torch

    torch.save(inputs, folder.parent / "inputs.pt")
    code = ("import json, sys, torch; model = torch.export.load(sys.argv[1]).module()\n"
            "out = model(*torch.load(sys.argv[2])); print(json.dumps(out.tolist()), 'lightning' in sys.modules)")
    done = run([sys.executable, "-c", code, folder / "model.pt2", folder.parent / "inputs.pt"], cwd=folder.parent)
    assert_ok(done)
    values, imported = done.stdout.rsplit(" ", 1)
    return torch.tensor(json.loads(values)), imported.strip() == "True"


def load_module(path: Path, name: str):
    """Imports a script or template by path (they are files to copy, not a package); a template finds its support
    module in its own folder, as it does when run."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def template_main(monkeypatch):
    """main() of a template loaded in this process, as if launched as a script: args come only from main(args)."""
    def load(name: str):
        monkeypatch.setattr(sys, "argv", [name])
        return load_module(TEMPLATES / name, f"{name[:-3]}_in_process").main

    return load


# ---- what runs leave behind ----------------------------------------------------------------------------------------
def load_ckpt(path: Path) -> dict:
    """A checkpoint as torch.load reads it with weights_only=True: tensors and plain values only."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def logged_rows(save_dir: Path) -> list:
    """The rows of the newest CSVLogger metrics.csv under save_dir."""
    versions = sorted((save_dir / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    with open(versions[-1] / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged_steps(save_dir: Path, key: str = "train_loss") -> list:
    """Steps that logged `key` in the newest CSVLogger version under save_dir."""
    return [int(r["step"]) for r in logged_rows(save_dir) if r.get(key)]


def final_val_loss(output: str) -> dict:
    """{rank: val_loss} from the lines causal_lm.py's ranks print after fit."""
    return {int(r): float(v) for r, v in re.findall(r"rank (\d+): step \d+ val_loss=([0-9.]+)", output)}


def kept_line(stdout: str) -> dict:
    """fit's `best <monitor>=V (epoch E, step S; other=V, ...) checkpoint=PATH` line, as a dict."""
    match = re.search(r"^best (\w+)=([0-9.]+) \(epoch (\d+), step (\d+)(?:; ([^)]*))?\) checkpoint=(\S+)$", stdout,
                      re.MULTILINE)
    assert match, f"no 'best ...' line in:\n{stdout[-2000:]}"
    others = dict(item.split("=") for item in (match.group(5) or "").split(", ") if item)
    return {match.group(1): float(match.group(2)), "epoch": int(match.group(3)), "step": int(match.group(4)),
            **{k: float(v) for k, v in others.items()}, "checkpoint": match.group(6)}


def consolidate_and_validate(sharded: Path, cwd: Path) -> tuple:
    """One file from a sharded causal_lm.py checkpoint folder by Lightning's own utility (lightning.pytorch's twin
    expects FSDPStrategy's layout: KeyError 'model'), then a one-process validate of it: (file, val_loss)."""
    single = cwd / "model.ckpt"
    assert_ok(run([sys.executable, "-m", "lightning.fabric.utilities.consolidate_checkpoint", sharded,
                   "--output_file", single], cwd=cwd))
    validated = run_template("causal_lm.py", "validate", "--ckpt_path", single, "--trainer.limit_val_batches", "4",
                             "--trainer.default_root_dir", "validate", *QUIET, cwd=cwd)
    assert_ok(validated)
    return single, float(re.search(r"val_loss\W+([0-9.]+)", validated.stdout).group(1))


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# ---- small data and tiny models -------------------------------------------------------------------------------------
# A word-level tokenizer for tiny random Hugging Face models saved with save_pretrained (offline tests).
WORDS = ["the", "a", "film", "movie", "plot", "was", "is", "great", "superb", "lovely", "awful", "dull", "bad", "."]


def save_tiny_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[EOS]")
    fast.save_pretrained(folder)
    return len(vocab)


def write_reviews(path, n=240):
    """Short reviews in WORDS, labelled pos/neg, in columns review and sentiment."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i in range(n):
            good = i % 2 == 0
            adjective = ["great", "superb", "lovely"][i % 3] if good else ["awful", "dull", "bad"][i % 3]
            noun = ["film", "movie", "plot"][int(torch.randint(0, 3, (1,), generator=gen))]
            writer.writerow([f"the {noun} was {adjective} .", "pos" if good else "neg"])


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny BERT sequence classifier and its tokenizer, saved with save_pretrained."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = save_tiny_tokenizer(folder)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama and its tokenizer, saved with save_pretrained in float16 (as Llama-2 and many others are)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    vocab = save_tiny_tokenizer(folder)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    return folder


def save_tiny_backbone(folder: Path, kind: str = "resnet") -> Path:
    """A tiny random image classifier saved with save_pretrained, with the processor config its family ships:
    resnet (ConvNeXt-style: shortest edge 32, crop_pct 0.875, ImageNet statistics, bicubic) or vit (squashed to
    24 x 24, mean and std 0.5, bilinear: a ViT refuses any other input size)."""
    import torch
    from transformers import AutoModelForImageClassification, ResNetConfig, ViTConfig

    if kind == "resnet":
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic")
        processor = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 32},
                     "crop_pct": 0.875, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
                     "image_std": [0.229, 0.224, 0.225]}
    else:
        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=24, patch_size=8)
        processor = {"image_processor_type": "ViTImageProcessor", "size": {"height": 24, "width": 24},
                     "resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny_resnet"), "resnet")


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny_vit"), "vit")


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> Path:
    """400 of the embedded digits: 60 validation rows, where accuracy ties from the first epochs on."""
    path = tmp_path_factory.mktemp("small") / "small.csv"
    with gzip.open(ASSETS / "digits.csv.gz", "rt") as f:
        rows = list(csv.reader(f))[:401]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    if PARALLEL:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request):
    if request.node.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


# ---- callbacks the tests load into template runs by class path (conftest.NAME) ------------------------------------
def callback_config(path: Path, name: str, **init_args) -> Path:
    """A config file that adds one callback of this file to the Trainer."""
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": f"conftest.{name}",
                                                               "init_args": init_args}]}}))
    return path


class KillAfterEpoch(Callback):
    """kill -9 of this process right after the checkpoints of `epoch` (0-based) are written: when the next epoch
    starts (they are written in on_train_epoch_end, after every callback that does not monitor a metric)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch + 1:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(Callback):
    """kill -9 of this process in the middle of the first checkpoint save of `epoch` (0-based): the file is written
    under its staging name, and the process dies where the rename into place would be."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.current_epoch == self.epoch:
            os.replace = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(Callback):
    """Sends `signal_name` when `step` optimizer steps are done: to this process, or to its whole process group
    (every rank of a multi-process run; the test must start the run in a session of its own)."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1", process_group: bool = False):
        self.step = step
        self.signal = getattr(signal, signal_name)
        self.process_group = process_group

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        if not self.process_group:
            os.kill(os.getpid(), self.signal)
        elif os.getpgrp() == os.getpid():  # this run leads its own group: the test is not in it
            os.killpg(os.getpgrp(), self.signal)
        else:
            raise RuntimeError("process_group=True needs a run started in its own session (start_new_session=True)")


class RaiseInTrainingStep(Callback):
    """Makes the LightningModule's training_step raise when `step` optimizer steps are done, in the batch numbered
    `micro_batch` (from 0) of that step's gradient-accumulation group."""

    def __init__(self, step: int, micro_batch: int = 0):
        self.step = step
        self.micro_batch = micro_batch

    def setup(self, trainer, pl_module, stage):
        original = pl_module.training_step
        batches_of_step = []

        def training_step(*args, **kwargs):
            if trainer.global_step == self.step:
                batches_of_step.append(1)
                if len(batches_of_step) > self.micro_batch:
                    raise RuntimeError(f"injected failure in training_step at step {self.step}")
            return original(*args, **kwargs)

        pl_module.training_step = training_step


class PrintRunFacts(Callback):
    """Not a failure: prints, on every rank, the metrics the run ends with and the float32 matmul precision in force,
    as one line `rank R: {json}` (one write, so the ranks' lines do not interleave)."""

    def on_train_end(self, trainer, pl_module):
        import torch

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        facts = {"metrics": metrics, "matmul_precision": torch.get_float32_matmul_precision()}
        if torch.cuda.is_available():  # what the run's tensors took at most, GB of 1e9 bytes
            facts["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        sys.stdout.write(f"rank {trainer.global_rank}: {json.dumps(facts)}\n")
        sys.stdout.flush()


def run_facts(output: str) -> dict:
    """{rank: facts} from PrintRunFacts' lines."""
    return {int(r): json.loads(f) for r, f in re.findall(r"^rank (\d+): (\{.*\})$", output, re.MULTILINE)}


def assert_ddp_ranks_agree(template: str, args: list, tmp_path: Path) -> dict:
    """A 2-process CPU DDP run of a template: no sync_dist warning, and every epoch-level value (all but this rank's
    last training loss) the same on both ranks. Returns rank 0's metrics."""
    facts_config = callback_config(tmp_path / "facts.yaml", "PrintRunFacts")
    result = run_template(template, "fit", "--config", CONFIGS / "ddp.yaml", "--trainer.accelerator", "cpu",
                          "--trainer.devices", "2", "--trainer.precision", "32-true", "--config", facts_config,
                          *args, *QUIET, cwd=tmp_path, tests_on_path=True)
    assert_ok(result)
    assert "sync_dist" not in result.stderr, result.stderr[-3000:]
    facts = run_facts(result.stdout)
    assert sorted(facts) == [0, 1], result.stdout[-2000:]
    epoch_level = {k for k in facts[0]["metrics"] if k != "train_loss" and not k.startswith("train/")}
    assert "val_loss" in epoch_level
    for key in epoch_level:
        assert facts[0]["metrics"][key] == facts[1]["metrics"][key], (key, facts)
    return facts[0]["metrics"]


def assert_bad_input_changes_nothing(script: Path, args: list, expected: str, folder: Path) -> None:
    """A script given bad input in `folder` (which holds existing.txt and an empty run folder, empty_run/): exit 2,
    one error line holding `expected`, and no file added or changed."""
    (folder / "existing.txt").write_text("keep me\n")
    (folder / "empty_run").mkdir(exist_ok=True)
    before = snapshot(folder)
    assert_one_error_line(run([sys.executable, script, *args], cwd=folder, timeout=120), expected)
    assert snapshot(folder) == before and (folder / "existing.txt").read_text() == "keep me\n"
