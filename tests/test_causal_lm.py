"""templates/causal_lm.py on CPU: training, data, models, LoRA, generate and export, attention, speed, strategies, bad
input. Hugging Face models are tiny, random and saved with save_pretrained: the template's loading code runs offline."""

import copy
import csv
import json
import os
import pickle
import re
import shlex
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Union

import lightning as L
import numpy as np
import pytest
import peft
import torch
import transformers
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy, StrategyRegistry
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from conftest import (CONFIGS, QUIET, REPO, TEMPLATES, assert_bad_input_changes_nothing, assert_ddp_ranks_agree,
                      assert_ok, assert_one_error_line, callback_config, consolidate_and_validate, final_val_loss,
                      load_ckpt, load_module, refused_in_process, run, run_facts, run_template, save_tiny_tokenizer)

LAST = Path("runs/causal_lm/checkpoints/last.ckpt")
FILM = "the film was great . the plot was dull .\n"
FSDP2 = ["--config", CONFIGS / "fsdp2.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.precision", "32-true", "--trainer.strategy.init_args.data_parallel_size", "auto",
         "--trainer.strategy.init_args.tensor_parallel_size", "auto"]


@pytest.fixture
def lm(request):
    """causal_lm.py, loaded for this test alone."""
    return load_module(TEMPLATES / "causal_lm.py", "causal_lm_" + re.sub(r"\W", "_", request.node.name))


def lm_run(*args, cwd: Path, **kwargs):
    return run_template("causal_lm.py", *args, cwd=cwd, **kwargs)


def vocab_of(model_folder: Path) -> int:
    return json.loads((model_folder / "config.json").read_text())["vocab_size"]


def float_dtypes(tensors) -> set:
    return {t.dtype for t in tensors if t.is_floating_point()}


@pytest.fixture
def refused(template_main, tmp_path, monkeypatch, capsys):
    """refused(args): causal_lm.py's main(args) in tmp_path, in this process: exit 2 and one error line, returned."""
    monkeypatch.chdir(tmp_path)
    main = template_main("causal_lm.py")

    def refuse(args):
        return refused_in_process(main, args, capsys)
    refuse.main = main
    return refuse


# ---- training ----
def test_causal_lm_fast_dev_run_default(tmp_path):
    assert_ok(lm_run("fit", "--trainer.fast_dev_run", "true", *QUIET, cwd=tmp_path))


@pytest.mark.slow
def test_causal_lm_overfits_tiny_corpus(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 120)
    result = lm_run("fit", "--data.data_path", "corpus.txt", "--data.block_size", "64", "--data.val_fraction", "0.1",
                    "--trainer.max_steps", "120", "--trainer.val_check_interval", "40", *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert final_val_loss(result.stdout)[0] < 0.5  # bar: a memorized repeating sentence (uniform: ln 256 = 5.5)
    # the documented generate command, greedy: the memorized sentence comes back
    sampled = lm_run("generate", "--prompt", "the quick b", "--max_new_tokens", "60",
                     "--temperature", "0", cwd=tmp_path)
    assert_ok(sampled)
    assert "fox jumps over the lazy dog. the quick brown fox" in sampled.stdout, sampled.stdout


@pytest.mark.slow
def test_causal_lm_trains_on_a_token_file_as_on_its_text(tmp_path):
    """A .npy of the text's byte ids (memory-mapped, 2 DataLoader workers) trains to the text's weights."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    np.save(tmp_path / "tokens.npy", np.array(list(text.encode()) + [10], dtype=np.uint16))  # a newline ends it
    common = ["--data.block_size", "32", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
              "--model.model_config", '{"vocab_size": 256}', *QUIET]  # the token file's own vocabulary is 123 ids
    for name, data in (("text", ["--data.data_path", "corpus.txt"]),
                       ("tokens", ["--data.data_path", "tokens.npy", "--data.num_workers", "2"])):
        assert_ok(lm_run("fit", *data, *common, "--trainer.default_root_dir", name, cwd=tmp_path))
    text_run, token_run = (load_ckpt(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("text", "tokens"))
    assert token_run["global_step"] == 6
    assert all(torch.equal(token_run["state_dict"][k], w) for k, w in text_run["state_dict"].items())


def test_a_token_file_reaches_spawned_workers_as_its_path_not_its_tokens(tmp_path, monkeypatch):
    """A spawned worker (macOS, Windows) gets the dataset pickled: the map travels as its path, not the corpus."""
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
    (np.array([3, 20, 5], dtype=np.uint16), "holds token id 20, outside the 20 tokens of"),  # the tokenizer's ids: 0-19
])
def test_a_token_file_that_cannot_be_right_is_refused(tmp_path, content, expected, lm):
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


def test_a_corpus_folder_is_read_as_the_user_left_it(tmp_path, lm):
    """Hidden folders skipped, a byte-order mark dropped; another encoding refused by name (not trained as U+FFFD)."""
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


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_a_pretrained_float16_model_trains_in_the_precisions_dtype(precision, dtype, tmp_path, tiny_llama):
    """Saved in float16 (Llama-2's dtype; transformers 5 loads the saved dtype), out of from_pretrained's eval mode:
    -true trains in its own dtype; -mixed in float32 weights and AdamW state (float16 second moments underflow)."""
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"body": "the film was great . " * 8}) + "\n"
                                                   for _ in range(30)))
    result = lm_run("fit", "--model.name_or_path", tiny_llama, "--data.data_path", "corpus.jsonl", "--data.text_field",
                    "body", "--data.block_size", "16", "--trainer.precision", precision, "--trainer.max_steps", "10",
                    "--trainer.val_check_interval", "5", *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert "in eval mode at the start of training" not in result.stderr
    ckpt = load_ckpt(tmp_path / LAST)
    assert float_dtypes(ckpt["state_dict"].values()) == {dtype}
    if precision == "bf16-mixed":  # it learns
        moments = [t for state in ckpt["optimizer_states"][0]["state"].values() for k, t in state.items()
                   if k in ("exp_avg", "exp_avg_sq")]
        assert moments and float_dtypes(moments) == {torch.float32} and final_val_loss(result.stdout)[0] < 3.0


def test_activation_checkpointing_of_a_pretrained_model_uses_the_current_api(tiny_llama, lm):
    """No FutureWarning (transformers 5.25 renamed gradient_checkpointing_enable), and every decoder block runs
    under the checkpoint."""
    vocab = vocab_of(tiny_llama)
    module = lm.CausalLM(name_or_path=str(tiny_llama), vocab_size=vocab, activation_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        module.configure_model()
    checkpointed = []
    for layer in module.model.model.layers:  # count the calls of the function transformers checkpoints blocks with
        layer._gradient_checkpointing_func = (lambda run, *args, _wrapped=layer._gradient_checkpointing_func:
                                              checkpointed.append(1) or _wrapped(run, *args))
    x = torch.randint(0, vocab, (2, 8))
    module.loss(x, x).backward()
    assert len(checkpointed) == len(module.model.model.layers) == 2


# ---- models: pretrained, built-in GPT, transformers types, attention ----
@pytest.mark.parametrize("model_type", ["gpt", "gpt2"])
def test_a_block_longer_than_a_learned_position_table_is_refused(model_type, refused):
    """Not an IndexError deep in an embedding lookup (rotary models only get a warning)."""
    assert "longer than the model's 1024 positions" in refused([
        "fit", "--model.model_type", model_type, "--data.block_size", "2048", "--trainer.fast_dev_run", "true", *QUIET])


def test_model_config_overrides_the_tiny_defaults_under_either_name(lm):
    """GPT-2's n_embd aliases the tiny default's hidden_size: the user's value wins. GPT-2 small (its vocabulary
    padded to 50304) has the same parameter count in transformers and built in (model_type gpt)."""
    small = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304}
    gpt2, gpt = (lm.load_or_build(None, kind, small, 256, False, meta=True) for kind in ("gpt2", "gpt"))
    assert (gpt2.config.n_layer, gpt2.config.n_embd, gpt2.config.vocab_size) == (12, 768, 50304)
    assert sum(p.numel() for p in gpt2.parameters()) == sum(p.numel() for p in gpt.parameters()) == 124_475_904
    tiny = lm.load_or_build(None, "llama", {"hidden_size": 64, "num_attention_heads": 2}, 256, False, meta=True)
    assert (tiny.config.hidden_size, tiny.config.num_hidden_layers, tiny.config.vocab_size) == (64, 4, 256)


def gpt2_weights_for_builtin_gpt(hf_state: dict, n_layer: int) -> dict:
    """GPT2LMHeadModel's state dict under the built-in GPT's names (Conv1D weights transposed)."""
    state = {k: hf_state[f"transformer.{k}"] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    state["lm_head.weight"] = hf_state["lm_head.weight"]
    for i in range(n_layer):
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2"), ("qkv", "attn.c_attn"), ("attn_out", "attn.c_proj"),
                             ("fc", "mlp.c_fc"), ("mlp_out", "mlp.c_proj")):
            weight = hf_state[f"transformer.h.{i}.{theirs}.weight"]
            state[f"blocks.{i}.{ours}.weight"] = weight if ours.startswith("ln") else weight.t()
            state[f"blocks.{i}.{ours}.bias"] = hf_state[f"transformer.h.{i}.{theirs}.bias"]
    return state


def test_builtin_gpt_is_gpt2(lm):
    """model_type gpt computes GPT2LMHeadModel's logits (parameter count and bias false: the tests above and below);
    activation checkpointing leaves the gradients as they are."""
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

    deep = lm.build_gpt({"n_layer": 8, "n_head": 4, "n_embd": 256}, 256)  # GPT-2's init: residual std 0.02 / 4
    block = deep.blocks[3]
    assert abs(block.fc.weight.std().item() - 0.02) < 1e-3 and abs(block.mlp_out.weight.std().item() - 0.005) < 3e-4
    assert deep.lm_head.weight is deep.wte.weight and not block.qkv.bias.any()


def test_gpt2_small_recipe_builds_the_benchmarked_model(tmp_path, monkeypatch, lm):
    """performance.md's GPT-2-small command, also in causal_lm.py's docstring, builds the benchmarked model."""
    doc = (REPO / "references" / "performance.md").read_text()
    recipe = re.search(r"```bash\n(python causal_lm.py fit --config configs/gpu.yaml .*?)\n```", doc, re.S).group(1)
    docstring = (TEMPLATES / "causal_lm.py").read_text().split('"""')[1]
    words = lambda text: " ".join(text.replace("\\\n", " ").split())  # noqa: E731 (shell continuations joined)
    assert words(recipe) in words(docstring)
    args = shlex.split(words(recipe))[3:]  # after `python causal_lm.py fit`
    np.save(tmp_path / "tokens.npy", np.arange(40_000, dtype=np.uint16) % 50257)
    monkeypatch.chdir(tmp_path)
    args[args.index("configs/gpu.yaml")] = str(CONFIGS / "gpu.yaml")
    cli = lm.main([*args, "--trainer.accelerator", "cpu"], run=False)
    data, hp = cli.datamodule.hparams, cli.model.hparams
    assert (data.batch_size, data.block_size, hp.model_type, hp.compile) == (32, 1024, "gpt", True)
    model = lm.load_or_build(None, hp.model_type, hp.model_config, cli.datamodule.vocab_size, False, meta=True)
    assert (len(model.blocks), model.wte.weight.shape) == (12, (50304, 768))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_sdpa_backend_selects_the_attention_kernel_that_runs(lm):
    """--model.sdpa_backend sets PyTorch's process-wide switches, so activation checkpointing's recomputation runs the
    chosen kernel too: on CPU "math" replaces the default flash kernel, forward and backward."""
    kernels = ("flash", "mem_efficient", "cudnn")
    before = [getattr(torch.backends.cuda, f"{kernel}_sdp_enabled")() for kernel in kernels]
    x, ran = torch.randint(0, 256, (2, 16)), {}
    try:
        for backend in (None, "math"):
            module = lm.CausalLM(model_type="gpt", sdpa_backend=backend, activation_checkpointing=True)
            module.configure_model()
            with torch.profiler.profile() as profile:
                module.loss(x, x).backward()
            ran[backend] = {e.name for e in profile.events() if e.name.startswith("aten::_scaled_dot_product")}
    finally:  # the switches are global: leave them as they were for the other tests in this process
        for kernel, value in zip(kernels, before):
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(value)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ran[None]
    assert ran["math"] == {"aten::_scaled_dot_product_attention_math"}


def sdpa_calls_in_compiled_graph(fn, *args) -> list:
    """The arguments of each fused-attention call in the graph torch.compile captures."""
    calls = []

    def record(graph_module, example_inputs):
        calls.extend(dict(n.kwargs) for n in graph_module.graph.nodes if "scaled_dot_product" in str(n.target))
        return graph_module

    torch.compile(fn, backend=record)(*args)
    return calls


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_transformers_causal_lms_attend_without_a_mask(model_type, monkeypatch, lm):
    """transformers' mask code builds a batch x seq x seq mask under compile (no flash kernels) and reads a value every
    eager forward: the template's models skip it with eager attention's logits; a later mask is refused, not ignored;
    a sliding-window model keeps its mask."""
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


# ---- speed: throughput, MFU, no waiting for the device, the benchmark ----
class SlowSteps(Callback):
    """Every training batch takes 0.1 s at least: a ceiling of 10 batches per second."""

    def on_train_batch_start(self, *args):
        time.sleep(0.1)


def test_throughput_logs_tokens_per_second_and_mfu_of_every_batch(tmp_path, lm):
    """Timed at logging steps and validation starts only, its FLOPs cover every batch; a validation between logging
    steps must not drop the batch before it from the training time (checkpoints off: their save time would hide it)."""
    cli = lm.main(["--trainer.max_steps", "14", "--trainer.val_check_interval", "5", "--trainer.limit_val_batches",
                   "2", "--trainer.log_every_n_steps", "2", "--data.batch_size", "4", "--throughput.window_size", "2",
                   "--throughput.peak_tflops", "0.5", "--best_checkpoint.save_top_k", "0",
                   "--last_checkpoint.save_top_k", "0", "--last_checkpoint.save_last", "false",
                   "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                   str(tmp_path / "logs"), "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET],
                  run=False, callbacks=(SlowSteps(),))
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
    """Each Python read of a tensor value in a training step (on a GPU, a wait for the queued work), but not
    torch.optim's and the DataLoader's host-side values, nor the NaN check (every step on CPU)."""

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
                    caller.name == "check" and caller.filename.endswith("lightning_support.py")):
                self.reads.append((*self.step, func.__name__, [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                               for f in stack[-6:]]))
        return func(*args, **(kwargs or {}))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = (trainer.global_step, trainer._logger_connector.should_update_logs)  # this step logs

    def on_validation_start(self, trainer, pl_module):  # validation and epoch ends read once per interval, not step
        self.step = None

    on_train_epoch_end = on_validation_start


@pytest.mark.parametrize("template, args", [
    ("causal_lm.py", ["--model.model_type", "gpt", "--trainer.max_steps", "12", "--data.batch_size", "4"]),
    ("causal_lm.py", ["--trainer.max_steps", "12", "--data.batch_size", "4"]),
    ("tabular.py", ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "12"])],
    ids=["causal_lm-gpt", "causal_lm-llama", "tabular"])
def test_training_steps_do_not_wait_for_the_device(tmp_path, template, args):
    """Only logging steps read a tensor value (the logged loss): the others queue their work without waiting, as a
    plain loop does (bench/bench.py measures it on a GPU)."""
    module = load_module(TEMPLATES / template, f"{template[:-3]}_host_reads")
    reads = HostReads()
    cli = module.main([*args, "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path)],
                      run=False, callbacks=(reads,))
    with reads:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 12 and cli.trainer.log_every_n_steps == 10
    assert [r for r in reads.reads if not r[1]] == []
    assert {r[0] for r in reads.reads} == {9}  # the positive control: the one logging step reads the loss


LITGPT = os.environ.get("LITGPT_PYTHON")


@pytest.mark.skipif(not LITGPT, reason="needs LITGPT_PYTHON: litgpt's own environment")
def test_bench_tiny_litgpt_row(tmp_path):
    """litgpt pins packages transformers 5 cannot live with: its row runs where LITGPT_PYTHON names its Python."""
    result = run([sys.executable, REPO / "bench" / "bench.py", "--tiny", "--rows", "litgpt", "--litgpt-python", LITGPT,
                  "--format", "json"], cwd=tmp_path)
    assert_ok(result)
    rows = json.loads(result.stdout)["rows"]
    assert [r["variant"].split(" ")[0] for r in rows] == ["litgpt", "causal_lm.py"] and all(r["tokens/s"] for r in rows)


def test_bench_tiny_compares_trainer_and_plain_loop(tmp_path):
    """bench/bench.py --tiny: the GPU benchmark's code on CPU, so it cannot rot; speed is not asserted."""
    result = run([sys.executable, TEMPLATES.parent / "bench" / "bench.py", "--tiny", "--peak-tflops", "1", "--format",
                  "json"], cwd=tmp_path)
    assert_ok(result)
    report = json.loads(result.stdout)
    assert [r["variant"] for r in report["rows"]] == ["plain PyTorch loop (gpt)", "causal_lm.py (gpt, Trainer)",
                                                      "tabular plain loop (CPU)", "tabular.py (Trainer, CPU)",
                                                      "image plain loop (tiny ResNet)",
                                                      "image_classifier.py (tiny ResNet, Trainer)",
                                                      "image loader alone (no model)",
                                                      f"transformers.Trainer {transformers.__version__}, tiny BERT",
                                                      "transformers_finetune.py (Lightning), tiny BERT",
                                                      f"peft {peft.__version__} + transformers.Trainer, tiny Llama",
                                                      "causal_lm.py --model.finetune lora (Lightning), tiny Llama"]
    assert all(r["ms/step"] > 0 for r in report["rows"])
    checks = report["checks"]
    # The peer and the template, each its own recipe, learn the same reviews (chance: 0.5)
    accuracies = [v for k, v in checks.items() if k.startswith("finetune_val_acc")]
    assert len(accuracies) == 2 and min(accuracies) > 0.8 and abs(accuracies[0] - accuracies[1]) < 0.1, checks
    assert checks["loss_falls"] and checks["same_loss"]  # every step's loss, from the first on
    assert checks["final_loss_plain"] == checks["final_loss_trainer"]  # float32 on CPU: exactly equal
    assert abs(checks["tabular_val_acc_plain"] - checks["tabular_val_acc_trainer"]) < 1e-4
    assert checks["image_same_loss"]  # the image template and its plain loop, step by step (float32 on CPU)
    assert abs(checks["flops_per_token_template"] / checks["flops_per_token_formula"] - 1) < 0.05
    # The template's logged MFU and the benchmark's, one run timed by two clocks (the tiny model's FLOPs formulas
    # differ by 4%): a monitor that lost batches or used another peak would be off by a factor.
    assert 0.7 < checks["mfu_monitor_over_bench"] < 1.3
    assert checks["sdpa_kernel"] in ("FLASH_ATTENTION", "MATH")  # what PyTorch picks for these shapes on CPU


# ---- several processes and the strategies of the configs ----
@pytest.mark.slow
def test_causal_lm_ddp_two_processes(tmp_path):
    """Every rank ends with the same val_loss (sync_dist) and logs no sync_dist warning."""
    metrics = assert_ddp_ranks_agree("causal_lm.py", ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                                                      "--trainer.limit_val_batches", "2"], tmp_path)
    assert metrics["val_loss"] > 0


@pytest.mark.slow
def test_builtin_gpt_fsdp2_two_processes_consolidates_and_validates(tmp_path):
    """Tied embeddings under FSDP2, "auto" mesh sizes: each process trains on its half of the data; the consolidated
    checkpoint validates alone to the 2-process val_loss."""
    result = lm_run("fit", "--model.model_type", "gpt", *FSDP2, "--trainer.max_steps", "4",
                    "--trainer.use_distributed_sampler", "false",  # both ranks validate what one process will
                    "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "4", *QUIET,
                    cwd=tmp_path, timeout=600)
    assert_ok(result)
    losses = final_val_loss(result.stdout)
    assert set(losses) == {0, 1} and losses[0] == losses[1]
    sharded = tmp_path / LAST
    _, processes, _ = load_ckpt(sharded / "meta.pt")["TextData"]["order"]  # the sampler's split
    assert processes == 2, f"the training data was split over {processes} process(es), not both"
    _, val_loss = consolidate_and_validate(tmp_path / LAST, tmp_path)
    assert abs(val_loss - losses[0]) < 1e-4, (val_loss, losses[0])


def build_strategy(config_name: str):
    """Instantiates the config's trainer.strategy the way LightningCLI does (no Trainer, so no GPU needed)."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Union[str, Strategy])
    strategy = yaml.safe_load((CONFIGS / config_name).read_text())["trainer"]["strategy"]
    return parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy


def test_fsdp_configs_build_their_strategy():
    fsdp = build_strategy("fsdp.yaml")
    assert isinstance(fsdp, FSDPStrategy) and fsdp._state_dict_type == "sharded"
    assert isinstance(build_strategy("fsdp2.yaml"), ModelParallelStrategy)


@pytest.mark.parametrize("strategy, stage, offload", [(None, 2, False), ("deepspeed_stage_3_offload", 3, True)])
def test_deepspeed_config_and_its_documented_override_name_registered_strategies(strategy, stage, offload):
    config = (CONFIGS / "deepspeed.yaml").read_text()
    assert strategy is None or f"--trainer.strategy {strategy}" in config  # the override the file documents
    strategy = strategy or build_strategy("deepspeed.yaml")
    assert strategy in StrategyRegistry, strategy
    init = StrategyRegistry[strategy]["init_params"]
    assert init["stage"] == stage and bool(init.get("offload_optimizer")) == offload


@pytest.mark.parametrize("config, expected", [
    ("fsdp.yaml", "strategy `fsdp` requires a GPU accelerator"),
    ("deepspeed.yaml", "you must have DeepSpeed installed"),
    ("fsdp2.yaml", "must equal devices x num_nodes = 1"),  # runs on CPU, but 8 shards need 8 processes
])
def test_strategy_that_cannot_run_here_is_one_clear_line(refused, config, expected):
    assert expected in refused(["fit", "--config", str(CONFIGS / config), "--trainer.accelerator", "cpu",
                                "--trainer.devices", "1"])


@pytest.mark.gpu
@pytest.mark.parametrize("config, model_type", [("gpu.yaml", "llama"), ("fsdp.yaml", "llama"), ("gpu.yaml", "gpt"),
                                                ("fsdp.yaml", "gpt")])
def test_gpu_training(tmp_path, config, model_type):
    result = lm_run("fit", "--config", CONFIGS / config, "--model.model_type", model_type,
                    "--trainer.devices", "1", "--model.compile", "true", "--trainer.max_steps", "20",
                    "--trainer.val_check_interval", "10", "--throughput.window_size", "2",  # 2 logging steps
                    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                    "logs", *QUIET, cwd=tmp_path, timeout=600)
    assert_ok(result)
    header = open(next((tmp_path / "logs").rglob("metrics.csv"))).readline()
    assert "train/device/items_per_sec" in header and "train/device/mfu" in header


# ---- bad input ----
def test_bad_input_one_line_exit_2(refused, tmp_path):
    """More cases: test_bad_inputs.py, and test_lightning_support.py's BAD_INPUTS (a missing data path)."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    for args, expected in ((["--data.data_path", "c.jsonl", "--data.text_field", "content"], "no text field 'content'"),
                           (["--model.name_or_path", "./no_such_model"], "folder not found"),
                           (["--data.data_path", "c.jsonl", "--data.block_size", "4096"], "too few for block_size")):
        assert expected in refused(["fit", *args, "--trainer.fast_dev_run", "true"]), args
    result = lm_run("fit", "--data.data_path", "missing.txt", cwd=tmp_path)
    assert_one_error_line(result, "data not found")


def test_subcommands_without_a_step_are_one_line(refused):
    """LightningCLI lists test and predict, which causal_lm.py lacks. A short run still validates at its end."""
    for subcommand in ("test", "predict"):
        assert f"has no {subcommand} step" in refused([subcommand])
    cli = refused.main(["--trainer.max_steps", "20", "--trainer.accumulate_grad_batches", "2"], run=False)
    assert cli.trainer.val_check_interval == 40  # batches, as val_check_interval counts them (default 50)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a GPU")
def test_bench_without_a_gpu_is_one_line(tmp_path):
    assert_bad_input_changes_nothing(REPO / "bench" / "bench.py", [], "no CUDA GPU here", tmp_path)


@pytest.mark.parametrize("args, expected", [
    (["--model.model_config", '{"hiden_size": 64}'], "did you mean: hidden_size"),
    (["--model.model_type", "gpt2", "--model.model_config", '{"n_layers": 2}'], "did you mean: n_layer"),
    (["--model.model_type", "gpt", "--model.model_config", '{"n_embed": 64}'], "unknown model_config key"),
], ids=["llama", "gpt2", "gpt"])
def test_a_misspelt_model_config_key_is_refused_before_anything_is_built(args, expected, refused, tmp_path):
    """transformers configs keep any keyword, so the typo would change nothing, silently."""
    assert expected in refused(["fit", *args])
    assert not (tmp_path / "runs").exists()


# ---- LoRA fine-tuning, instruction data, generate and export ----
CHAT_TEMPLATE = ("{% for m in messages %}{{ '[CLS] ' + m['role'] + ' ' + m['content'] + ' [SEP] ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '[CLS] assistant ' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with a chat template: a turn is [CLS] role text [SEP]."""
    folder = tmp_path_factory.mktemp("chat_llama")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def learned(tokenizer, ids, labels) -> str:
    assert len(ids) == len(labels) and all(label in (-100, i) for i, label in zip(ids, labels))
    return tokenizer.decode([i for i in labels if i != -100]) if tokenizer else bytes(
        i for i in labels if i != -100).decode()


def test_instruction_data_learns_the_answers_only(chat_llama, tmp_path, lm):
    """Labels are the assistant's tokens and end of turn, -100 elsewhere: with the tokenizer's chat template (every
    assistant turn), without one and on UTF-8 bytes; TextData reads prompt/response JSONL as conversations."""
    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    talk = [{"role": role, "content": text} for role, text in (("user", "the film was"), ("assistant", "great ."),
                                                                ("user", "the plot was"), ("assistant", "dull ."))]
    ids, labels = lm.chat_tokens(tokenizer, talk)
    assert tokenizer.decode(ids) == ("[CLS] [UNK] the film was [SEP] [CLS] [UNK] great . [SEP] [CLS] [UNK] the plot"
                                     " was [SEP] [CLS] [UNK] dull . [SEP]")  # roles are not in the tiny vocabulary
    assert learned(tokenizer, ids, labels) == "great . [SEP] dull . [SEP]"
    prompt, _ = lm.chat_tokens(tokenizer, talk[:1], generation_prompt=True)
    assert tokenizer.decode(prompt) == "[CLS] [UNK] the film was [SEP] [CLS] [UNK]"
    assert tokenizer.sep_token_id in lm.stop_tokens(tokenizer, None, chat=True)  # the template's end of a turn
    strict = copy.copy(tokenizer)
    strict.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    with pytest.raises(lm.ConfigError, match="chat.jsonl:3: the chat template refused this conversation"
                                             r" \(roles must alternate"):
        lm.chat_tokens(strict, talk, where="chat.jsonl:3")
    tokenizer.chat_template = None
    ids, labels = lm.chat_tokens(tokenizer, talk[:2])
    assert learned(tokenizer, ids, labels) == "great . [EOS]"
    ids, labels = lm.chat_tokens(None, talk[:2])
    assert learned(None, ids, labels) == "great .\x00" and bytes(ids).startswith(b"<|user|>\nthe film was\n")

    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"prompt": "the film was", "response": "great ."}) + "\n"
                                                 for _ in range(10)))
    data = lm.TextData(data_path=str(tmp_path / "chat.jsonl"), tokenizer=str(chat_llama), block_size=32, batch_size=4)
    assert data.hparams.data_format == "instruction"
    data.setup("fit")
    inputs, targets = data.train_set[0]
    assert tokenizer.decode(inputs) == "[CLS] [UNK] the film was [SEP] [CLS] [UNK] great ."
    assert tokenizer.decode(targets[targets != -100]) == "great . [SEP]"
    assert (targets[:-3] == -100).all()


def test_packed_conversations_attend_only_to_themselves(tiny_llama, lm):
    """Packed in one row, positions restarting at each, under sdpa (the template's choice for packing), each
    conversation gets the logits it gets alone; the padding gets -100."""
    vocab = vocab_of(tiny_llama)
    module = lm.CausalLM(name_or_path=str(tiny_llama), vocab_size=vocab)
    module.configure_model()
    module.model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(0)
    examples = [(torch.randint(6, vocab, (n,), generator=gen), torch.randint(6, vocab, (n,), generator=gen))
                for n in (5, 7, 9)]
    rows = lm.Conversations(examples, block_size=12, packing=True)
    assert [len(row) for row in rows.rows] == [2, 1]  # 5 + 7 fit 12; 9 does not fit beside them
    inputs, targets, positions = lm.pad_rows([rows[0], rows[1]])
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert positions[1].tolist() == list(range(12)) and (targets[1, 9:] == -100).all()
    with torch.no_grad():
        packed = module(inputs, positions)
        for (x, _), start, row in [(examples[0], 0, 0), (examples[1], 5, 0), (examples[2], 0, 1)]:
            alone = module(x[None])[0]
            torch.testing.assert_close(packed[row, start:start + len(x)], alone, atol=1e-5, rtol=1e-5)


def test_lora_keeps_the_frozen_model_in_the_autocast_dtype(tiny_llama, lm):
    """bf16-mixed: frozen weights in bfloat16 (float32 ones would also get an autocast copy, kept for backward),
    adapters in float32; 32-true: all float32."""
    vocab = vocab_of(tiny_llama)
    for precision, frozen in (("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)):
        module = lm.CausalLM(name_or_path=str(tiny_llama), vocab_size=vocab, finetune="lora")
        module.trainer = L.Trainer(precision=precision, accelerator="cpu", logger=False)
        module.configure_model()
        dtypes = {p.requires_grad: {q.dtype for q in module.parameters() if q.requires_grad == p.requires_grad}
                  for p in module.parameters()}
        assert dtypes == {False: {frozen}, True: {torch.float32}}, precision


def test_packing_is_allowed_for_the_types_whose_attention_follows_positions(lm):
    """Each PACKABLE_TYPES model gives a packed row's second conversation its logits alone; OPT (a mask without
    positions) would not."""
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 40000}  # phi3's pad id 32000 must be in the vocabulary
    a, b = torch.randint(0, 30000, (5,)), torch.randint(0, 30000, (7,))
    row, positions = torch.cat([a, b])[None], torch.cat([torch.arange(5), torch.arange(7)])[None]
    for model_type in sorted(lm.PACKABLE_TYPES | {"opt"}):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(lm.model_config_of(model_type, small, 40000),
                                                 attn_implementation="sdpa").eval()
        model.config.use_cache = False
        with torch.no_grad():
            gap = (model(input_ids=row, position_ids=positions).logits[0, 5:] - model(input_ids=b[None]).logits[0])
        assert (gap.abs().max() < 1e-4) == (model_type in lm.PACKABLE_TYPES), model_type


def adapters(checkpoint: Path) -> dict:
    return load_ckpt(checkpoint)["state_dict"]


def film_corpus(tmp_path: Path, model: Path) -> list:
    (tmp_path / "corpus.txt").write_text(FILM * 200)
    return ["--model.name_or_path", model, "--data.data_path", "corpus.txt"]


LORA_FIT = ["--model.finetune", "lora", "--model.learning_rate", "1e-2", "--model.lora_r", "4",
            "--data.batch_size", "4", "--data.block_size", "32", "--trainer.max_steps", "8",
            "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2", "--trainer.deterministic", "true",
            *QUIET]


@pytest.mark.slow
def test_lora_trains_adapters_only_resumes_after_kill_9_and_exports(chat_llama, tmp_path, lm):
    """LoRA on packed conversations: checkpoints hold the adapters only; kill -9 and --ckpt_path last end as an
    uninterrupted run; export, merged or as a peft adapter, gives the module's logits in transformers."""
    talk = [{"prompt": f"the {noun} was", "response": f"{word} ."} for noun in ("film", "movie", "plot")
            for word in ("great", "dull")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(t) + "\n" for t in talk * 10))
    fit = ["fit", "--model.name_or_path", chat_llama, "--data.data_path", "chat.jsonl", "--data.packing", "true",
           *LORA_FIT]
    whole = lm_run(*fit, "--trainer.default_root_dir", "whole", cwd=tmp_path)
    assert_ok(whole)
    best = tmp_path / "whole" / "checkpoints" / "best.ckpt"
    for command in ("generate --prompt TEXT", "export --out hf_model"):  # fit's last lines name them
        assert f"causal_lm.py {command} --ckpt_path {best}" in whole.stdout, whole.stdout[-2000:]
    kill = callback_config(tmp_path / "kill.yaml", "SignalAtStep", step=5, signal_name="SIGKILL")
    killed = lm_run(*fit, "--config", kill, "--trainer.default_root_dir", "cut", cwd=tmp_path, tests_on_path=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert load_ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = lm_run(*fit, "--trainer.default_root_dir", "cut", "--ckpt_path", "last", cwd=tmp_path)
    assert_ok(resumed)
    ckpt = tmp_path / "whole" / "checkpoints" / "last.ckpt"
    trained, again = adapters(ckpt), adapters(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B." in k)  # B starts at zero: it trained
    assert ckpt.stat().st_size < 2 * sum(v.numel() * 4 for v in trained.values()) * 3 + 200_000  # + AdamW state

    module, tokenizer, data = lm.load_trained(str(ckpt))
    original = AutoModelForCausalLM.from_pretrained(chat_llama, dtype=torch.float32)
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in module.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in original.state_dict().items())
    assert data["data_format"] == "instruction"

    answer = lm_run("generate", "--root", "whole", "--prompt", "the film was",
                    "--temperature", "0", "--max_new_tokens", "5", cwd=tmp_path)
    assert_ok(answer)
    assert answer.stdout.strip() and "the film was" not in answer.stdout  # the answer only

    x = torch.randint(6, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module(x)
    merged = lm_run("export", "--root", "whole", "--out", "merged", cwd=tmp_path)
    assert_ok(merged)
    assert not list((tmp_path / "merged").glob("adapter_*"))
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(loaded(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert tokenizer.sep_token_id in loaded.generation_config.eos_token_id  # the chat template's end of a turn
    assert_ok(lm_run("export", "--root", "whole", "--out", "adapter", "--adapter", cwd=tmp_path))
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_llama, dtype=torch.float32),
                                                 tmp_path / "adapter")
        torch.testing.assert_close(adapted(x).logits, expected, atol=1e-5, rtol=1e-5)
    again = lm_run("export", "--root", "whole", "--out", "merged", cwd=tmp_path)
    assert_one_error_line(again, "exists and is not empty")


def test_lora_and_export_refuse_what_cannot_work_in_one_line(tiny_llama, refused, tmp_path):
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "latest").write_text("global_step4")
    fit = ["fit", "--model.name_or_path", str(tiny_llama), "--trainer.max_steps", "1"]
    for args, expected in ((["fit", "--model.finetune", "lora", "--trainer.max_steps", "1"],
                            "adapts a pretrained model: set --model.name_or_path"),
                           ([*fit, "--model.finetune", "qlora"], "on a CUDA GPU only"),
                           ([*fit, "--model.finetune", "lora", "--model.lora_targets", "[no_such_layer]"],
                            "set --model.lora_targets"),
                           (["export", "--out", "x", "--root", "nowhere"], "checkpoint not found"),
                           (["generate", "--ckpt_path", "zero"], "convert_zero_checkpoint_to_fp32_state_dict")):
        if "qlora" not in args or not torch.cuda.is_available():
            assert expected in refused(args), args
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_lora_checkpoint_loaded_with_other_adapters_is_refused(tiny_llama, tmp_path, lm):
    fit = ["fit", *film_corpus(tmp_path, tiny_llama), *LORA_FIT]
    assert_ok(lm_run(*fit, "--trainer.max_steps", "4", cwd=tmp_path))
    other = lm_run(*fit, "--model.lora_targets", "[q_proj, v_proj]", "--ckpt_path", "last", cwd=tmp_path)
    assert_one_error_line(other, "was trained with model.lora_targets=None")
    # loaded from Python: the same check
    saved = load_ckpt(tmp_path / LAST)
    trained = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    module = lm.CausalLM(**{**trained, "lora_targets": ["q_proj", "v_proj"]})
    module.configure_model()
    with pytest.raises(lm.ConfigError, match="lacks 0 of this model's 8 LoRA tensors and holds 20 it does not have"):
        module.on_load_checkpoint(saved)


@pytest.mark.slow
def test_lora_under_fsdp2_resumes_from_its_shards_and_consolidates(tiny_llama, tmp_path):
    """FSDP2, two processes: the sharded checkpoint keeps every weight (torch's distributed checkpoint loads complete
    states only) and resumes; its consolidation is a file generate and export read."""
    fit = ["fit", *film_corpus(tmp_path, tiny_llama), *FSDP2, *LORA_FIT]
    assert_ok(lm_run(*fit, "--trainer.max_steps", "4", cwd=tmp_path, timeout=600))
    resumed = lm_run(*fit, "--ckpt_path", "last", cwd=tmp_path, timeout=600)
    assert_ok(resumed)
    assert "step 8 val_loss" in resumed.stdout
    single, _ = consolidate_and_validate(tmp_path / LAST, tmp_path)
    assert any(".lora_B." in k for k in load_ckpt(single)["state_dict"])
    assert_ok(lm_run("generate", "--ckpt_path", single, "--max_new_tokens", "3", cwd=tmp_path))
    assert_ok(lm_run("export", "--ckpt_path", single, "--out", "hf", cwd=tmp_path))


@pytest.mark.gpu
@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_lora_peak_memory_on_gpu_is_what_the_planner_says(tmp_path, finetune):
    """TinyLlama-1.1B's shape, random, sequence 1024, micro-batch 2, bf16-mixed: peak allocated memory against
    detect_hardware.py's estimate (both printed)."""
    if finetune == "qlora":
        pytest.importorskip("bitsandbytes")
    folder = tmp_path / "model"
    save_tiny_tokenizer(folder)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    with torch.device("cuda"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    (tmp_path / "corpus.txt").write_text(FILM * 5000)
    facts = callback_config(tmp_path / "facts.yaml", "PrintRunFacts")
    result = lm_run("fit", "--config", CONFIGS / "gpu.yaml", "--config", facts, "--model.name_or_path", folder,
                    "--model.finetune", finetune, "--data.data_path", "corpus.txt", "--data.block_size", "1024",
                    "--data.batch_size", "2", "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
                    "--trainer.limit_val_batches", "1", *QUIET, cwd=tmp_path, tests_on_path=True, timeout=600)
    assert_ok(result)
    peak = run_facts(result.stdout)[0]["peak_gb"]
    planner = load_module(REPO / "scripts" / "detect_hardware.py", "detect_hardware_gpu_check")
    plan = planner.memory_gb(planner.load_model(str(folder)), finetune, "bf16-mixed", 1024, 2, "single", 1, False)
    print(f"{finetune}: peak {peak:.2f} GB allocated, planned {plan['per_device_gb']:.2f} GB")
    assert 0.6 * plan["per_device_gb"] <= peak <= 1.15 * plan["per_device_gb"]


@pytest.mark.gpu
def test_qlora_fine_tunes_a_4_bit_model_on_gpu(tiny_llama, tmp_path):
    """QLoRA on CUDA: 4-bit frozen Linear weights, the checkpoint holds the adapters only; generate and a merged
    export work."""
    pytest.importorskip("bitsandbytes")
    result = lm_run("fit", "--config", CONFIGS / "gpu.yaml", *film_corpus(tmp_path, tiny_llama),
                    *LORA_FIT[2:], "--model.finetune", "qlora", cwd=tmp_path)
    assert_ok(result)
    trained = adapters(tmp_path / LAST)
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
    assert_ok(lm_run("generate", "--prompt", "the film", "--max_new_tokens", "4", cwd=tmp_path))
    assert_ok(lm_run("export", "--out", "merged", cwd=tmp_path))
