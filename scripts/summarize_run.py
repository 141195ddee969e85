"""Summarize a Lightning run's logs: best and last value of each metric, progress, throughput, and warning flags.

Usage:
    python scripts/summarize_run.py runs/tabular                    # newest training log under the folder
    python scripts/summarize_run.py runs/tabular/lightning_logs/version_3 --format json
    python scripts/summarize_run.py runs/causal_lm --plot curves.png  # needs matplotlib
    python scripts/summarize_run.py runs/a --compare runs/b          # two runs side by side, and what differs

Reads a CSVLogger metrics.csv or TensorBoard event files. A run resumed with --ckpt_path logs into a new version
folder; given the run folder, the summary joins it to the earlier log(s) it continues ("resumed_from"). Flags:
nan_loss, divergence (training loss climbs well above its minimum), overfitting (validation loss rising while
training loss falls), plateau (the validation metric stopped improving), lr_constant (a logged learning rate never
changed), below_baseline (the network's best validation metric is worse than the simple model's logged beside it as
baseline_val_*, as tabular.py does). --compare: both runs' metrics side by side, then what made them differ: every
config.yaml value and, from the run.json the templates write beside it, package versions, git commit, seed and data
fingerprints. Exit codes: 0 ok, 2 bad input.
"""

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import yaml

MAXIMIZE = ("acc", "f1", "auc", "precision", "recall", "mfu", "per_sec", "iou", "map", "r2")
MINIMIZE = ("loss", "ppl", "perplexity", "error", "mse", "mae", "rmse")


def find_run(folder: Path) -> tuple:
    """(kind, paths, series) of the newest log under folder that holds a training loss: a later `test` or
    `predict` writes a log folder of its own, which must not hide the training run. Without one, the newest log
    that holds any metric. A resumed run (`--ckpt_path`) logs into a new version folder, so its series is joined to
    the earlier logs it continues (their points before its first step); paths lists them newest first.
    kind: 'csv' (path: metrics.csv) or 'tensorboard' (path: its folder)."""
    candidates = [("csv", p) for p in folder.rglob("metrics.csv")]
    candidates += [("tensorboard", d) for d in {p.parent for p in folder.rglob("events.out.tfevents.*")}]
    if not candidates:
        raise ValueError(f"no metrics.csv or TensorBoard event files under {folder}")
    logs = [(kind, path) for kind, path in sorted(candidates, key=lambda c: (c[1].stat().st_mtime, c[0] == "csv"),
                                                  reverse=True)]
    fallback = None
    for i, (kind, path) in enumerate(logs):
        series = read_log(kind, path)
        if series and train_loss_key(series):
            return kind, *join_resumed(path, series, logs[i + 1:])
        if series and fallback is None:
            fallback = kind, [path], series
    if fallback is None:
        raise ValueError(f"no log under {folder} holds metrics yet")
    return fallback


def read_log(kind: str, path: Path) -> dict:
    return read_csv(path) if kind == "csv" else read_tensorboard(path)


def first_train_step(series: dict) -> int:
    return min(step for step, _ in series[train_loss_key(series)])


def saved_config(path: Path) -> dict:
    """The config.yaml LightningCLI saves next to a run's log, or {}."""
    config = (path.parent if path.is_file() else path) / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError, yaml.YAMLError):  # not UTF-8 (a ValueError) or not YAML: no saved config
        return {}
    return data if isinstance(data, dict) else {}


def flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}


def made_by(path: Path) -> dict:
    """A run's config.yaml values and its run.json record (packages, git commit, seed, data), flattened."""
    record = (path.parent if path.is_file() else path) / "run.json"
    try:
        made = json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        made = {}
    made = {k: v for k, v in made.items() if k != "command"} if isinstance(made, dict) else {}
    return {**flatten(saved_config(path), "config."), **flatten(made, "run.")}


def compare(a: dict, a_path: Path, b: dict, b_path: Path) -> dict:
    """Metrics of two runs side by side (best, last) and every value that differs in what made them."""
    names = [n for n in a["metrics"]] + [n for n in b["metrics"] if n not in a["metrics"]]
    metrics = {n: {side: {k: r["metrics"][n][k] for k in ("best", "last")} if n in r["metrics"] else None
                   for side, r in (("a", a), ("b", b))} for n in names}
    first, second = made_by(a_path), made_by(b_path)
    differ = {k: [first.get(k), second.get(k)] for k in sorted(first.keys() | second.keys())
              if first.get(k) != second.get(k) and not k.endswith(("default_root_dir", ".path", "dirpath"))}
    return {"b": str(b_path), "metrics": metrics, "made_differently": differ}


def resumed(path: Path, series: dict) -> bool:
    """A fit resumed from a checkpoint has ckpt_path set in its saved config. Without a config, a log whose first
    epoch is past 0 continues an earlier run."""
    config = saved_config(path)
    if config:
        return bool(config.get("ckpt_path"))
    return min((v for _, v in series.get("epoch", [])), default=0) > 0


def run_root(path: Path) -> str:
    """What a resumed run shares with the run it continues: its default_root_dir (where its checkpoints live), or
    without a saved config the folder holding the version folders."""
    trainer = saved_config(path).get("trainer")
    root = trainer.get("default_root_dir") if isinstance(trainer, dict) else None
    return str(root) if root else str((path.parent if path.is_file() else path).parent)


def join_resumed(path: Path, series: dict, older: list) -> tuple:
    """([path, earlier paths...], series with the earlier logs' points before each resume prepended)."""
    paths = [path]
    if not resumed(path, series):
        return paths, series
    for kind, earlier_path in older:
        start = first_train_step(series)
        if run_root(earlier_path) != run_root(path):  # another run's log under the same folder (a study's trial)
            continue
        earlier = read_log(kind, earlier_path)
        if start <= 0 or not earlier or not train_loss_key(earlier) or first_train_step(earlier) >= start:
            continue
        cut = {k: [(s, v) for s, v in points if s < start] for k, points in earlier.items()}
        series = {k: cut.get(k, []) + series.get(k, []) for k in sorted({*cut, *series}) if cut.get(k) or series.get(k)}
        paths.append(earlier_path)
        if not resumed(earlier_path, earlier):
            break
    return paths, series


def number(text: str, where: str) -> float:
    """A logged value: a finite number, or nan/inf as CSVLogger writes them; text or an overflow (1e400) is refused."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not (math.isfinite(value) or text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity")):
        raise ValueError(f"{where}: {text[:40]!r} is not a number; fix or delete that row")
    return value


def read_csv(path: Path) -> dict:
    series: dict = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.DictReader(f)
            for row in rows:
                where = f"{path} line {rows.line_num}"
                if None in row:
                    raise ValueError(f"{where}: more values than the header has columns; fix or delete that row")
                step = number(row.get("step") or "0", f"{where} column step")
                if not (step.is_integer() and step >= 0):
                    raise ValueError(f"{where} column step: {row['step']!r} is not a whole number >= 0")
                for key, value in row.items():
                    if key in ("step",) or value in (None, ""):
                        continue
                    series.setdefault(key, []).append((int(step), number(value, f"{where} column {key}")))
    except UnicodeDecodeError as err:
        raise ValueError(f"cannot read {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except (OSError, csv.Error) as err:
        raise ValueError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    return series


def read_tensorboard(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag != "hp_metric"}  # TensorBoardLogger's placeholder (-1) for its hyperparameter table, not a metric


def direction(name: str):
    lowered = name.lower()
    if any(word in lowered for word in MINIMIZE):
        return "min"
    if any(word in lowered for word in MAXIMIZE):
        return "max"
    return None


def summarize(series: dict) -> dict:
    metrics = {}
    for name, points in sorted(series.items()):
        values = [v for _, v in points]
        finite = [v for v in values if math.isfinite(v)]
        way = direction(name)
        best = (min(finite) if way == "min" else max(finite)) if finite and way else None
        metrics[name] = {"best": best, "last": values[-1], "points": len(values), "goal": way,
                         "last_step": points[-1][0]}
    steps = max((p[-1][0] for p in series.values() if p), default=0)
    epochs = int(max((v for _, v in series.get("epoch", [])), default=-1)) + 1
    throughput = {k: m["last"] for k, m in metrics.items() if "per_sec" in k or k.endswith("mfu")}
    return {"metrics": metrics, "steps": steps, "epochs": epochs, "throughput": throughput,
            "flags": flags(series)}


def train_loss_key(series: dict):
    for key in ("train_loss_step", "train_loss", "train_loss_epoch", "loss"):
        if key in series:
            return key
    return next((k for k in series if k.startswith("train") and "loss" in k), None)


def flags(series: dict) -> list:
    out = []
    for name, points in series.items():
        if "loss" in name and any(not math.isfinite(v) for _, v in points):
            step = next(s for s, v in points if not math.isfinite(v))
            out.append({"flag": "nan_loss", "detail": f"{name} is not finite from step {step}: lower the learning"
                        " rate, clip gradients, check the data; use bf16-mixed rather than 16-mixed"})
    train_key = train_loss_key(series)
    train = [(s, v) for s, v in series.get(train_key, []) if math.isfinite(v)] if train_key else []
    if len(train) >= 6:
        low = min(v for _, v in train)
        tail = [v for _, v in train[-max(3, len(train) // 10):]]
        if sum(tail) / len(tail) > 1.5 * low + 1e-8 and tail[-1] > train[0][1] * 0.9:
            out.append({"flag": "divergence", "detail": f"{train_key} climbed from its minimum {low:.4g} to"
                        f" {tail[-1]:.4g}: lower the learning rate or add warm-up and gradient clipping"})
    val = [(s, v) for s, v in series.get("val_loss", []) if math.isfinite(v)]
    if len(val) >= 4 and train:
        best_step, best = min(val, key=lambda p: p[1])
        later_train = [v for s, v in train if s > best_step]
        train_at_best = [v for s, v in train if s <= best_step]
        if val[-1][1] > best * 1.05 and val[-2][1] > best and later_train and train_at_best \
                and sum(later_train) / len(later_train) < train_at_best[-1]:
            out.append({"flag": "overfitting", "detail": f"val_loss rose from {best:.4g} (step {best_step}) to"
                        f" {val[-1][1]:.4g} while {train_key} kept falling: use the best checkpoint, add data,"
                        " regularization or early stopping"})
    monitored = "val_loss" if "val_loss" in series else next((k for k in series if k.startswith("val_")), None)
    points = [v for _, v in series.get(monitored, []) if math.isfinite(v)] if monitored else []
    if len(points) >= 6:
        way = direction(monitored) or "min"
        window = max(3, len(points) * 3 // 10)
        before, recent = points[:-window], points[-window:]
        best_before = min(before) if way == "min" else max(before)
        best_recent = min(recent) if way == "min" else max(recent)
        gain = (best_before - best_recent) if way == "min" else (best_recent - best_before)
        if gain <= 0.005 * abs(best_before):
            out.append({"flag": "plateau", "detail": f"{monitored} has not improved over its last {window}"
                        " evaluations: stop, lower the learning rate, or change the model/data"})
    worse = []  # tabular.py logs a simple model's scores on the same rows beside the network's
    for name, pts in sorted(series.items()):
        ours = name[len("baseline_"):]
        if not name.startswith("baseline_val_") or ours not in series or not direction(ours):
            continue
        theirs = [v for _, v in pts if math.isfinite(v)]
        mine = [v for _, v in series[ours] if math.isfinite(v)]
        if theirs and mine:
            best = min(mine) if direction(ours) == "min" else max(mine)
            if (best > theirs[-1]) if direction(ours) == "min" else (best < theirs[-1]):
                worse.append(f"{ours} {best:.4g} vs {theirs[-1]:.4g}")
    if worse:
        out.append({"flag": "below_baseline", "detail": f"the network's best is worse than the baseline's on the same"
                    f" rows ({', '.join(worse)}): use the simple model, or try more epochs, another lr or more data"})
    for name, pts in series.items():
        if name.startswith("lr") and len(pts) >= 3 and len({v for _, v in pts}) == 1:
            out.append({"flag": "lr_constant", "detail": f"{name} stayed {pts[0][1]:.3g} for the whole run: is"
                        " the scheduler attached (interval 'step' or 'epoch')?"})
    return out


def plot(series: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib: python -m pip install matplotlib"
    names = [n for n in sorted(series) if n != "epoch" and len(series[n]) > 1]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * max(1, len(names))), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ax.plot([s for s, _ in series[name]], [v for _, v in series[name]])
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return ""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder (default_root_dir, lightning_logs or a version folder)")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    parser.add_argument("--plot", help="PNG file for the metric curves (needs matplotlib)")
    parser.add_argument("--compare", metavar="OTHER_RUN", help="another run folder: both side by side")
    args = parser.parse_args(argv)
    folder = Path(args.run_dir)
    try:
        if not folder.is_dir():
            raise ValueError(f"no such folder: {folder}")
        if args.plot and Path(args.plot).exists():
            raise ValueError(f"{args.plot} exists: choose a new --plot file name (nothing was written)")
        if args.plot and not Path(args.plot).resolve().parent.is_dir():
            raise ValueError(f"no folder for --plot {args.plot}: create it first (nothing was written)")
        kind, paths, series = find_run(folder)
        if args.compare:
            if not Path(args.compare).is_dir():
                raise ValueError(f"no such folder: {args.compare}")
            other_kind, other_paths, other_series = find_run(Path(args.compare))
    except ValueError as err:
        print(f"summarize_run.py: error: {err}", file=sys.stderr)
        return 2
    report = {"source": str(paths[0]), "resumed_from": [str(p) for p in paths[1:]], "format": kind,
              **summarize(series)}
    if args.compare:
        report["compare"] = compare(report, paths[0], summarize(other_series), other_paths[0])
    if args.plot:
        report["plot_error"] = plot(series, Path(args.plot)) or None
        if report["plot_error"]:
            print(f"summarize_run.py: {report['plot_error']}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(report, indent=2))
        return 0
    print(f"run: {paths[0]} ({kind}); {report['epochs']} epoch(s), last logged step {report['steps']}")
    if report["resumed_from"]:
        print(f"resumed: joined with the earlier log(s) it continues: {', '.join(report['resumed_from'])}")
    print(f"{'metric':<34} {'best':>12} {'last':>12} {'points':>7}")
    for name, m in report["metrics"].items():
        best = "-" if m["best"] is None else f"{m['best']:.5g}"
        print(f"{name:<34} {best:>12} {m['last']:>12.5g} {m['points']:>7}")
    for flag in report["flags"]:
        print(f"FLAG {flag['flag']}: {flag['detail']}")
    if not report["flags"]:
        print("flags: none")
    if args.compare:
        def show(side):
            return "-" if side is None or side["best"] is None else f"{side['best']:.5g}"

        print(f"\ncompared with {other_paths[0]}:\n{'metric':<34} {'best (this)':>12} {'best (other)':>12}")
        for name, sides in report["compare"]["metrics"].items():
            print(f"{name:<34} {show(sides['a']):>12} {show(sides['b']):>12}")
        for key, (one, two) in report["compare"]["made_differently"].items():
            print(f"differs: {key}: {one!r} -> {two!r}")
        if not report["compare"]["made_differently"]:
            print("made alike: the same config, packages, commit, seed and data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
