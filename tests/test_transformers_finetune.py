"""templates/transformers_finetune.py on CPU: the tiny model out of the box, pretrained folders (float16 too), test and
predict files, export, DDP, bad input. Hugging Face models are tiny, random and saved with save_pretrained: the
template's own loading code runs, offline."""

import csv
import gzip
import json
import re

import pytest
import torch

from conftest import (ASSETS, CONFIGS, QUIET, TEMPLATES, assert_ddp_ranks_agree, assert_ok, assert_one_error_line,
                      kept_line, load_ckpt, load_module, logged_rows, refused_in_process, run_template, write_reviews)


@pytest.mark.slow
def test_finetune_default_trains_out_of_the_box(tmp_path):
    """Then scores a whole held-out file (test), labels new texts (predict: predictions.csv with class names), and
    refuses a held-out file passed as the training data: its word vocabulary (or classes) would be another."""
    result = run_template("transformers_finetune.py", "fit", "--trainer.max_epochs", "4", *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert kept_line(result.stdout)["val_acc"] >= 0.9

    with gzip.open(ASSETS / "sentiment.csv.gz", "rt") as f:
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
    out = tmp_path / "runs" / "transformers_finetune" / "predictions" / "best.csv"
    assert f"predictions written to {out}" in predicted.stdout
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert [int(r["line"]) for r in written] == list(range(2, 32))  # CSV lines, the header being line 1
    assert [w["text"] for w in written] == [r["text"] for r in rows]  # and the text itself
    right = sum(w["prediction"] == r["label"] for w, r in zip(written, rows))
    assert right >= 24 and {w["label"] for w in written} == {""}
    refused = run_template("transformers_finetune.py", "validate", "--data.data_path", "held_out.csv", *best,
                           cwd=tmp_path)
    assert "--data.test_path" in assert_one_error_line(refused, "the checkpoint was trained with vocab_size")

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
    rows = logged_rows(tmp_path / "logs")
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"train loss {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first
    assert kept_line(result.stdout)["val_acc"] >= 0.9


def test_lora_fine_tune_exports_a_folder_that_pipeline_runs(tmp_path, tiny_bert):
    """export: LoRA merged in, the classes named (id2label), the tokenizer cutting at the fit's max_length; the
    folder's logits are the checkpoint's, and pipeline() labels with the class names."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    write_reviews(tmp_path / "reviews.csv", n=80)
    result = run_template("transformers_finetune.py", "fit", "--model.name_or_path", tiny_bert, "--model.lora", "true",
                          "--model.learning_rate", "3e-3", "--data.data_path", "reviews.csv", "--data.max_length", "24",
                          "--data.text_column", "review", "--data.label_column", "sentiment",
                          "--trainer.max_epochs", "2", *QUIET, cwd=tmp_path)
    assert_ok(result)
    exported = run_template("transformers_finetune.py", "export", "--out", "classifier", cwd=tmp_path)
    assert_ok(exported)
    folder = tmp_path / "classifier"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == {0: "neg", 1: "pos"} and tokenizer.model_max_length == 24
    assert not any("lora" in name for name in model.state_dict())
    tf = load_module(TEMPLATES / "transformers_finetune.py", "transformers_finetune_export")
    module = tf.TextClassifier.load_from_checkpoint(tmp_path / "runs" / "transformers_finetune" / "checkpoints" /
                                                    "best.ckpt", map_location="cpu", weights_only=True).eval()
    batch = tokenizer(["the film was great .", "the plot was dull ."], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, module(batch), atol=1e-5, rtol=1e-5)
    labels = [p["label"] for p in pipeline("text-classification", model=str(folder))(["the film was great ."])]
    assert labels[0] in ("neg", "pos")


def test_finetune_fast_dev_run_with_jsonl(tmp_path, tiny_bert):
    """Three classes for a model saved with a two-class head: the head is replaced, the body kept."""
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(40):
            text = ["the film was great .", "the plot was dull .", "it was a film ."][i % 3]
            f.write(json.dumps({"text": text, "label": i % 3}) + "\n")
    result = run_template("transformers_finetune.py", "fit", "--model.name_or_path", tiny_bert, "--data.data_path",
                          "data.jsonl", "--trainer.fast_dev_run", "true", *QUIET, cwd=tmp_path)
    assert_ok(result)


def test_a_pretrained_float16_model_trains_in_float32(tmp_path, tiny_llama):
    """A BERT saved in float16 fine-tunes with float32 weights and AdamW state under bf16-mixed (transformers 5 loads a
    checkpoint in its saved dtype)."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "bert16"
    BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=64)
                                  ).to(torch.float16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tiny tokenizer saved with the float16 Llama
        (folder / name).write_bytes((tiny_llama / name).read_bytes())
    (tmp_path / "reviews.csv").write_text("text,label\n" + "the film was great .,pos\nthe plot was dull .,neg\n" * 20)
    result = run_template("transformers_finetune.py", "fit", "--model.name_or_path", folder, "--data.data_path",
                          "reviews.csv", "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1",
                          "--trainer.limit_val_batches", "1", *QUIET, cwd=tmp_path)
    assert_ok(result)
    ckpt = load_ckpt(tmp_path / "runs" / "transformers_finetune" / "checkpoints" / "last.ckpt")
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    moments = [t for state in ckpt["optimizer_states"][0]["state"].values() for k, t in state.items()
               if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_model_config_overrides_the_tiny_defaults_under_either_name():
    """DistilBERT names its width dim, an alias of the tiny default's hidden_size: the user's value must win."""
    finetune = load_module(TEMPLATES / "transformers_finetune.py", "finetune_config")
    distilbert = finetune.TextClassifier(vocab_size=40, model_type="distilbert",
                                         model_config={"dim": 64, "n_heads": 2, "hidden_dim": 128})
    distilbert.configure_model()
    assert (distilbert.model.config.dim, distilbert.model.config.n_layers) == (64, 2)  # dim wins, n_layers tiny


@pytest.mark.slow
def test_ddp_two_processes_agree_on_every_epoch_value(tmp_path):
    metrics = assert_ddp_ranks_agree("transformers_finetune.py", ["--trainer.max_epochs", "1"], tmp_path)
    assert {"val_loss", "val_acc", "val_f1"} <= set(metrics)


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_before_anything_is_built(template_main, tmp_path, monkeypatch, capsys):
    """A bad JSONL record is named by its line; a misspelt model_config key by its nearest name (a transformers config
    keeps any keyword: the typo would change nothing, silently); test and predict need their file. More cases:
    tests/test_bad_inputs.py."""
    write_reviews(tmp_path / "r.csv", n=10)
    (tmp_path / "long.csv").write_text("text,label\n" + "short,a\n" * 9 + "word " * 700 + ",b\n")
    good = "".join(json.dumps({"text": f"review {i}", "label": ["pos", "neg"][i % 2]}) + "\n" for i in range(20))
    for name, bad in (("broken", '{"text": "cut off'), ("no_label", json.dumps({"text": "no label here"})),
                      ("null_label", json.dumps({"text": "x", "label": None}))):
        (tmp_path / f"{name}.jsonl").write_text(good + bad + "\n")
    monkeypatch.chdir(tmp_path)
    main = template_main("transformers_finetune.py")
    for args, expected in ((["--data.data_path", "missing.csv"], "data not found"),
                           (["--data.data_path", "r.csv", "--data.text_column", "body"], "no column 'body'"),
                           (["--model.name_or_path", "./no_such_model"], "folder not found"),
                           (["--data.data_path", "long.csv", "--data.max_length", "600"],
                            "a text of 600 tokens exceeds the model's 512"),
                           (["--data.data_path", "broken.jsonl"], "line 21 is not JSON"),
                           (["--data.data_path", "no_label.jsonl"], "line 21 has no 'label' value"),
                           (["--data.data_path", "null_label.jsonl"], "line 21 has no 'label'"),
                           (["--model.model_config", '{"num_hiden_layers": 2}'], "did you mean: num_hidden_layers")):
        assert expected in refused_in_process(main, ["fit", *args, "--trainer.fast_dev_run", "true"], capsys), args
    for subcommand in ("test", "predict"):
        assert f"needs --data.{subcommand}_path" in refused_in_process(main, [subcommand], capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.gpu
def test_gpu_training(tmp_path):
    """bf16-mixed on the GPU with adamw() fused and clip_gradients: the shipped defaults train there."""
    result = run_template("transformers_finetune.py", "fit", "--config", CONFIGS / "gpu.yaml", "--trainer.max_epochs",
                          "3", *QUIET, cwd=tmp_path)
    assert_ok(result)
    assert kept_line(result.stdout)["val_acc"] >= 0.8
