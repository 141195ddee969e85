"""Copy a template, its support module and its configs into a project, write a config.yaml; print the next commands.

Usage:
    python scripts/scaffold.py tabular my_project      # tabular.py + lightning_support.py + configs/ + config.yaml
    python scripts/scaffold.py image_classifier pics --set data.data_path=photos/ --set model.backbone=microsoft/resnet-50
    python scripts/scaffold.py causal_lm my_lm --set data.data_path=corpus/ --set trainer.max_steps=2000
    python scripts/scaffold.py custom my_model     # your own network, loss, optimizer, data (a converted loop)
    python scripts/scaffold.py tabular my_project --hardware none        # skip hardware detection
    python scripts/scaffold.py tabular my_project --hardware hw.yaml     # a trainer: section from a file
    python scripts/scaffold.py causal_lm my_lm --target-profile a100x8.json # for the machine it will run on
    python scripts/scaffold.py tabular my_project --force                # replace files that already exist

config.yaml = the `trainer:` section and float32 matmul precision that detect_hardware.py recommends for this
machine (--hardware auto, the default) or for the one described in --target-profile FILE.json (detect_hardware.py
--help shows the format), then every --set key=value: only what differs from the template's defaults,
so that an option you later change or remove in the template's code is not pinned by a stale copy
(`TEMPLATE.py fit --config config.yaml --print_config` shows every setting).
Keys are checked against the template's LightningCLI; values are YAML data (numbers, true/false, null, lists),
anything else stays a plain string. A relative path in a *_path value is read from the current folder; inside DEST
it is written relative to DEST, elsewhere absolute (and listed in RUN.md as data to copy), so the folder moves as one;
the template's embedded example data is copied into DEST/data/. RUN.md is the run card for the target machine: its
install line, the commands to train, resume, evaluate, predict (and export), and what smoke_test.py checked here
(it writes that section). lightning_support.py holds the run machinery every template imports
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
import time
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


def hardware_settings(choice: str, target_profile=None) -> dict:
    """The trainer: section and the float32 matmul precision for the machine the project will run on: a described
    target (--target-profile), this one (auto), none, or a file (detect_hardware.py --format yaml writes one);
    "machine" describes it for the run card. DataLoader workers stay the template's choice (in-memory data: none)."""
    if target_profile or choice == "auto":
        try:
            machine = (detect_hardware.load_profile(target_profile) if target_profile
                       else detect_hardware.detect_machine())
        except detect_hardware.UsageError as err:
            raise UsageError(f"--target-profile {target_profile}: {err}") from None
        plan = detect_hardware.plan(machine)
        return {"trainer": plan["trainer"], "matmul_precision": plan["matmul_precision"],
                "machine": detect_hardware.describe(machine),
                "accelerator": machine["accelerator"]}
    if choice == "none":
        return {}
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


def default_data(entry: dict, defaults: dict, dest: Path) -> dict:
    """The embedded data the template finds next to itself, copied into DEST/data/ (so that the folder moves as one):
    {target: source}."""
    if not entry.get("default_data") or (defaults.get("data") or {}).get("data_path"):
        return {}
    source = SKILL / entry["default_data"]
    files = sorted(source.glob("*.md")) if source.is_dir() else [source]  # the references/ corpus: its documents
    return {dest / "data" / f.relative_to(source.parent): f for f in files}


def relative_to_dest(sets: list, dest: Path) -> tuple:
    """Absolute paths inside DEST become relative to it (its commands run there, so the folder can move); paths
    outside stay absolute and are listed for the run card: (sets, [(key, path) outside])."""
    inside, outside = [], []
    for key, value in sets:
        if isinstance(value, str) and os.path.isabs(value) and Path(value).exists():
            if Path(value).is_relative_to(dest.resolve()):
                value = Path(value).relative_to(dest.resolve()).as_posix() or "."
            elif key.startswith("data."):
                outside.append((key, value))
        inside.append((key, value))
    return inside, outside


def packages(script: Path, config: dict) -> list:
    """`name==version` of what the template needs on the target: this machine's versions, the smoke test's."""
    from importlib import metadata

    source, finetune = script.read_text(), (config.get("model") or {}).get("finetune")
    needed = ["torch", "lightning", "torchmetrics", "jsonargparse", "tensorboard"] + [
        name for name, used in (("transformers", "transformers" in source), ("numpy", "import numpy" in source),
                                ("pillow", "from PIL" in source), ("peft", finetune in ("lora", "qlora")),
                                ("bitsandbytes", finetune == "qlora")) if used]
    pinned = []
    for name in needed:
        try:
            pinned.append(f"{name}{'[signatures]' * (name == 'jsonargparse')}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pinned.append(name)  # not installed here (bitsandbytes on a CPU machine)
    return pinned


def install_line(accelerator: str, pinned: list) -> str:
    """PyPI's torch wheels for Linux are CUDA builds (macOS ones include MPS); a CPU target takes the smaller CPU
    build from PyTorch's index."""
    rest = shlex.join(pinned[1:])
    if accelerator == "cpu":
        return f"pip install {pinned[0]} --index-url https://download.pytorch.org/whl/cpu && pip install {rest}"
    return f"pip install {pinned[0]} {rest}"


CHECKED = "## Checked here"  # smoke_test.py rewrites this section of RUN.md with what it ran


def run_card(script: Path, config: dict, hardware: dict, outside: list, smoke_command: str) -> str:
    """DEST/RUN.md: what the project is for, what was checked where it was prepared, and the commands and packages
    for the machine it will run on."""
    base = getattr(LOADED[script], "TemplateCLI", None)  # the template's CLI class names what follows a fit
    cli = next((v for v in vars(LOADED[script]).values() if isinstance(v, type) and base and issubclass(v, base)
                and v is not base), base)
    trainer = config.get("trainer") or {}
    fit = f"python {script.name} fit --config config.yaml"
    lines = [f"# Run card: {script.name}", "",
             f"Prepared on {time.strftime('%Y-%m-%d')} with the pytorch-lightning skill. Target machine: "
             f"{hardware.get('machine') or 'not described (config.yaml has the trainer settings it was given)'}.",
             "config.yaml holds its trainer settings: " + ", ".join(f"{k} {trainer[k]}" for k in
                                                                   ("accelerator", "devices", "num_nodes", "strategy",
                                                                    "precision") if k in trainer) + ".", "",
             CHECKED, "", f"Not yet: `{smoke_command}` (with `--simulate-ddp` for a multi-GPU config).", "",
             "## On the target machine", "",
             "Copy this folder there; every path in config.yaml inside it is relative to it. Then, in the folder:", "",
             "```", install_line(hardware.get("accelerator", "cuda"), packages(script, config)),
             f"{fit:<60} # train",
             f"{fit + ' --ckpt_path last':<60} # resume after a stop",
             f"{f'python {script.name} {cli.evaluate} --config config.yaml --ckpt_path best':<60} # evaluate the best"]
    for command in cli.then:  # predict (with the fit's config), and the template's tools (export, generate)
        words = ["predict", "--config", "config.yaml", "--ckpt_path", "best", *command.split()[1:]] if \
            command.startswith("predict") else command.split()
        lines.append(f"{f'python {script.name} {shlex.join(words)}':<60} # {words[0]}")
    lines.append("```")
    if int(trainer.get("num_nodes") or 1) > 1:
        lines += ["", f"Several machines: `python <skill>/scripts/launch.py config.yaml --target slurm` (or torchrun)."]
    if outside:
        lines += ["", "## Data outside this folder", "",
                  "Copy these to the target and set their keys in config.yaml to where they are there:", ""]
        lines += [f"- {key}: {value}" for key, value in outside]
    return "\n".join(lines) + "\n"


def smoke_command() -> str:
    script = str(SKILL / "scripts" / "smoke_test.py")
    return f"{python_command()} {shlex.join([script, '.', '--config', 'config.yaml'])}"


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
    parser.add_argument("--target-profile", metavar="FILE.json", help="the machine the project will run on, described"
                        " as for detect_hardware.py --profile: its trainer settings instead of this machine's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config value (repeatable)")
    parser.add_argument("--force", action="store_true", help="replace files that already exist")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    try:
        script, configs, support, entry = template_files(args.template)
        dest = Path(args.dest).expanduser()
        sets, outside = relative_to_dest(absolute_paths(parse_sets(args.set)), dest)
        if args.target_profile and args.hardware != "auto":
            raise UsageError("--target-profile and --hardware both choose the trainer settings: give one")
        if dest.resolve().is_relative_to(SKILL):  # the skill's own files are not a project
            raise UsageError(f"{dest} is inside this skill ({SKILL}): choose a project folder outside it")
        found = next(p for p in (dest, *dest.parents, Path(".")) if p.exists())  # the folder that will hold DEST
        if not found.is_dir() or not os.access(found, os.W_OK):
            raise UsageError(f"{found} exists and is not a folder" if not found.is_dir() else
                             f"cannot write into {found}: choose a DEST you can write")
        hardware = hardware_settings(args.hardware, args.target_profile)
        defaults = template_defaults(script)
        data_files = default_data(entry, defaults, dest)
        targets = {dest / script.name: script, dest / support.name: support,
                   **{dest / "configs" / c.name: c for c in configs}, **data_files}
        # an identical file (the support module or a config a second template shares) is left as it is
        existing = [str(p) for p, source in [*targets.items(), (dest / "config.yaml", None), (dest / "RUN.md", None)]
                    if p.exists() and (source is None or p.read_bytes() != source.read_bytes())]
        if existing and not args.force:
            raise UsageError(f"would replace {', '.join(existing)}: pass --force to replace, or choose another DEST")
        check_keys(sets, defaults)
        if "data.data_path" in dict(sets):  # the user's data: the embedded example is not copied
            targets = {t: s for t, s in targets.items() if s not in data_files.values()}
        embedded = [] if "data.data_path" in dict(sets) or not data_files else [
            ("data.data_path", "data/" + (SKILL / entry["default_data"]).name)]
        config = merge(defaults, hardware, embedded + sets)
        with tempfile.TemporaryDirectory() as tmp:  # validate the whole result before touching DEST
            staged = Path(tmp) / "config.yaml"
            staged.write_text(f"# written by scaffold.py: the target machine's trainer settings (RUN.md) and your"
                              f" values; every other option is {script.name}'s default\n# (python {script.name} fit"
                              " --config config.yaml --print_config shows them all)\n"
                              + yaml.safe_dump(config, sort_keys=False))
            code, _, err = print_config(script, "--config", str(staged))
            if code != 0:
                raise UsageError(f"the template rejects this config: {last_line(err)}")
            card = Path(tmp) / "RUN.md"
            card.write_text(run_card(script, config, hardware, outside, smoke_command()))
            install({**targets, dest / "config.yaml": staged, dest / "RUN.md": card})
    except UsageError as err:
        print(f"scaffold.py: error: {err}", file=sys.stderr)
        return 2
    # Every printed command is shell-quoted: DEST or a value may hold spaces, quotes or ';'.
    scripts, python = SKILL / "scripts", python_command()
    run_dir = (config.get("trainer", {}).get("default_root_dir") or defaults.get("trainer", {}).get("default_root_dir")
               or "lightning_logs")
    commands = {
        "cd": shlex.join(["cd", str(dest.resolve())]),
        "smoke_test": smoke_command(),
        "train": f"{python} {shlex.join([script.name, 'fit', '--config', 'config.yaml'])}",
        "resume": f"{python} {shlex.join([script.name, 'fit', '--config', 'config.yaml', '--ckpt_path', 'last'])}",
        "summarize": f"{python} {shlex.join([str(scripts / 'summarize_run.py'), str(run_dir)])}",
    }
    written = sorted(str(p.resolve()) for p in [*targets, dest / "config.yaml", dest / "RUN.md"])
    if args.format == "json":
        print(json.dumps({"files": written, "next": commands}, indent=2))
    else:
        print(f"wrote {len(written)} files into {dest.resolve()} (config: config.yaml; for the target machine:"
              f" RUN.md)")
        print("next:")
        for name, command in commands.items():
            print(f"  {name:<11} {command}")
        if args.target_profile:
            print("train and resume run on the target machine: hand over RUN.md (smoke_test records its check there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
