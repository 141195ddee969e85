"""image_classifier.py on generated shapes with tiny local backbones: fit, test, predict, transfer, exact resume,
processors, the layouts and image modes users have, bad input."""

import csv
import json
import shutil
import sys

import pytest
import torch

from conftest import (QUIET, TEMPLATES, assert_ok, assert_one_error_line, callback_config, kept_line, load_ckpt,
                      load_module, run, run_exported, run_template, save_tiny_backbone)

ic = load_module(TEMPLATES / "image_classifier.py", "image_classifier")
FAST = [*QUIET, "--data.num_workers", "0", "--data.batch_size", "32"]


def fit(*args, cwd, root="runs/image_classifier", **kwargs):
    result = run_template("image_classifier.py", "fit", *FAST, "--trainer.default_root_dir", root, *args, cwd=cwd,
                          **kwargs)
    assert_ok(result)
    return result


def test_fit_test_and_predict_on_the_generated_shapes(tmp_path, tiny_resnet):
    """No data given: the generated shapes (runs/shapes), from scratch; test prints per-class accuracy and the
    confusions; predict writes each file's class and confidence where it says."""
    trained = fit("--model.backbone", tiny_resnet, "--model.pretrained", "false", "--model.lr", "3e-3",
                  "--trainer.max_epochs", "12", cwd=tmp_path)
    kept = kept_line(trained.stdout)
    assert kept["val_acc"] >= 0.9, trained.stdout[-1500:]
    assert sorted(p.name for p in (tmp_path / "runs" / "shapes").iterdir()) == ["circle", "square", "star",
                                                                                  "triangle"]
    tested = run_template("image_classifier.py", "test", *FAST, "--ckpt_path", kept["checkpoint"], cwd=tmp_path)
    assert_ok(tested)
    assert "per-class test accuracy" in tested.stdout and "  triangle  " in tested.stdout
    assert "most frequent confusions" in tested.stdout or "no confusions" in tested.stdout
    predicted = run_template("image_classifier.py", "predict", *FAST, "--ckpt_path", kept["checkpoint"],
                             "--trainer.default_root_dir", "runs/image_classifier", cwd=tmp_path)
    assert_ok(predicted)
    path = tmp_path / "runs" / "image_classifier" / "predictions" / "best.csv"
    assert f"predictions written to {path}" in predicted.stdout
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 88 and set(rows[0]) == {"file", "prediction", "confidence", "label"}
    assert all((tmp_path / r["file"]).is_file() and r["label"] == (tmp_path / r["file"]).parent.name for r in rows)
    assert sum(r["prediction"] == r["label"] for r in rows) >= 0.85 * len(rows)

    # export: model.pt2 gives the checkpoint's probabilities (normalization inside) with torch alone
    exported = run_template("image_classifier.py", "export", "--out", "exported", cwd=tmp_path)
    assert_ok(exported)
    about = json.loads((tmp_path / "exported" / "about.json").read_text())
    assert about["outputs"]["classes"] == ["circle", "square", "star", "triangle"]
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)  # tiny_resnet's input size
    model = ic.ImageClassifier.load_from_checkpoint(kept["checkpoint"], map_location="cpu", weights_only=True).eval()
    with torch.no_grad():
        expected = model.probabilities(images)
    outputs, imported_lightning = run_exported(tmp_path / "exported", images)
    assert torch.allclose(outputs, expected, atol=1e-5) and not imported_lightning


@pytest.mark.slow
def test_a_pretrained_backbone_beats_the_same_backbone_from_scratch(tmp_path, tiny_resnet):
    """Transfer, not only loading: a backbone trained on four shapes learns four others from 20 images each better
    than the same network from random values, at equal steps."""
    first = ic.make_shapes(tmp_path / "first", ("circle", "square", "cross", "ring"), per_class=150, size=48, seed=1)
    second = ic.make_shapes(tmp_path / "second", ("triangle", "star", "diamond", "hexagon"), per_class=60, size=48,
                            seed=2)  # 20 training and 40 validation images a class
    pretrained = fit("--data.data_path", first, "--model.backbone", tiny_resnet, "--model.pretrained", "false",
                     "--model.lr", "3e-3", "--trainer.max_epochs", "15", root="first", cwd=tmp_path)
    assert kept_line(pretrained.stdout)["val_acc"] >= 0.9
    model = ic.ImageClassifier.load_from_checkpoint(kept_line(pretrained.stdout)["checkpoint"], weights_only=True)
    model.save_pretrained(tmp_path / "shapes_backbone")
    scores = {}
    for start in ("true", "false"):
        result = fit("--data.data_path", second, "--data.val_fraction", "0.67", "--data.test_fraction", "0",
                     "--model.backbone", tmp_path / "shapes_backbone", "--model.pretrained", start,
                     "--model.backbone_lr_scale", "1.0",  # these features are from a task much like this one
                     "--model.lr", "3e-3", "--trainer.max_epochs", "10", "--data.batch_size", "16",
                     "--early_stopping.patience", "10",
                     root=f"second_{start}", cwd=tmp_path)
        scores[start] = kept_line(result.stdout)
    print(scores)  # measured: val_acc 0.74 against 0.55, val_loss 0.66 against 1.08 (50 steps, 160 images)
    assert scores["true"]["val_acc"] >= scores["false"]["val_acc"] + 0.08, scores
    assert scores["true"]["val_loss"] <= scores["false"]["val_loss"] - 0.15, scores
    head = load_ckpt(tmp_path / "second_true" / "checkpoints" / "best.ckpt")["hyper_parameters"]
    assert head["class_names"] == ["diamond", "hexagon", "star", "triangle"]


def test_kill_and_resume_across_the_unfreeze_epoch_ends_with_the_same_weights(tmp_path, tiny_resnet):
    """kill -9 after the frozen epoch (the backbone unmoved), --ckpt_path last: it unfreezes at the same epoch and ends
    with the uninterrupted run's weights (strong augmentation in two workers, seeded from the checkpoint)."""
    args = ["--model.backbone", tiny_resnet, "--model.freeze_epochs", "1", "--trainer.max_epochs", "3",
            "--data.augment", "strong", "--data.num_workers", "2", "--data.data_path", ic.make_shapes(
                tmp_path / "shapes", per_class=30, size=40)]
    killed = run_template("image_classifier.py", "fit", *FAST, *args, "--trainer.default_root_dir", "killed",
                          "--config", callback_config(tmp_path / "kill.yaml", "KillAfterEpoch", epoch=0),
                          cwd=tmp_path, tests_on_path=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    after_frozen = load_ckpt(tmp_path / "killed" / "checkpoints" / "last.ckpt")["state_dict"]
    original = ic.build_network(str(tiny_resnet), True, ["a", "b", "c", "d"]).state_dict()
    body = [k for k in original if k.startswith("resnet.") and "running" not in k and "num_batches" not in k]
    assert all(torch.equal(after_frozen[f"net.{k}"], original[k]) for k in body)
    fit(*args, "--ckpt_path", "last", root="killed", cwd=tmp_path)
    fit(*args, root="straight", cwd=tmp_path)
    resumed = load_ckpt(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    straight = load_ckpt(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"]
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert not torch.equal(straight["state_dict"][f"net.{body[0]}"], original[body[0]])  # unfrozen, then trained


def test_two_backbones_whose_processors_differ_both_train(tmp_path, tiny_resnet, tiny_vit):
    """Size, resizing and normalization come from each backbone's processor config: a ViT takes only its own 24 x 24
    inputs, so its training at all proves the size was read."""
    assert ic.processing_of(str(tiny_resnet), None) == {
        "size": 32, "resize_ratio": 36 / 32, "squash": False, "resample": 3,  # int(32 / 0.875), as transformers
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    assert ic.processing_of(str(tiny_vit), None)["size"] == 24 and ic.processing_of(str(tiny_vit), 20)["size"] == 20
    shapes = ic.make_shapes(tmp_path / "shapes", per_class=20, size=40)
    for name, backbone in (("vit", tiny_vit), ("resnet", tiny_resnet)):
        fit("--data.data_path", shapes, "--model.backbone", backbone, "--trainer.max_epochs", "1", root=name,
            cwd=tmp_path)
        processing = load_ckpt(tmp_path / name / "checkpoints" / "last.ckpt")["hyper_parameters"]["processing"]
        assert processing == ic.processing_of(str(backbone), None)
    for name in ("vit", "resnet"):  # and back: an exported folder's processor config reads as the same processing
        model = ic.ImageClassifier.load_from_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt").eval()
        model.save_pretrained(tmp_path / f"exported_{name}")
        assert ic.processing_of(str(tmp_path / f"exported_{name}"), None) == model.hparams.processing
    from PIL import Image
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(tmp_path / "exported_resnet"))  # transformers alone
    assert {r["label"] for r in classify(Image.new("RGB", (50, 40), (200, 10, 10)))} == set(model.hparams.class_names)


@pytest.mark.parametrize("config, expected", [
    ({"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 384}, "crop_pct": 0.875},
     {"size": 384, "resize_ratio": 1.0, "squash": True}),  # from 384 px ConvNeXt resizes to a square, no crop
    ({"image_processor_type": "DeiTImageProcessor", "size": {"height": 256, "width": 256}, "do_center_crop": True,
      "crop_size": {"height": 224, "width": 224}}, {"size": 224, "resize_ratio": round(256 / 224, 6), "squash": True}),
    ({"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 256}, "do_center_crop": True,
      "crop_size": {"height": 224, "width": 224}}, {"size": 224, "resize_ratio": round(256 / 224, 6), "squash": False}),
    ({"image_processor_type": "EfficientNetImageProcessor", "size": {"height": 224, "width": 224},
      "image_std": [0.5, 0.5, 0.5], "include_top": True}, {"size": 224, "image_std": [0.25, 0.25, 0.25]}),
])
def test_processor_configs_of_other_families(config, expected, tmp_path):
    """As each family's processor does: ConvNeXt from 384 px and DeiT squash; EfficientNet (include_top) divides by
    std twice."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processing = ic.processing_of(str(tmp_path), None)
    assert {key: processing[key] for key in expected} == expected


def write_exif_rotated_jpeg(path):
    """A 20 x 10 JPEG whose EXIF says 'rotate 90 degrees clockwise to view' (orientation 6)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (20, 10), (200, 0, 0)).save(path, exif=exif.tobytes())


def test_the_layouts_and_image_modes_users_have(tmp_path):
    """Grey, palette, transparent and EXIF-rotated images come out RGB and upright; a CSV of path,label,split and a
    folder of train/ val/ test/ give their own splits."""
    from PIL import Image

    Image.new("L", (8, 8), 90).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("P", (8, 8), 3).save(tmp_path / "palette.gif")
    write_exif_rotated_jpeg(tmp_path / "turned.jpg")
    assert ic.load_image(tmp_path / "grey.png").getpixel((0, 0)) == (90, 90, 90)
    assert ic.load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # transparency over white
    assert ic.load_image(tmp_path / "palette.gif").mode == "RGB"
    assert ic.load_image(tmp_path / "turned.jpg").size == (10, 20)
    Image.new("I;16", (8, 8), 40000).save(tmp_path / "deep.png")
    assert ic.load_image(tmp_path / "deep.png").getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "keyed.png", transparency=(1, 2, 3))
    assert ic.load_image(tmp_path / "keyed.png").getpixel((0, 0)) == (255, 255, 255)

    shapes = ic.make_shapes(tmp_path / "shapes", ("circle", "square"), per_class=12, size=32)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for n, image in enumerate(sorted(shapes.rglob("*.png"))):
            writer.writerow([image.relative_to(tmp_path), image.parent.name, ("train", "val", "test", "train")[n % 4]])
    files, labels, splits = ic.read_images(tmp_path / "labels.csv")
    assert len(files) == 24 and splits.count("val") == 6 and set(labels) == {"circle", "square"}
    for split in ("train", "valid", "test"):
        for shape in ("circle", "square"):
            (tmp_path / "split" / split / shape).mkdir(parents=True)
            for image in sorted((shapes / shape).iterdir())[:3]:
                (tmp_path / "split" / split / shape / image.name).write_bytes(image.read_bytes())
    files, labels, splits = ic.read_images(tmp_path / "split")
    assert sorted(set(splits)) == ["test", "train", "val"] and splits.count("val") == 6
    for image in (tmp_path / "split" / "valid").rglob("*.png"):  # train/ and test/ only: val comes from train
        (tmp_path / "split" / "train" / image.parent.name / f"v{image.name}").write_bytes(image.read_bytes())
    shutil.rmtree(tmp_path / "split" / "valid")
    no_val = ic.ImageData(data_path=str(tmp_path / "split"), processor="imagenet", val_fraction=0.25)
    assert {name: len(idx) for name, idx in no_val.splits.items()} == {"train": 8, "val": 4, "test": 6}
    data = ic.ImageData(data_path=str(tmp_path / "labels.csv"), processor=str(tmp_path), image_size=16)
    assert {name: len(idx) for name, idx in data.splits.items()} == {"train": 12, "val": 6, "test": 6}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("case, expected", [
    ("not an image", "not readable images"),
    ("truncated", "cannot decode image"),
    ("empty class folder", "hold no images"),
    ("mistyped backbone", "did you mean: microsoft/resnet-18"),
    ("weights of another architecture", "do not fit its config"),
    ("a text model", "is not an image classifier"),
])
def test_bad_input_is_one_line_and_writes_no_checkpoint(tmp_path, tiny_resnet, tiny_bert, case, expected):
    shapes = ic.make_shapes(tmp_path / "shapes", ("circle", "square"), per_class=10, size=32)
    backbone = tiny_resnet
    if case == "not an image":
        (shapes / "circle" / "notes.png").write_text("not a picture")
    elif case == "truncated":
        for image in (shapes / "square").iterdir():
            truncate(image)
    elif case == "empty class folder":
        (shapes / "triangle").mkdir()
    elif case == "mistyped backbone":
        backbone = "microsoft/resnet18"
    elif case == "a text model":
        backbone = tiny_bert
    else:  # a ViT's weights beside a ResNet's config
        backbone = tmp_path / "mixed"
        save_tiny_backbone(backbone, "vit")
        (backbone / "config.json").write_bytes((tiny_resnet / "config.json").read_bytes())
    result = run_template("image_classifier.py", "fit", *FAST, "--data.data_path", shapes, "--model.backbone",
                          backbone, "--trainer.max_epochs", "1", "--data.image_size", "24", cwd=tmp_path,
                          env=("HF_HUB_OFFLINE=1",))
    assert_one_error_line(result, expected)
    assert not list(tmp_path.glob("runs/**/*.ckpt"))


@pytest.mark.slow
def test_ddp_trains_with_a_frozen_backbone(tmp_path, tiny_resnet):
    """Two CPU processes, DDP: plain DDP stops at the frozen epoch's second step (parameters without gradients), so
    the template sets find_unused_parameters for a fit that freezes."""
    shapes = ic.make_shapes(tmp_path / "shapes", per_class=20, size=32)  # 28 training images per process
    result = run_template("image_classifier.py", "fit", *FAST, "--data.batch_size", "8", "--data.data_path", shapes,
                          "--model.backbone", tiny_resnet, "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
                          "--trainer.devices", "2", cwd=tmp_path)  # strategy auto: Lightning picks DDP
    assert_ok(result)
    assert "DDP with find_unused_parameters" in result.stdout + result.stderr
    last = load_ckpt(tmp_path / "runs" / "image_classifier" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 1


@pytest.mark.gpu
def test_gpu_fine_tuning_in_bf16_with_channels_last(tmp_path, tiny_resnet):
    """configs/gpu.yaml (bf16-mixed) with a pretrained backbone: trains, and the backbone's weights stay float32."""
    shapes = ic.make_shapes(tmp_path / "shapes", per_class=40, size=32)
    fit("--config", TEMPLATES / "configs" / "gpu.yaml", "--data.data_path", shapes, "--model.backbone", tiny_resnet,
        "--model.pretrained", "false", "--model.lr", "3e-3", "--trainer.max_epochs", "8", cwd=tmp_path)
    best = load_ckpt(tmp_path / "runs" / "image_classifier" / "checkpoints" / "best.ckpt")
    assert best["state_dict"]["net.classifier.1.weight"].dtype == torch.float32
    assert best["state_dict"]["net.resnet.embedder.embedder.convolution.weight"].is_contiguous(
        memory_format=torch.channels_last)


OWN_NETWORK = '''def build_network(backbone: str, with_weights: bool, class_names: list) -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, len(class_names)))


'''


def test_a_network_of_your_own_in_the_marked_place(tmp_path):
    """A plain nn.Module returning logits: ImageNet's normalization by name, no processor config or download,
    nothing to freeze (a warning), and test runs on the kept checkpoint."""
    source = (TEMPLATES / "image_classifier.py").read_text()
    start, end = source.index("def build_network("), source.index("def nearest_backbones(")
    (tmp_path / "image_classifier.py").write_text(source[:start] + OWN_NETWORK + source[end:])
    (tmp_path / "lightning_support.py").write_bytes((TEMPLATES / "lightning_support.py").read_bytes())
    ic.make_shapes(tmp_path / "runs" / "shapes", per_class=12, size=32)
    args = [*FAST, "--data.processor", "imagenet", "--data.image_size", "24", "--model.backbone", "mine"]
    trained = run([sys.executable, "image_classifier.py", "fit", *args, "--trainer.max_epochs", "2"], cwd=tmp_path,
                  env=("HF_HUB_OFFLINE=1",))
    assert_ok(trained)
    assert "no separate head to train first" in trained.stderr
    tested = run([sys.executable, "image_classifier.py", "test", *args, "--ckpt_path", "best"], cwd=tmp_path)
    assert_ok(tested)
    assert "per-class test accuracy" in tested.stdout
