"""causal_lm.py and transformers_finetune.py on CPU: training, multi-process strategies, configs, launch files.

Hugging Face models and tokenizers are built tiny and random, saved with save_pretrained, and loaded by the
templates with from_pretrained: the real loading code, offline.
"""

import copy
import csv
import gzip
import json
import pickle
import re
import shlex
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Union

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import grad_norm
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from conftest import (CONFIGS, QUIET, REPO, TEMPLATES, assert_ok, assert_one_error_line, consolidate_and_validate,
                      final_val_loss, load_ckpt, load_module, run, run_template, save_tiny_tokenizer)

LAUNCH = TEMPLATES / "launch"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = save_tiny_tokenizer(folder)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    vocab = save_tiny_tokenizer(folder)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_reviews(path, n=240):
    gen = torch.Generator().manual_seed(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i in range(n):
            good = i % 2 == 0
            adjective = ["great", "superb", "lovely"][i % 3] if good else ["awful", "dull", "bad"][i % 3]
            noun = ["film", "movie", "plot"][int(torch.randint(0, 3, (1,), generator=gen))]
            writer.writerow([f"the {noun} was {adjective} .", "pos" if good else "neg"])


# ---- transformers_finetune.py ------------------------------------------------------------------------------------
def test_finetune_default_trains_out_of_the_box(tmp_path):
    """Then scores a whole held-out file (test), labels new texts (predict: predictions.csv with class names), and
    refuses a held-out file passed as the training data: its word vocabulary (or classes) would be another."""
    result = run_template("transformers_finetune.py", "fit", "--trainer.max_epochs", "4", *QUIET, cwd=tmp_path)
    assert_ok(result)
    acc = float(re.search(r"^best val_loss=.*val_acc=([0-9.]+)", result.stdout, re.M).group(1))
    assert acc >= 0.9

    with gzip.open(REPO / "assets" / "sentiment.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))[:30]
    with open(tmp_path / "held_out.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *[[r["text"], r["label"]] for r in rows]])
    with open(tmp_path / "new.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text"], *[[r["text"]] for r in rows]])
    best = ["--ckpt_path", str(tmp_path / "runs" / "transformers_finetune" / "checkpoints" / "best.ckpt"), *QUIET]
    tested = run_template("transformers_finetune.py", "test", "--data.test_path", "held_out.csv", *best, cwd=tmp_path)
    assert_ok(tested)
    assert float(re.search(r"test_acc\D+([0-9]\.[0-9]+)", tested.stdout).group(1)) >= 0.8
    predicted = run_template("transformers_finetune.py", "predict", "--data.predict_path", "new.csv", *best,
                             cwd=tmp_path)
    assert_ok(predicted)
    with open(tmp_path / re.search(r"predictions written to (\S+)", predicted.stdout).group(1)) as f:
        written = list(csv.DictReader(f))
    assert [int(r["line"]) for r in written] == list(range(2, 32))  # CSV lines, the header being line 1
    right = sum(w["prediction"] == r["label"] for w, r in zip(written, rows))
    assert right >= 24 and {w["label"] for w in written} == {""}
    refused = run_template("transformers_finetune.py", "validate", "--data.data_path", "held_out.csv", *best,
                           cwd=tmp_path)
    assert "keep the training file as --data.data_path" in assert_one_error_line(refused, "the checkpoint was trained")

    ckpt = load_ckpt(tmp_path / "runs" / "transformers_finetune" / "checkpoints" / "best.ckpt")
    assert ckpt["hyper_parameters"]["class_names"] == ["negative", "positive"]
    module = load_module(TEMPLATES / "transformers_finetune.py", "finetune_export")
    model = module.TextClassifier.load_from_checkpoint(best[1], weights_only=True).model  # what save_pretrained writes
    assert model.config.id2label == {0: "negative", 1: "positive"}  # pipeline() names the classes


def test_finetune_pretrained_folder_loss_falls(tmp_path, tiny_bert):
    write_reviews(tmp_path / "reviews.csv")
    result = run_template("transformers_finetune.py", "fit", "--model.name_or_path", tiny_bert,
                          "--model.learning_rate", "3e-3", "--data.data_path", "reviews.csv",
                          "--data.text_column", "review", "--data.label_column", "sentiment",
                          "--trainer.max_epochs", "6", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                          "--trainer.logger.save_dir", "logs", "--trainer.log_every_n_steps", "1", *QUIET,
                          cwd=tmp_path)
    assert_ok(result)
    assert "in eval mode at the start of training" not in result.stderr  # from_pretrained's eval mode: no dropout
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"train loss {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first
    assert float(re.search(r"^best val_loss=.*val_acc=([0-9.]+)", result.stdout, re.M).group(1)) >= 0.9


def test_finetune_fast_dev_run_with_jsonl(tmp_path, tiny_bert):
    """Three classes for a model saved with a two-class head: the head is replaced, the body kept."""
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(40):
            text = ["the film was great .", "the plot was dull .", "it was a film ."][i % 3]
            f.write(json.dumps({"text": text, "label": i % 3}) + "\n")
    result = run_template("transformers_finetune.py", "fit", "--model.name_or_path", tiny_bert, "--data.data_path",
                          "data.jsonl", "--trainer.fast_dev_run", "true", *QUIET, cwd=tmp_path)
    assert_ok(result)


@pytest.mark.parametrize("model_type", ["gpt", "gpt2"])
def test_a_block_longer_than_a_learned_position_table_is_refused(model_type, tmp_path):
    """Not an IndexError deep in an embedding lookup (rotary models only get a warning)."""
    result = run_template("causal_lm.py", "fit", "--model.model_type", model_type, "--data.block_size", "2048",
                          "--trainer.fast_dev_run", "true", *QUIET, cwd=tmp_path)
    assert_one_error_line(result, "longer than the model's 1024 positions")


# ---- causal_lm.py ------------------------------------------------------------------------------------------------
def test_causal_lm_fast_dev_run_default(tmp_path):
    assert_ok(run_template("causal_lm.py", "fit", "--trainer.fast_dev_run", "true", *QUIET, cwd=tmp_path))


def test_causal_lm_overfits_tiny_corpus(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 120)
    result = run_template("causal_lm.py", "fit", "--data.data_path", "corpus.txt", "--data.block_size", "64",
                          "--data.val_fraction", "0.1", "--trainer.max_steps", "120", "--trainer.val_check_interval",
                          "40", *QUIET, cwd=tmp_path)
    assert_ok(result)
    loss = final_val_loss(result.stdout)[0]
    print(f"val_loss after 120 steps: {loss:.3f} (uniform over bytes: {torch.log(torch.tensor(256.0)):.2f})")
    assert loss < 0.5  # bar: a memorized repeating sentence
    # the documented sampling line, greedy: the memorized sentence comes back
    code = ("from causal_lm import sample; print(repr(sample('runs/causal_lm/checkpoints/best.ckpt', 'the quick b',"
            " 60, temperature=0)))")
    sampled = run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TEMPLATES)!r}); {code}"], cwd=tmp_path)
    assert_ok(sampled)
    assert "fox jumps over the lazy dog. the quick brown fox" in sampled.stdout, sampled.stdout


def test_causal_lm_trains_on_a_token_file_as_on_its_text(tmp_path):
    """A .npy of the ids the template's byte tokenizer gives a text (memory-mapped, read by 2 DataLoader workers)
    trains to the same weights as the text itself: same blocks, same split, same order."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    np.save(tmp_path / "tokens.npy", np.array(list(text.encode()) + [10], dtype=np.uint16))  # a newline ends it
    common = ["--data.block_size", "32", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
              "--model.model_config", '{"vocab_size": 256}', *QUIET]  # the token file's own vocabulary is 123 ids
    for name, data in (("text", ["--data.data_path", "corpus.txt"]),
                       ("tokens", ["--data.data_path", "tokens.npy", "--data.num_workers", "2"])):
        assert_ok(run_template("causal_lm.py", "fit", *data, *common, "--trainer.default_root_dir", name,
                               cwd=tmp_path))
    text_run, token_run = (load_ckpt(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("text", "tokens"))
    assert token_run["global_step"] == 6
    assert all(torch.equal(token_run["state_dict"][k], w) for k, w in text_run["state_dict"].items())


def test_a_token_file_reaches_spawned_workers_as_its_path_not_its_tokens(tmp_path, monkeypatch):
    """DataLoader workers started by spawn (macOS, Windows) receive the dataset pickled: the memory map must travel
    as its path, not as a copy of the corpus, and the worker must map the file again."""
    monkeypatch.syspath_prepend(str(TEMPLATES))
    import causal_lm  # by name, as a spawned worker imports it

    np.save(tmp_path / "tokens.npy", np.arange(1_000_000, dtype=np.uint32) % 50_000)
    data = causal_lm.TextData(data_path=str(tmp_path / "tokens.npy"), block_size=64)
    data.setup("fit")
    assert data.vocab_size == 50_000 and len(data.train_set) == (950_000 - 1) // 64
    shipped = pickle.dumps(data.train_set)  # what the worker receives
    assert len(shipped) < 10_000, f"{len(shipped):,} bytes"
    loader = DataLoader(data.train_set, batch_size=2, sampler=[100, 101], num_workers=1,
                        multiprocessing_context="spawn")
    x, y = next(iter(loader))
    assert torch.equal(x, torch.arange(6400, 6528).view(2, 64)) and torch.equal(y, x + 1)


@pytest.mark.parametrize("content, expected", [
    (b"", "as token ids (No data left in file)"),  # an interrupted write
    ("npz", "as token ids: save a 1-D integer array"),  # numpy.savez's archive under a .npy name
    (np.array([3, -1, 5], dtype=np.int32), "holds negative token ids"),
    (np.array([3, 20, 5], dtype=np.uint16), "holds token id 20, outside the 20 tokens of"),  # the tokenizer's ids: 0-19
])
def test_a_token_file_that_cannot_be_right_is_refused(tmp_path, content, expected):
    lm = load_module(TEMPLATES / "causal_lm.py", "causal_lm_refusals")
    path = tmp_path / "tokens.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        with open(path, "wb") as f:  # a file object: given a name, savez would add ".npz"
            np.savez(f, ids=np.arange(10))
    else:
        np.save(path, content)
    assert save_tiny_tokenizer(tmp_path / "tokenizer") == 20
    with pytest.raises(lm.ConfigError, match=re.escape(expected)):
        lm.TextData(data_path=str(path), tokenizer=str(tmp_path / "tokenizer"))


def test_causal_lm_pretrained_folder(tmp_path, tiny_llama):
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"body": "the film was great . " * 8}) + "\n"
                                                   for _ in range(30)))
    result = run_template("causal_lm.py", "fit", "--model.name_or_path", tiny_llama, "--data.data_path",
                          "corpus.jsonl", "--data.text_field", "body", "--data.block_size", "16",
                          "--trainer.max_steps", "10", "--trainer.val_check_interval", "5", *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert final_val_loss(result.stdout)[0] < 3.0
    assert "in eval mode at the start of training" not in result.stderr


def test_causal_lm_ddp_two_processes(tmp_path):
    result = run_template("causal_lm.py", "fit", "--config", CONFIGS / "ddp.yaml", "--trainer.accelerator", "cpu",
                          "--trainer.devices", "2", "--trainer.precision", "32-true", "--trainer.max_steps", "4",
                          "--trainer.val_check_interval", "2", *QUIET, cwd=tmp_path, timeout=600)
    assert_ok(result)
    losses = final_val_loss(result.stdout)
    assert set(losses) == {0, 1} and losses[0] == losses[1]  # sync_dist: every rank sees the same val_loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_simulated_two_node_torchrun(tmp_path):
    """launch/torchrun.sh on two "machines" (node ranks 0 and 1 on this one), in a project made by scaffold.py: the
    project's config.yaml (model, data, run length) is used, with multinode.yaml's DDP trainer settings over it."""
    made = run([sys.executable, REPO / "scripts" / "scaffold.py", "causal_lm", "proj", "--hardware", "none",
                "--set", "data.block_size=32", "--set", "trainer.max_steps=4", "--set", "trainer.val_check_interval=2"],
               cwd=tmp_path)
    assert_ok(made)
    port, bin_dir = free_port(), shlex.quote(str(Path(sys.executable).parent))  # bin_dir: this venv's torchrun
    procs = [subprocess.Popen(["bash", "-c", f'PATH={bin_dir}:"$PATH" NNODES=2 NPROC=1 NODE_RANK={rank}'
                               f' MASTER_ADDR=127.0.0.1 MASTER_PORT={port} bash launch/torchrun.sh "$@"', "torchrun.sh",
                               "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", *QUIET],
                              cwd=tmp_path / "proj", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    loss0, loss1 = final_val_loss(outputs[0]), final_val_loss(outputs[1])
    assert set(loss0) == {0} and set(loss1) == {1} and loss0[0] == loss1[1]
    assert "MEMBER: 2/2" in outputs[1]
    ckpt = load_ckpt(tmp_path / "proj" / "runs" / "causal_lm" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["datamodule_hyper_parameters"]["block_size"] == 32  # config.yaml's


# ---- configs and launch files ------------------------------------------------------------------------------------
def build_strategy(config_name: str):
    """Instantiates the config's trainer.strategy the way LightningCLI does (no Trainer, so no GPU needed)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Union[str, Strategy])
    strategy = yaml.safe_load((CONFIGS / config_name).read_text())["trainer"]["strategy"]
    return parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy


def test_fsdp_configs_build_their_strategy():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    fsdp = build_strategy("fsdp.yaml")
    assert isinstance(fsdp, FSDPStrategy) and fsdp._state_dict_type == "sharded"
    fsdp2 = build_strategy("fsdp2.yaml")
    assert isinstance(fsdp2, ModelParallelStrategy)


@pytest.mark.parametrize("name, stage, offload", [("deepspeed_stage_2.yaml", 2, False),
                                                  ("deepspeed_stage_3_offload.yaml", 3, True)])
def test_deepspeed_configs_name_registered_strategies(name, stage, offload):
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = build_strategy(name)
    assert strategy in StrategyRegistry, strategy
    init = StrategyRegistry[strategy]["init_params"]
    assert init["stage"] == stage and bool(init.get("offload_optimizer")) == offload


@pytest.mark.parametrize("config, expected", [
    ("fsdp.yaml", "strategy `fsdp` requires a GPU accelerator"),
    ("deepspeed_stage_2.yaml", "you must have DeepSpeed installed"),
    ("deepspeed_stage_3_offload.yaml", "you must have DeepSpeed installed"),
    ("fsdp2.yaml", "must equal devices x num_nodes = 1"),  # runs on CPU, but 8 shards need 8 processes
])
def test_strategy_that_cannot_run_here_is_one_clear_line(tmp_path, config, expected):
    result = run_template("causal_lm.py", "fit", "--config", CONFIGS / config, "--trainer.accelerator", "cpu",
                          "--trainer.devices", "1", cwd=tmp_path)
    assert_one_error_line(result, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("config, model_type", [("gpu.yaml", "llama"), ("fsdp.yaml", "llama"), ("gpu.yaml", "gpt"),
                                                ("fsdp.yaml", "gpt")])
def test_gpu_training(tmp_path, config, model_type):
    result = run_template("causal_lm.py", "fit", "--config", CONFIGS / config, "--model.model_type", model_type,
                          "--trainer.devices", "1", "--model.compile", "true", "--trainer.max_steps", "20",
                          "--trainer.val_check_interval", "10", "--throughput.window_size", "2",  # 2 logging steps
                          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                          "logs", *QUIET, cwd=tmp_path, timeout=600)
    assert_ok(result)
    header = open(next((tmp_path / "logs").rglob("metrics.csv"))).readline()
    assert "train/device/items_per_sec" in header and "train/device/mfu" in header


@pytest.mark.gpu
@pytest.mark.parametrize("template", ["classifier.py", "transformers_finetune.py"])
def test_gpu_training_other_templates(tmp_path, template):
    """bf16-mixed on the GPU, with each template's own clipping and optimizer: the shipped defaults train there."""
    result = run_template(template, "fit", "--config", CONFIGS / "gpu.yaml", "--trainer.max_epochs", "3", *QUIET,
                          cwd=tmp_path, timeout=600)
    assert_ok(result)
    assert float(re.search(r"^best val_loss=.*val_acc=([0-9.]+)", result.stdout, re.M).group(1)) >= 0.8


def test_slurm_launch_file_matches_its_config():
    text = (LAUNCH / "slurm.sbatch").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    srun = shlex.split(re.search(r"^srun (.+)$", text, re.M).group(1))
    flags = dict(zip(srun[::1], srun[1::1]))
    assert flags["fit"] == "${CONFIGS[@]}"  # the project's config.yaml when there is one, then multinode.yaml
    cluster = re.search(r"^CONFIGS=\(--config (\S+)\)$", text, re.M).group(1)
    config = yaml.safe_load((CONFIGS / cluster.split("/")[-1]).read_text())["trainer"]
    nodes = int(flags.get("--trainer.num_nodes", config["num_nodes"]))
    devices = int(flags.get("--trainer.devices", config["devices"]))
    assert int(sbatch["nodes"]) == nodes == config["num_nodes"]
    assert int(sbatch["ntasks-per-node"]) == devices == config["devices"]
    assert sbatch["gres"] == f"gpu:{devices}" and sbatch["signal"] == "SIGUSR1@90"
    assert (TEMPLATES / srun[1]).is_file()


def test_torchrun_launch_file_is_valid_bash_and_matches_config():
    path = LAUNCH / "torchrun.sh"
    assert run(["bash", "-n", path], cwd=LAUNCH).returncode == 0
    text = path.read_text()
    assert '--trainer.num_nodes "$NNODES"' in text and '--trainer.devices "$NPROC"' in text
    assert '--nnodes "$NNODES"' in text and '--nproc-per-node "$NPROC"' in text
    missing = run(["bash", path], cwd=LAUNCH)  # refuses to start without a node rank
    assert missing.returncode != 0 and "NODE_RANK" in missing.stderr


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template, args, expected", [
    ("causal_lm.py", ["--data.data_path", "missing.txt"], "data not found"),
    ("causal_lm.py", ["--data.data_path", "c.jsonl", "--data.text_field", "content"], "no field 'content'"),
    ("causal_lm.py", ["--model.name_or_path", "./no_such_model"], "folder not found"),
    ("causal_lm.py", ["--data.data_path", "c.jsonl", "--data.block_size", "4096"], "too few for block_size"),
    ("causal_lm.py", ["--data.data_path", "f.npy"], "cannot read f.npy as token ids (it holds float32 values"),
    ("transformers_finetune.py", ["--data.data_path", "missing.csv"], "data not found"),
    ("transformers_finetune.py", ["--data.data_path", "r.csv", "--data.text_column", "body"], "no column 'body'"),
    ("transformers_finetune.py", ["--model.name_or_path", "./no_such_model"], "folder not found"),
    ("transformers_finetune.py", ["--data.data_path", "long.csv", "--data.max_length", "600"],
     "a text of 600 tokens exceeds the model's 512 positions"),
])
def test_bad_input_one_line_exit_2(tmp_path, template, args, expected):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    np.save(tmp_path / "f.npy", np.zeros(100, dtype=np.float32))  # embeddings, say, not token ids
    write_reviews(tmp_path / "r.csv", n=10)
    (tmp_path / "long.csv").write_text("text,label\n" + "short,a\n" * 9 + "word " * 700 + ",b\n")
    result = run_template(template, "fit", *args, "--trainer.fast_dev_run", "true", cwd=tmp_path)
    assert_one_error_line(result, expected)


def test_a_corpus_folder_is_read_as_the_user_left_it(tmp_path):
    """Upper-case and .markdown suffixes are read, hidden folders skipped, a byte-order mark dropped; a file in
    another encoding is refused by name (it trained as U+FFFD characters before)."""
    lm = load_module(TEMPLATES / "causal_lm.py", "causal_lm_corpus")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a.md").write_text("a stale copy")
    (tmp_path / "README.TXT").write_bytes("\ufeffcafé au lait".encode("utf-8"))
    (tmp_path / "draft.markdown").write_text("# notes")
    data = lm.TextData(data_path=str(tmp_path), block_size=4)
    assert [f.name for f in data.files] == ["README.TXT", "draft.markdown"]
    assert list(data.documents()) == ["café au lait", "# notes"]
    (tmp_path / "letter.txt").write_bytes("\u201cna\u00efve\u201d".encode("cp1252"))
    with pytest.raises(lm.ConfigError, match=r"letter.txt is not UTF-8 text \(byte 0x93 at offset 0\)"):
        list(lm.TextData(data_path=str(tmp_path), block_size=4).documents())


@pytest.mark.parametrize("template", ["causal_lm.py", "transformers_finetune.py"])
def test_subcommands_without_a_step_are_one_line(template, tmp_path, monkeypatch, capsys):
    """test and predict are listed by LightningCLI: causal_lm.py has no such step, transformers_finetune.py needs the
    file to score or label: one line, exit 2, not a traceback; a short causal_lm run still validates at its end."""
    module = load_module(TEMPLATES / template, f"{template[:-3]}_subcommands")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [template])
    for subcommand in ("test", "predict"):
        with pytest.raises(SystemExit) as exit_info:
            module.main([subcommand])
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        expected = f"has no {subcommand} step" if template == "causal_lm.py" else f"needs --data.{subcommand}_path"
        assert len(errors) == 1 and expected in errors[0], errors
    if template == "causal_lm.py":
        cli = module.main(["--trainer.max_steps", "20", "--trainer.accumulate_grad_batches", "2"], run=False)
        assert cli.trainer.val_check_interval == 40  # batches, as val_check_interval counts them (default 50)


@pytest.mark.parametrize("template", ["classifier.py", "causal_lm.py", "transformers_finetune.py"])
def test_no_logger_drops_only_the_learning_rate_monitor(template, tmp_path):
    """--trainer.logger false: Lightning's LearningRateMonitor would raise at the start of fit (nothing to log to);
    the templates leave it out then, and only then."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    module = load_module(TEMPLATES / template, f"{template[:-3]}_no_logger")
    common = ["--trainer.default_root_dir", str(tmp_path)]
    for logger, monitors in (("false", 0), ("true", 1)):
        trainer = module.main(["--trainer.logger", logger, *common], run=False).trainer
        assert sum(isinstance(c, LearningRateMonitor) for c in trainer.callbacks) == monitors
        assert sum(isinstance(c, ModelCheckpoint) for c in trainer.callbacks) == 2  # best and last stay


def test_model_config_overrides_the_tiny_defaults_under_either_name():
    """GPT-2 names its width n_embd, an alias of the tiny default's hidden_size: the user's value must win."""
    lm = load_module(TEMPLATES / "causal_lm.py", "causal_lm_config")
    gpt2 = lm.load_or_build(None, "gpt2", {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304}, 256,
                            False, meta=True)
    assert (gpt2.config.n_layer, gpt2.config.n_embd, gpt2.config.vocab_size) == (12, 768, 50304)
    assert sum(p.numel() for p in gpt2.parameters()) == 124_475_904  # GPT-2 small with its vocabulary padded to 50304
    tiny = lm.load_or_build(None, "llama", {"hidden_size": 64, "num_attention_heads": 2}, 256, False, meta=True)
    assert (tiny.config.hidden_size, tiny.config.num_hidden_layers, tiny.config.vocab_size) == (64, 4, 256)
    finetune = load_module(TEMPLATES / "transformers_finetune.py", "finetune_config")
    distilbert = finetune.TextClassifier(vocab_size=40, model_type="distilbert",
                                         model_config={"dim": 64, "n_heads": 2, "hidden_dim": 128})
    distilbert.configure_model()
    assert (distilbert.model.config.dim, distilbert.model.config.n_layers) == (64, 2)  # dim wins, n_layers tiny


def gpt2_weights_for_builtin_gpt(hf_state: dict, n_layer: int) -> dict:
    """GPT2LMHeadModel's state dict under the built-in GPT's names (its Conv1D weights are stored transposed)."""
    names = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
             "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias",
             "lm_head.weight": "lm_head.weight"}
    state = {ours: hf_state[theirs] for ours, theirs in names.items()}
    for i in range(n_layer):
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2"), ("qkv", "attn.c_attn"), ("attn_out", "attn.c_proj"),
                             ("fc", "mlp.c_fc"), ("mlp_out", "mlp.c_proj")):
            weight = hf_state[f"transformer.h.{i}.{theirs}.weight"]
            state[f"blocks.{i}.{ours}.weight"] = weight if ours.startswith("ln") else weight.t()
            state[f"blocks.{i}.{ours}.bias"] = hf_state[f"transformer.h.{i}.{theirs}.bias"]
    return state


def test_builtin_gpt_is_gpt2():
    """model_type gpt computes what transformers' GPT2LMHeadModel computes, with the same parameter count; activation
    checkpointing leaves the gradients as they are; bias false drops every bias."""
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = load_module(TEMPLATES / "causal_lm.py", "causal_lm_gpt")
    torch.manual_seed(0)
    sizes = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=96, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **sizes)).eval()
    gpt = lm.build_gpt(sizes, 96).eval()
    gpt.load_state_dict(gpt2_weights_for_builtin_gpt(hf.state_dict(), 2), strict=True)
    x = torch.randint(0, 96, (2, 20))
    torch.testing.assert_close(gpt(x), hf(input_ids=x).logits, rtol=1e-5, atol=1e-5)

    gpt.train()
    gpt(x).sum().backward()
    plain = {name: p.grad.clone() for name, p in gpt.named_parameters()}
    gpt.zero_grad()
    gpt.activation_checkpointing = True
    gpt(x).sum().backward()
    for name, p in gpt.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-6)

    small = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304}
    builtin = lm.load_or_build(None, "gpt", small, 256, False, meta=True)
    assert sum(p.numel() for p in builtin.parameters()) == 124_475_904
    no_bias = lm.load_or_build(None, "gpt", {**small, "bias": False}, 256, False, meta=True)
    assert not any(name.endswith("bias") for name, _ in no_bias.named_parameters())
    with pytest.raises(lm.ConfigError, match="unknown model_config key"):
        lm.build_gpt({"n_embed": 64}, 256)

    deep = lm.build_gpt({"n_layer": 8, "n_head": 4, "n_embd": 256}, 256)  # GPT-2's init: residual std 0.02 / 4
    block = deep.blocks[3]
    assert abs(block.fc.weight.std().item() - 0.02) < 1e-3 and abs(block.mlp_out.weight.std().item() - 0.005) < 3e-4
    assert deep.lm_head.weight is deep.wte.weight and not block.qkv.bias.any()


def test_gpt2_small_recipe_builds_the_benchmarked_model(tmp_path, monkeypatch):
    """The GPT-2-small command of performance.md and of causal_lm.py's docstring (the one bench.py timed) parses, and
    builds a 12-layer, width-768 GPT without biases at batch 32 x 1024, compiled."""
    doc = (REPO / "references" / "performance.md").read_text()
    recipe = re.search(r"```bash\n(python causal_lm.py fit --config configs/gpu.yaml .*?)\n```", doc, re.S).group(1)
    docstring = (TEMPLATES / "causal_lm.py").read_text().split('"""')[1]
    words = lambda text: " ".join(text.replace("\\\n", " ").split())  # noqa: E731 (shell continuations joined)
    assert words(recipe) in words(docstring)
    args = shlex.split(words(recipe))[3:]  # after `python causal_lm.py fit`
    np.save(tmp_path / "tokens.npy", np.arange(40_000, dtype=np.uint16) % 50257)
    monkeypatch.chdir(tmp_path)
    args[args.index("configs/gpu.yaml")] = str(CONFIGS / "gpu.yaml")
    lm = load_module(TEMPLATES / "causal_lm.py", "causal_lm_recipe")
    cli = lm.main([*args, "--trainer.accelerator", "cpu"], run=False)
    data, hp = cli.datamodule.hparams, cli.model.hparams
    assert (data.batch_size, data.block_size, hp.model_type, hp.compile) == (32, 1024, "gpt", True)
    model = lm.load_or_build(None, hp.model_type, hp.model_config, cli.datamodule.vocab_size, False, meta=True)
    assert (len(model.blocks), model.wte.weight.shape) == (12, (50304, 768))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_sdpa_backend_selects_the_attention_kernel_that_runs():
    """--model.sdpa_backend sets PyTorch's fused-attention switches for the whole process, so the kernel chosen also
    runs in activation checkpointing's recomputation (a context around forward alone would not reach it). On CPU the
    profiler shows "math" replacing the default flash kernel, in the forward and the backward."""
    lm = load_module(TEMPLATES / "causal_lm.py", "causal_lm_sdpa")
    switches = [(torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
                (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
                (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp)]
    before = [enabled() for enabled, _ in switches]
    x, ran = torch.randint(0, 256, (2, 16)), {}
    try:
        for backend in (None, "math"):
            module = lm.CausalLM(model_type="gpt", sdpa_backend=backend, activation_checkpointing=True)
            module.configure_model()
            with torch.profiler.profile() as profile:
                module.loss(x, x).backward()
            ran[backend] = {e.name for e in profile.events() if e.name.startswith("aten::_scaled_dot_product")}
    finally:  # the switches are global: leave them as they were for the other tests in this process
        for (_, enable), value in zip(switches, before):
            enable(value)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ran[None]
    assert ran["math"] == {"aten::_scaled_dot_product_attention_math"}


def sdpa_calls_in_compiled_graph(fn, *args) -> list:
    """The arguments of every fused-attention call in the graph torch.compile captures (traced, not run by inductor)."""
    calls = []

    def record(graph_module, example_inputs):
        calls.extend(dict(n.kwargs) for n in graph_module.graph.nodes if "scaled_dot_product" in str(n.target))
        return graph_module

    torch.compile(fn, backend=record)(*args)
    return calls


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_transformers_causal_lms_attend_without_a_mask(model_type, monkeypatch):
    """transformers' mask code builds a batch x 1 x seq x seq mask under torch.compile (no flash kernels) and reads a
    value every eager forward. The template's models skip it and give the logits of transformers' eager attention;
    an attention mask passed later is refused, not ignored; a sliding-window model keeps its mask."""
    from transformers import AutoModelForCausalLM

    lm = load_module(TEMPLATES / "causal_lm.py", "causal_lm_attention")
    monkeypatch.setitem(sys.modules, lm.__name__, lm)  # importable, as a run script is: compile traces its hook
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2}
    torch.manual_seed(0)
    model = lm.load_or_build(None, model_type, sizes, 64, False).eval()
    stock, eager = (AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=name).eval()
                    for name in ("sdpa", "eager"))
    for other in (stock, eager):
        other.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == lm.CAUSAL_SDPA and stock.config._attn_implementation == "sdpa"
    model.config.use_cache = stock.config.use_cache = eager.config.use_cache = False  # as in configure_model
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(lm.logits_of(model, x), lm.logits_of(eager, x), rtol=0, atol=1e-5)
    calls = sdpa_calls_in_compiled_graph(lambda ids: model(input_ids=ids).logits, x)
    assert len(calls) == 2 and all(c.get("attn_mask") is None and c["is_causal"] for c in calls)
    assert sdpa_calls_in_compiled_graph(lambda ids: stock(input_ids=ids).logits, x)[0]["attn_mask"] is not None
    with pytest.raises(ValueError, match="set_attn_implementation"):
        model(input_ids=x, attention_mask=torch.ones_like(x))
    model.set_attn_implementation("sdpa")
    model(input_ids=x, attention_mask=torch.ones_like(x))  # the documented way back to masks
    sliding = lm.load_or_build(None, "mistral", {**sizes, "sliding_window": 8}, 64, False)
    assert sliding.config._attn_implementation == "sdpa"


def test_builtin_gpt_fsdp2_two_processes_consolidates_and_validates(tmp_path):
    """Tied input/output embeddings under FSDP2 with "auto" mesh sizes (one node: sharded over the tensor_parallel
    dimension): each process trains on its own half of the data; the sharded checkpoint consolidates with
    Lightning's utility and a one-process validate of that file gives the val_loss of the 2-process run."""
    result = run_template("causal_lm.py", "fit", "--model.model_type", "gpt", "--config", CONFIGS / "fsdp2.yaml",
                          "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
                          "--trainer.strategy.init_args.data_parallel_size", "auto",
                          "--trainer.strategy.init_args.tensor_parallel_size", "auto", "--trainer.max_steps", "4",
                          "--trainer.use_distributed_sampler", "false",  # both ranks validate what one process will
                          "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "4", *QUIET,
                          cwd=tmp_path, timeout=600)
    assert_ok(result)
    losses = final_val_loss(result.stdout)
    assert set(losses) == {0, 1} and losses[0] == losses[1]
    sharded = tmp_path / "runs" / "causal_lm" / "checkpoints" / "last.ckpt"
    _, processes, _ = load_ckpt(sharded / "meta.pt")["TextData"]["order"]  # the sampler's split
    assert processes == 2, f"the training data was split over {processes} process(es), not both"
    _, val_loss = consolidate_and_validate(tmp_path / "runs" / "causal_lm" / "checkpoints" / "last.ckpt", tmp_path)
    assert abs(val_loss - losses[0]) < 1e-4, (val_loss, losses[0])


# ---- throughput and MFU ------------------------------------------------------------------------------------------
def test_peak_flops_for_gpus_missing_from_lightnings_table():
    peak = load_module(TEMPLATES / "causal_lm.py", "causal_lm_template").missing_peak_tflops
    assert peak("NVIDIA H200", "bf16-mixed") == 989.0 and peak("NVIDIA H100", "bf16-mixed") == 989.0
    assert peak("NVIDIA B200", "bf16-mixed") == 2250.0 and peak("NVIDIA H200", "32-true") == 494.5
    assert peak("Tesla T4", "16-mixed") is None


class SlowSteps(Callback):
    """Makes every training batch take at least `seconds`: a known ceiling on the batches per second."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        time.sleep(self.seconds)


def test_throughput_logs_tokens_per_second_and_mfu_of_every_batch(tmp_path):
    """The monitor times training at logging steps and validation starts only (the path GPUs take, here on CPU). Its
    FLOPs must still cover every batch (FLOPs/s over tokens/s is measure_flops per token, MFU is FLOPs/s over the
    peak), and a validation between logging steps must not take the training batch before it out of the training
    time: with a window of 2 timings, that would show as 2 batches in the time of one, above the ceiling that
    0.1 s per batch sets (checkpoints are off here: their save time counts as training time and would hide it)."""
    lm = load_module(TEMPLATES / "causal_lm.py", "causal_lm_throughput")
    cli = lm.main(["--trainer.max_steps", "14", "--trainer.val_check_interval", "5", "--trainer.limit_val_batches",
                   "2", "--trainer.log_every_n_steps", "2", "--data.batch_size", "4", "--throughput.window_size", "2",
                   "--throughput.peak_tflops", "0.5", "--best_checkpoint.save_top_k", "0",
                   "--last_checkpoint.save_top_k", "0", "--last_checkpoint.save_last", "false",
                   "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                   str(tmp_path / "logs"), "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET],
                  run=False, callbacks=(SlowSteps(0.1),))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    rows = [r for r in csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv"))))
            if r.get("train/device/flops_per_sec")]
    batch, block = cli.datamodule.hparams.batch_size, cli.datamodule.hparams.block_size
    per_token = cli.model._measure_flops((batch, block)) / (batch * block)
    assert len(rows) >= 4
    for r in rows:
        tokens, flops = float(r["train/device/items_per_sec"]), float(r["train/device/flops_per_sec"])
        assert flops / tokens == pytest.approx(per_token, rel=1e-6)
        assert float(r["train/device/mfu"]) == pytest.approx(flops / 0.5e12, rel=1e-6)
        assert 0 < float(r["train/device/batches_per_sec"]) <= 10.0, r  # 0.1 s per batch at least


class HostReads(TorchFunctionMode, Callback):
    """Records every read of a tensor's value in Python during training steps, with its step and caller: on a GPU
    each one waits for the queued work to finish, so Lightning's per-step Python work would no longer overlap it.
    Left out: torch.optim's and the DataLoader's own host-side values (step counters, seeds, indices), and the NaN
    check, which reads on CPU at every step and on GPUs at logging steps only."""

    METHODS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}
    HOST_SIDE = ("/torch/optim/", "/torch/utils/data/")

    def __init__(self):
        super().__init__()
        self.step, self.reads = None, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.step is not None and getattr(func, "__name__", "") in self.METHODS:
            stack = traceback.extract_stack()[:-1]
            caller = stack[-1]
            if not any(s in caller.filename for s in self.HOST_SIDE) and not (
                    caller.name == "check" and caller.filename.endswith(("causal_lm.py", "classifier.py"))):
                self.reads.append((*self.step, func.__name__, [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                               for f in stack[-6:]]))
        return func(*args, **(kwargs or {}))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = (trainer.global_step, trainer._logger_connector.should_update_logs)  # this step logs

    def on_validation_start(self, trainer, pl_module):  # validation and epoch ends read once per interval, not step
        self.step = None

    on_train_epoch_end = on_validation_start


@pytest.mark.parametrize("template, args", [
    pytest.param("causal_lm.py", ["--model.model_type", "gpt", "--trainer.max_steps", "12", "--data.batch_size", "4"],
                 id="causal_lm-gpt"),
    pytest.param("causal_lm.py", ["--trainer.max_steps", "12", "--data.batch_size", "4"], id="causal_lm-llama"),
    pytest.param("classifier.py", ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "12"],
                 id="classifier")])
def test_training_steps_do_not_wait_for_the_device(tmp_path, template, args):
    """With the template's own logging and progress bar, only logging steps read a tensor value (Lightning hands
    the logged loss to the logger): the other steps queue their work without waiting, which is what lets the
    Trainer keep pace with a plain loop on a GPU (bench/bench.py measures that)."""
    module = load_module(TEMPLATES / template, f"{template[:-3]}_host_reads")
    reads = HostReads()
    cli = module.main([*args, "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path)],
                      run=False, callbacks=(reads,))
    with reads:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 12 and cli.trainer.log_every_n_steps == 10
    assert [r for r in reads.reads if not r[1]] == []
    assert {r[0] for r in reads.reads} == {9}  # the positive control: the one logging step reads the loss


class GradNorms(Callback):
    """The total gradient norm before clipping (on_before_optimizer_step runs first) and after the step."""

    def __init__(self):
        self.before, self.after = [], []

    @staticmethod
    def norm(module):
        return float(grad_norm(module, norm_type=2)["grad_2.0_norm_total"])

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.before.append(self.norm(module))

    def on_train_batch_end(self, trainer, module, *args):
        self.after.append(self.norm(module))


@pytest.mark.parametrize("template", ["causal_lm.py", "transformers_finetune.py"])
def test_gradients_are_clipped_with_a_fused_optimizer_under_bf16_mixed(tmp_path, template):
    """Lightning 2.6 raises at the first step when a fused AdamW meets gradient clipping under -mixed precision,
    the templates' GPU default: they clip in configure_gradient_clipping. Their AdamW is fused on CPU as well, so
    this runs the GPU's path."""
    module = load_module(TEMPLATES / template, f"{template[:-3]}_clipping")
    norms = GradNorms()
    cli = module.main(["--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "0.01",
                       "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                       "--trainer.default_root_dir", str(tmp_path)],
                      run=False, callbacks=(norms,))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 and cli.trainer.optimizers[0].defaults["fused"]
    assert min(norms.before) > 0.05  # the control: clipping had work to do
    assert norms.after == pytest.approx([0.01, 0.01], rel=1e-3)


def test_bench_tiny_compares_trainer_and_plain_loop(tmp_path):
    """bench/bench.py --tiny: the GPU benchmark's code on CPU, so it cannot rot; speed is read from its table, not
    asserted here."""
    result = run([sys.executable, TEMPLATES.parent / "bench" / "bench.py", "--tiny", "--peak-tflops", "1", "--format",
                  "json"], cwd=tmp_path)
    assert_ok(result)
    report = json.loads(result.stdout)
    assert [r["variant"] for r in report["rows"]] == ["plain PyTorch loop (gpt)", "causal_lm.py (gpt, Trainer)",
                                                      "classifier plain loop (CPU)", "classifier.py (Trainer, CPU)"]
    assert all(r["ms/step"] > 0 for r in report["rows"])
    checks = report["checks"]
    assert checks["loss_falls"] and checks["same_loss"]  # every step's loss, from the first on
    assert checks["final_loss_plain"] == checks["final_loss_trainer"]  # float32 on CPU: exactly equal
    assert abs(checks["classifier_val_acc_plain"] - checks["classifier_val_acc_trainer"]) < 1e-4
    assert abs(checks["flops_per_token_template"] / checks["flops_per_token_formula"] - 1) < 0.05
    # The template's logged MFU and the benchmark's, one run timed by two clocks (the tiny model's FLOPs formulas
    # differ by 4%): a monitor that lost batches or used another peak would be off by a factor.
    assert 0.7 < checks["mfu_monitor_over_bench"] < 1.3
    assert checks["sdpa_kernel"] in ("FLASH_ATTENTION", "MATH")  # what PyTorch picks for these shapes on CPU
