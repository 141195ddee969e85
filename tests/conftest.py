"""Shared helpers: paths, the file list the Hermes client installs, and subprocess runners for templates."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "templates"
CONFIGS = TEMPLATES / "configs"

# Options that make every real training run small and quiet without changing what it exercises.
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


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


def run(cmd: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs a command, returns the completed process with text output (stdout and stderr kept apart)."""
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_template(name: str, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, TEMPLATES / name, *args], cwd=cwd, timeout=timeout)


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


def final_val_loss(output: str) -> dict:
    """{rank: val_loss} from the lines causal_lm.py's ranks print after fit."""
    return {int(r): float(v) for r, v in re.findall(r"rank (\d+): step \d+ val_loss=([0-9.]+)", output)}


def load_ckpt(path: Path) -> dict:
    """A checkpoint as torch.load reads it with weights_only=True: tensors and plain values only."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def logged_steps(save_dir: Path, key: str = "train_loss") -> list:
    """Steps that logged `key` in the newest CSVLogger version under save_dir."""
    import csv

    versions = sorted((save_dir / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    return [int(r["step"]) for r in csv.DictReader(open(versions[-1] / "metrics.csv")) if r.get(key)]


def load_module(path: Path, name: str):
    """Imports a script or template by path (they are files to copy, not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request):
    if request.node.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
