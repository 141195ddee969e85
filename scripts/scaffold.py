"""Copy a template, its support module and its configs into a project, write a config.yaml; print the next commands.

Usage:
    python scripts/scaffold.py tabular my_project      # tabular.py + lightning_support.py + configs/ + config.yaml
    python scripts/scaffold.py image_classifier pics --set data.data_path=photos/ --set model.backbone=microsoft/resnet-50
    python scripts/scaffold.py causal_lm my_lm --set data.data_path=corpus/ --set trainer.max_steps=2000
    python scripts/scaffold.py custom my_model     # your own network, loss, optimizer, data (a converted loop)
    python scripts/scaffold.py tabular my_project --hardware none        # skip hardware detection
    python scripts/scaffold.py tabular my_project --hardware hw.yaml     # a trainer: section from a file
    python scripts/scaffold.py tabular my_project --force                # replace files that already exist

config.yaml = the `trainer:` section and the float32 matmul precision that detect_hardware.py recommends for this
machine (--hardware auto, the default), then every --set key=value: only what differs from the template's defaults,
so that an option you later change or remove in the template's code is not pinned by a stale copy
(`TEMPLATE.py fit --config config.yaml --print_config` shows every setting).
Keys are checked against the template's LightningCLI; values are YAML data (numbers, true/false, null, lists),
anything else stays a plain string. A relative path in a *_path value is read from the current folder and
written absolute (the commands run in DEST). lightning_support.py holds the run machinery every template imports
(checkpoints, exact resume, NaN stop, one-line errors); a second template scaffolded into the same folder shares it.
Nothing is written unless everything succeeds; existing files are never replaced without --force (identical ones,
such as the support module and configs a second template shares, are left as they are). Exit codes: 0 ok, 2 bad
input.
"""

import argparse
import contextlib
import difflib
import importlib.util
import io
import json
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other scripts of this folder
import detect_hardware  # noqa: E402
from launch import python_command, read_yaml  # noqa: E402

SKILL = Path(__file__).resolve().parent.parent
TEMPLATES = SKILL / "templates"
PLAIN = (type(None), bool, int, float, str)
NULLS = ("", "null", "Null", "NULL", "~")


class UsageError(ValueError):
    """Bad input: one line on stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_value(text: str):
    """YAML data when the text is plain data (42, 1e-3, true, null, [1, 2]); otherwise the text itself."""
    try:
        value = yaml.safe_load(text)  # safe_load never builds Python objects (!!python tags raise)
    except yaml.YAMLError:
        return text
    if isinstance(value, PLAIN) or (isinstance(value, list) and all(isinstance(v, PLAIN) for v in value)):
        return text if value is None and text.strip() not in NULLS else value  # e.g. a comment: keep the text
    return text


def parse_sets(items: list) -> list:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} is not key=value (example: --set trainer.max_epochs=5)")
        pairs.append((key.strip(), parse_value(value)))
    return pairs


def absolute_paths(sets: list) -> list:
    """The commands run in DEST, so a relative path given here becomes absolute: a file or folder named by a *_path
    key (or data.tokenizer) that exists from the current folder. A data path that does not exist is an error."""
    resolved = []
    for key, value in sets:
        if isinstance(value, str) and (key.endswith("_path") or key in ("data.tokenizer", "model.backbone")):
            path = Path(value).expanduser()
            if path.exists():
                value = str(path.resolve())
            elif key in ("data.data_path", "data.predict_path"):
                raise UsageError(f"--set {key}={value}: not found (relative paths are read from {Path.cwd()})")
        resolved.append((key, value))
    return resolved


def flat_keys(tree: dict, prefix: str = "") -> set:
    keys = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{path}.")
    return keys


def set_key(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[parts[-1]] = value


def merge(defaults: dict, hardware: dict, sets: list) -> dict:
    """The hardware settings, then --set values (later wins); the template's defaults name the keys it has."""
    config: dict = {}
    for key, value in hardware.get("trainer", {}).items():
        set_key(config, f"trainer.{key}", value)
    if "matmul_precision" in hardware and "matmul_precision" in defaults:
        config["matmul_precision"] = hardware["matmul_precision"]
    for key, value in sets:
        set_key(config, key, value)
    return config


def check_keys(sets: list, defaults: dict) -> None:
    valid = flat_keys(defaults)
    for key, _ in sets:
        if key in valid or key.startswith(("trainer.strategy.", "trainer.logger.")):
            continue  # arguments of a strategy or logger class chosen by the config: the template checks them
        near = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.5)
        raise UsageError(f"unknown key {key!r}" + (f"; nearest valid keys: {', '.join(near)}" if near else ""))


def print_config(script: Path, *args) -> tuple:
    """(exit code, stdout, stderr) of `SCRIPT fit ARGS --print_config`, run in this process: the template is
    imported once (about 5 s of imports), not started twice."""
    if script not in LOADED:
        sys.path.insert(0, str(script.parent))  # its lightning_support.py
        spec = importlib.util.spec_from_file_location(f"scaffolded_{script.stem}", script)
        LOADED[script] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(LOADED[script])
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [str(script)]  # the template names itself in its errors
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            LOADED[script].main(["fit", *args, "--print_config"])
        code = 0
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


LOADED: dict = {}


def template_defaults(script: Path) -> dict:
    code, out, err = print_config(script)
    if code != 0:
        raise UsageError(f"{script.name} --print_config failed: {last_line(err)}")
    return yaml.safe_load(out)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def hardware_settings(choice: str) -> dict:
    """The trainer: section and the float32 matmul precision for the machine: detected (auto), none, or a file
    (detect_hardware.py --format yaml writes one)."""
    if choice == "none":
        return {}
    if choice == "auto":
        plan = detect_hardware.plan(detect_hardware.detect_machine())
        return {"trainer": plan["trainer"], "matmul_precision": plan["matmul_precision"]}
    try:
        data = read_yaml(Path(choice))
    except ValueError as err:  # launch.py's UsageError
        raise UsageError(f"cannot read --hardware {choice}: {str(err).removeprefix(f'cannot read {choice}: ')}")
    if not isinstance(data.get("trainer"), dict):
        raise UsageError(f"--hardware {choice} must hold a trainer: section (python scripts/detect_hardware.py"
                         " --format yaml writes one)")
    return {key: data[key] for key in ("trainer", "matmul_precision") if key in data}


def template_files(name: str) -> tuple:
    """(script path, config paths, support module path, manifest entry) from skill.yaml."""
    manifest = yaml.safe_load((SKILL / "skill.yaml").read_text())
    names = {Path(t["file"]).stem: t for t in manifest["templates"]
             if t["file"].endswith(".py") and t.get("scaffold", True)}
    entry = names.get(Path(name).stem)
    if entry is None:
        raise UsageError(f"unknown template {name!r}; choose one of {', '.join(sorted(names))}")
    configs = [SKILL / c for c in entry["configs"]]
    return SKILL / entry["file"], configs, SKILL / manifest["support"]["file"], entry


def default_data(entry: dict, defaults: dict) -> dict:
    """The embedded data the template finds next to itself; a copy elsewhere needs its absolute path."""
    data = defaults.get("data") or {}
    if not entry.get("default_data") or data.get("data_path"):
        return {}
    return {"data.data_path": str(SKILL / entry["default_data"])}


def install(files: dict) -> None:
    """Copies each source to a staging file beside its target, then renames them all into place: an error (a full
    disk, no permission) leaves no partial file and removes the folders it made."""
    made, staged = [], []
    try:
        for target, source in files.items():
            made += [f for f in (target.parent, *target.parent.parents) if not f.exists()][::-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.append((target.with_name(f".{target.name}.scaffold"), target))
            shutil.copyfile(source, staged[-1][0])
    except BaseException as err:
        for path in [p for p, _ in staged] + made[::-1]:
            with contextlib.suppress(OSError):
                path.rmdir() if path in made else path.unlink()
        if isinstance(err, OSError):
            raise UsageError(f"cannot write {target}: {err.strerror or err} (nothing was written)") from None
        raise
    for path, target in staged:
        os.replace(path, target)


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("template", help="tabular, image_classifier, causal_lm, transformers_finetune or custom")
    parser.add_argument("dest", help="project folder (created if missing)")
    parser.add_argument("--hardware", default="auto", help="auto (detect this machine), none, or a YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config value (repeatable)")
    parser.add_argument("--force", action="store_true", help="replace files that already exist")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    try:
        script, configs, support, entry = template_files(args.template)
        sets = absolute_paths(parse_sets(args.set))
        dest = Path(args.dest).expanduser()
        if dest.resolve().is_relative_to(SKILL):  # the skill's own files are not a project
            raise UsageError(f"{dest} is inside this skill ({SKILL}): choose a project folder outside it")
        found = next(p for p in (dest, *dest.parents, Path(".")) if p.exists())  # the folder that will hold DEST
        if not found.is_dir() or not os.access(found, os.W_OK):
            raise UsageError(f"{found} exists and is not a folder" if not found.is_dir() else
                             f"cannot write into {found}: choose a DEST you can write")
        targets = {dest / script.name: script, dest / support.name: support,
                   **{dest / "configs" / c.name: c for c in configs}}
        # an identical file (the support module or a config a second template shares) is left as it is
        existing = [str(p) for p, source in [*targets.items(), (dest / "config.yaml", None)] if p.exists()
                    and (source is None or p.read_bytes() != source.read_bytes())]
        if existing and not args.force:
            raise UsageError(f"would replace {', '.join(existing)}: pass --force to replace, or choose another DEST")
        hardware = hardware_settings(args.hardware)
        defaults = template_defaults(script)
        check_keys(sets, defaults)
        data_default = [(k, v) for k, v in default_data(entry, defaults).items() if k not in dict(sets)]
        config = merge(defaults, hardware, data_default + sets)
        with tempfile.TemporaryDirectory() as tmp:  # validate the whole result before touching DEST
            staged = Path(tmp) / "config.yaml"
            staged.write_text(f"# written by scaffold.py: this machine's trainer settings and your values; every other"
                              f" option is {script.name}'s default\n# (python {script.name} fit --config config.yaml"
                              " --print_config shows them all)\n"
                              + yaml.safe_dump(config, sort_keys=False))
            code, _, err = print_config(script, "--config", str(staged))
            if code != 0:
                raise UsageError(f"the template rejects this config: {last_line(err)}")
            install({**targets, dest / "config.yaml": staged})
    except UsageError as err:
        print(f"scaffold.py: error: {err}", file=sys.stderr)
        return 2
    # Every printed command is shell-quoted: DEST or a value may hold spaces, quotes or ';'.
    scripts, python = SKILL / "scripts", python_command()
    run_dir = (config.get("trainer", {}).get("default_root_dir") or defaults.get("trainer", {}).get("default_root_dir")
               or "lightning_logs")
    commands = {
        "cd": shlex.join(["cd", str(dest.resolve())]),
        "smoke_test": f"{python} {shlex.join([str(scripts / 'smoke_test.py'), '.', '--config', 'config.yaml'])}",
        "train": f"{python} {shlex.join([script.name, 'fit', '--config', 'config.yaml'])}",
        "resume": f"{python} {shlex.join([script.name, 'fit', '--config', 'config.yaml', '--ckpt_path', 'last'])}",
        "summarize": f"{python} {shlex.join([str(scripts / 'summarize_run.py'), str(run_dir)])}",
    }
    written = sorted(str(p.resolve()) for p in [*targets, dest / "config.yaml"])
    if args.format == "json":
        print(json.dumps({"files": written, "next": commands}, indent=2))
    else:
        print(f"wrote {len(written)} files into {dest.resolve()} (config: config.yaml)")
        print("next:")
        for name, command in commands.items():
            print(f"  {name:<11} {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
