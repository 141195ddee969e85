"""Hyperparameter search with Optuna over a LightningCLI template's configuration, with pruning and crash-safe storage.

Each trial builds the template's model, data and Trainer from its config plus the trial's values, trains with an
Optuna pruning callback and reports the monitored validation metric. Trials live in a database (SQLite by default):
rerunning the command after a crash keeps the finished trials and continues to --n-trials; several processes (or
machines sharing a database URL) can work on one study.

    cd my_project   # a folder scaffold.py made
    python SKILL/scripts/hpo_optuna.py --config config.yaml --n-trials 20   # its template, trials in runs/hpo
    python SKILL/scripts/hpo_optuna.py --script my_project/causal_lm.py --config my_project/config.yaml
    python SKILL/scripts/hpo_optuna.py --space space.yaml --monitor val_acc --direction maximize
    python SKILL/scripts/hpo_optuna.py --lr-find --n-trials 20   # Tuner.lr_find first; its lr is trial 0
    (two workers on one study: start the same command twice, e.g. with & in a shell)

The template is the .py file that imports lightning_support, as scaffold.py leaves it. At the end it prints a table of
the trials and writes the best configuration (--output, default best_config.yaml), which
`python TEMPLATE.py fit --config best_config.yaml` trains as it is. Needs optuna and optuna-integration.
Exit codes: 0 ok, 2 bad input (unknown search-space key, unreachable storage, existing output file).
"""

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other scripts of this folder
from launch import OneLineParser, UsageError, find_template, read_yaml  # noqa: E402

# ---- search spaces by --script name: edit here, or pass --space FILE.yaml with the same structure ----------------
SEARCH_SPACES = yaml.safe_load("""
tabular.py:
  model.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
  model.dropout: {type: float, low: 0.0, high: 0.5}
  model.weight_decay: {type: float, low: 1.0e-6, high: 1.0e-1, log: true}
  data.batch_size: {type: categorical, choices: [32, 64, 128]}
image_classifier.py:  # the head's lr; the backbone trains at lr x backbone_lr_scale after freeze_epochs
  model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  model.backbone_lr_scale: {type: float, low: 0.01, high: 1.0, log: true}
  model.weight_decay: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
  data.augment: {type: categorical, choices: [light, strong]}
transformers_finetune.py:  # fine-tuning wants ~5e-5, a tiny model from scratch ~1e-3
  model.learning_rate: {type: float, low: 1.0e-5, high: 3.0e-3, log: true}
  model.weight_decay: {type: float, low: 0.0, high: 0.1}
  data.batch_size: {type: categorical, choices: [16, 32, 64]}
causal_lm.py:
  model.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  model.warmup_steps: {type: int, low: 0, high: 100}
custom.py:  # as shipped (AdamW); a model of your own takes its own options and ranges: pass --space
  model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  data.batch_size: {type: categorical, choices: [32, 64, 128]}
""")
# ---- end of the search spaces ----


RERUN = "rerun the same command to continue the study"


class Stopped(Exception):
    """(how, exit code): Ctrl-C or SIGTERM during a trial. Optuna records the trial as failed (a SystemExit would leave
    it RUNNING until the heartbeat's grace period)."""


def load_script(path: Path):
    if not path.is_file():
        raise UsageError(f"no such training script: {path}: pass --script")
    sys.path.insert(0, str(path.resolve().parent))  # the template imports lightning_support from its own folder
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # spawned DataLoader workers and pickling find the module by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a bug or a missing package: one line, not this script's traceback
        sys.modules.pop(path.stem, None)
        raise UsageError(f"cannot import {path}: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    code = getattr(getattr(module, "main", None), "__code__", None)
    if code is None or "run" not in code.co_varnames:
        raise UsageError(f"{path.name} has no main(args, run, callbacks): use a template from this skill")
    return module


def base_configs(args, folder: Path) -> list:
    """--config arguments: copies of the --config files in folder, less the `fit`-only keys the template's parser
    refuses when it only builds the objects."""
    out = []
    for i, name in enumerate(args.config):
        data = read_yaml(Path(name))
        for key in ("ckpt_path", "weights_only", "config"):
            data.pop(key, None)
        copy = folder / f"base_config_{i}.yaml"
        copy.write_text(yaml.safe_dump(data, sort_keys=False))
        out += ["--config", str(copy)]
    return out


def suggest(trial, space: dict) -> dict:
    values = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        else:
            draw = trial.suggest_float if spec["type"] == "float" else trial.suggest_int
            values[key] = draw(key, spec["low"], spec["high"], log=spec.get("log", False))
    return values


def cli_args(base: list, values: dict, root=None) -> list:
    folder = ["--trainer.default_root_dir", str(root)] if root else []
    return base + folder + [f"--{key}={as_argument(value)}" for key, value in values.items()]


def as_argument(value) -> str:
    """A value as the template's parser reads it back: a string bare (quoted, it is no Literal's choice) unless YAML
    would read it as something else ("true", "1e-3"), the rest as JSON."""
    if isinstance(value, str) and not value.startswith(("'", '"')) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def build(module, args: list, callbacks=()):
    """The template's CLI without running it; its own one-line error and exit code 2 on bad keys or values."""
    argv, sys.argv = sys.argv, [module.__file__]  # the template reads only `args`, not this script's flags
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return module.main(args, run=False, callbacks=tuple(callbacks))
    finally:
        sys.argv = argv


def check_space(module, base: list, space: dict) -> dict:
    """The space with numeric bounds (YAML reads 1e-4 as a string), finite, low < high, low > 0 on a log scale; with a
    template (module), one it accepts (each key at its lowest value or first choice)."""
    checked, lowest = {}, {}
    for key, spec in space.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in ("float", "int", "categorical"):
            raise UsageError(f"search space {key!r}: needs type float, int or categorical")
        spec = dict(spec)
        try:
            if kind == "categorical":
                assert isinstance(spec["choices"], list) and spec["choices"]
            else:
                number = float if kind == "float" else int
                spec["low"], spec["high"] = number(spec["low"]), number(spec["high"])
                assert (0 if spec.get("log") else -math.inf) < spec["low"] < spec["high"] < math.inf
        except (KeyError, TypeError, ValueError, OverflowError, AssertionError):
            need = "a non-empty list of choices" if kind == "categorical" else "finite numbers low < high" \
                f" (low > 0 with log; got low={spec.get('low')!r}, high={spec.get('high')!r})"
            raise UsageError(f"search space {key!r}: {kind} needs {need}") from None
        checked[key] = spec
        lowest[key] = spec["choices"][0] if kind == "categorical" else spec["low"]
    if module is not None:
        build(module, cli_args(base, lowest))  # an unknown key exits 2 with the template's nearest-key message
    return checked


def open_study(args):
    import optuna

    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    for attempt in range(3):  # workers starting together race to create the schema: the loser retries
        try:
            storage = optuna.storages.RDBStorage(args.storage, heartbeat_interval=30, grace_period=120)
            return optuna.create_study(study_name=args.study_name, storage=storage, direction=args.direction,
                                       pruner=pruner, load_if_exists=True)
        except Exception as err:  # sqlalchemy raises many types for a bad URL or an unreachable server
            if attempt == 2:
                raise UsageError(f"cannot open storage {args.storage!r}: {str(err).splitlines()[0][:200]}")
            time.sleep(1 + attempt)


def objective(module, base: list, space: dict, args):
    from optuna_integration import PyTorchLightningPruningCallback

    def run_trial(trial) -> float:
        values = suggest(trial, space)
        pruning = PyTorchLightningPruningCallback(trial, monitor=args.monitor)
        root = Path(args.runs) / args.study_name / f"trial_{trial.number}"
        cli = build(module, cli_args(base, values, root), [pruning])
        # a trial is never resumed: no last-on-exception.ckpt (and its "continue with" line) when it is pruned
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if type(c).__name__ != "CheckpointOnException"]
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        except SIGTERMException:
            raise Stopped("SIGTERM", 128 + signal.SIGTERM) from None
        except SystemExit as err:  # Lightning turns Ctrl-C into sys.exit(1) after its clean-up
            if isinstance(err.__context__, KeyboardInterrupt):
                raise Stopped("Ctrl-C", 128 + signal.SIGINT) from None
            raise
        pruning.check_pruned()  # only acts under DDP, where pruning is decided on rank 0
        metrics = cli.trainer.callback_metrics
        if args.monitor not in metrics:
            raise UsageError(f"the run logged no {args.monitor!r} (it logged: {', '.join(sorted(metrics))}): pass"
                             " --monitor with a logged validation metric")
        best = cli.trainer.checkpoint_callback  # the template's best.ckpt: the model the exported config will keep
        if best is not None and best.monitor == args.monitor and best.best_model_score is not None:
            return float(best.best_model_score)
        return float(metrics[args.monitor])

    return run_trial


def check_tuner(module, base: list, args) -> None:
    """Refuse, before a study exists, the Tuner steps Lightning refuses: scale_batch_size under a distributed strategy
    (DDP even on one device, FSDP, DeepSpeed), and either step beside the same finder as a callback."""
    from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
    from lightning.pytorch.strategies import ParallelStrategy

    trainer = build(module, base).trainer
    if args.scale_batch_size and isinstance(trainer.strategy, ParallelStrategy):
        raise UsageError(f"--scale-batch-size cannot run under strategy {type(trainer.strategy).__name__} (Lightning's"
                         " batch-size finder refuses distributed strategies): leave out the multi-device config, or"
                         " drop --scale-batch-size and search data.batch_size in the space")
    for flag, finder in (("--scale-batch-size", BatchSizeFinder), ("--lr-find", LearningRateFinder)):
        if getattr(args, flag[2:].replace("-", "_")) and any(isinstance(c, finder) for c in trainer.callbacks):
            raise UsageError(f"{flag} and a {finder.__name__} callback in the config both tune: drop one of them")


def pre_tune(module, base: list, args, space: dict) -> dict:
    """Optional Tuner steps on the base config; their results, kept inside the search space, become trial 0."""
    from lightning.pytorch.tuner import Tuner

    found, root = {}, Path(args.runs) / "tuner"
    if args.scale_batch_size:
        cli = build(module, cli_args(base, found, root))
        size = Tuner(cli.trainer).scale_batch_size(cli.model, datamodule=cli.datamodule, mode="power",
                                                   init_val=cli.datamodule.hparams.batch_size)
        found["data.batch_size"] = within_space(space.get("data.batch_size"), int(size))
    if args.lr_find:
        cli = build(module, cli_args(base, found, root))
        name = "lr" if "lr" in cli.model.hparams else "learning_rate"
        finder = Tuner(cli.trainer).lr_find(cli.model, datamodule=cli.datamodule, attr_name=name)
        if finder.suggestion() is None:
            print("tuner: lr_find made no suggestion (too few batches, or the loss never fell); trial 0 keeps the lr")
        else:
            found[f"model.{name}"] = within_space(space.get(f"model.{name}"), float(finder.suggestion()))
    if found:
        print(f"tuner: {found}")
    return found


def within_space(spec, value):
    """The Tuner's value inside the space (Optuna refuses an enqueued value outside it): the largest choice not above
    it (else the smallest), or clamped to [low, high]."""
    if not spec:
        return value
    if spec["type"] == "categorical":
        fitting = [c for c in spec["choices"] if isinstance(c, (int, float)) and c <= value]
        return max(fitting) if fitting else min(spec["choices"])
    return min(max(value, spec["low"]), spec["high"])


def export_best(module, base: list, study, path: Path) -> None:
    cli = build(module, cli_args(base, study.best_trial.params))
    data = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    for key in ("config", "ckpt_path"):
        data.pop(key, None)
    for value in data.values():  # checkpoint folders follow the final run's --trainer.default_root_dir
        if isinstance(value, dict) and "dirpath" in value:
            value["dirpath"] = None
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # beside it, linked into place: never half-written
    try:
        staged.write_text(f"# best of study {study.study_name!r}: trial {study.best_trial.number}, value"
                          f" {study.best_value:.6g}\n" + yaml.safe_dump(data, sort_keys=False))
        os.link(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def print_table(study) -> None:
    print(f"{'trial':>5} {'state':<9} {'value':>10}  params")
    for t in sorted(study.trials, key=lambda t: t.number):
        value = "-" if t.value is None else f"{t.value:.5g}"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        print(f"{t.number:>5} {t.state.name:<9} {value:>10}  {params}")


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    add = parser.add_argument
    add("--script", help="template to tune (default: the one in the current folder)")
    add("--config", action="append", default=[], help="base config(s) for the template")
    add("--space", help="YAML search space (default: the --script's entry in SEARCH_SPACES)")
    add("--n-trials", type=int, default=20, help="finished trials the study should reach")
    add("--storage", default="sqlite:///study.db")
    add("--study-name", default="hpo")
    add("--monitor", default="val_loss", help="the metric a trial is scored by (default: val_loss, the metric the"
        " templates keep their best checkpoint by)")
    add("--direction", choices=["maximize", "minimize"], help="default: minimize for a metric named *loss*, else"
        " maximize")
    add("--enqueue", action="append", default=[], metavar="JSON",
        help='a trial to run first, e.g. \'{"model.lr": 0.003}\' (repeatable)')
    add("--lr-find", action="store_true", help="run Tuner.lr_find first")
    add("--scale-batch-size", action="store_true", help="run Tuner.scale_batch_size first")
    add("--runs", default="runs/hpo", help="folder for the trials' logs and checkpoints")
    add("--output", default="best_config.yaml", help="best configuration (never overwritten)")
    add("--set", nargs=argparse.REMAINDER, default=[], help="extra template arguments, last")
    args = parser.parse_args(argv)
    args.direction = args.direction or ("minimize" if "loss" in args.monitor else "maximize")
    with contextlib.ExitStack() as stack:
        return run_study(args, stack)


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"--enqueue {text!r} is not a JSON object: pass e.g. '{{\"model.lr\": 0.003}}'")
    return value


def fail(message: str, code: int = 2) -> int:
    print(f"hpo_optuna.py: {message}", file=sys.stderr)
    return code


def run_study(args, stack) -> int:
    try:
        import optuna
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        if args.set and not args.set[0].startswith("--"):  # scaffold.py's key=value form
            raise UsageError(f"--set passes the template's own options, last: --set --trainer.max_epochs 20 (got"
                             f" {args.set[0]!r})")
        if args.n_trials < 1:
            raise UsageError(f"--n-trials must be at least 1, got {args.n_trials}")
        if not args.storage.startswith(("sqlite:///", "postgresql", "mysql")):
            raise UsageError(f"unsupported storage {args.storage!r}: use sqlite:///study.db or a database URL")
        enqueued = [json_object(item) for item in args.enqueue]
        output = Path(args.output)
        if output.exists():
            raise UsageError(f"{output} exists: pass another --output (nothing was run)")
        if not output.resolve().parent.is_dir():
            raise UsageError(f"no folder for --output {output}: create it first (nothing was run)")
        space = read_yaml(Path(args.space)) if args.space else None
        if args.space and not space:
            raise UsageError(f"--space {args.space} must map keys to {{type, low, high}} or {{type, choices}}")
        script = Path(args.script) if args.script else find_template(Path.cwd())
        if script is None:
            raise UsageError(f"no template in {Path.cwd()} (a .py file that imports lightning_support): pass --script"
                             " FILE, or run this from the folder scaffold.py made")
        space = check_space(None, [], space or SEARCH_SPACES.get(script.name, SEARCH_SPACES["tabular.py"]))
        copies = stack.enter_context(tempfile.TemporaryDirectory(prefix="hpo_base_"))
        base = base_configs(args, Path(copies)) + args.set
        module = load_script(script)  # every input checked first: importing a template takes seconds
        check_space(module, base, space)
        tune = args.lr_find or args.scale_batch_size
        if tune:
            check_tuner(module, base, args)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat: stable enough
        study = open_study(args)
        for item in enqueued:
            study.enqueue_trial(item, skip_if_exists=True)
        if tune and not study.trials:
            study.enqueue_trial(pre_tune(module, base, args, space), skip_if_exists=True)
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=finished))
        if done < args.n_trials:
            support = sys.modules.get("lightning_support")  # the template's, imported with it
            diverged = (support.NonFiniteLossError,) if support else ()  # a NaN loss fails its trial only
            study.optimize(objective(module, base, space, args), n_trials=args.n_trials - done,
                           callbacks=[MaxTrialsCallback(args.n_trials, states=finished)], catch=diverged)
    except UsageError as err:
        return fail(f"error: {err}")
    except ImportError as err:
        return fail(f"error: {err}: python -m pip install optuna optuna-integration")
    except SIGTERMException:  # a SystemExit without a code: exit 0 would read as success
        return fail(f"stopped by SIGTERM; {RERUN}", 128 + signal.SIGTERM)
    except Stopped as stop:
        how, code = stop.args
        return fail(f"stopped by {how}; the trial under way is recorded as failed; {RERUN}", code)
    except KeyboardInterrupt:  # between trials
        return fail(f"stopped by Ctrl-C; {RERUN}", 128 + signal.SIGINT)
    print_table(study)
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) and not output.exists():
        try:
            export_best(module, base, study, output)
        except OSError as err:
            return fail(f"error: cannot write {output}: {err.strerror or err}; the trials are kept in {args.storage}:"
                        " rerun with another --output")
        print(f"best: trial {study.best_trial.number}, {args.monitor}={study.best_value:.5g}; config: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
