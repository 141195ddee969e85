"""Print (or write) the command or sbatch file that launches a LightningCLI config on its devices and nodes.

Usage:
    python scripts/launch.py config.yaml --target local                    # cd DIR && python SCRIPT fit --config ...
    python scripts/launch.py config.yaml configs/ddp.yaml --target local   # the project's settings, then DDP's
    python scripts/launch.py config.yaml configs/ddp.yaml --target torchrun --devices 8   # 8 GPUs per machine
    python scripts/launch.py config.yaml configs/ddp.yaml --target slurm --devices 8 --write job.sbatch
        # machines: trainer.num_nodes of the configs (scaffold.py ... --set trainer.num_nodes=2)

Processes per node must equal trainer.devices and nodes trainer.num_nodes (else DDP stops with "ValueError: You set
devices=..." and FSDP can hang at "Initializing distributed"): a --nodes or --devices that disagrees is an error.
--script defaults to the template (the .py file that imports lightning_support, as scaffold.py leaves it) in the
config's folder or the one above. The command runs in the script's folder (`cd`, `#SBATCH --chdir`): it works from
anywhere and outputs land beside the script, as with scaffold.py. Paths are this machine's (absolute): scaffold and
launch on the cluster itself. One node under torchrun: `--standalone`. A CPU config asks SLURM for no GPUs. --write
never replaces a file. Several configs pass on in order, a later one's keys overriding an earlier one's (as
LightningCLI merges them).
Exit codes: 0 ok, 2 bad input.
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import yaml


class UsageError(ValueError):
    """Bad input: one line on stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def read_text(path: Path) -> str:
    """A user's text file, or one UsageError line naming it (missing, a folder, not UTF-8)."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"cannot read {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None


def read_yaml(path: Path):
    """A YAML mapping; a syntax error names its line and column, an empty file or a list is refused."""
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err}); fix it") from None
    if not isinstance(data, dict):
        shown = "nothing" if data is None else repr(data)[:40]
        raise UsageError(f"{path} must hold settings (key: value), not {shown}")
    return data


def count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what} must be a whole number >= 1, got {value!r}")
    return value


def read_trainer(paths: list) -> dict:
    """The configs' trainer: settings, a later file's keys over an earlier one's."""
    trainer = {}
    for path in paths:
        data = read_yaml(path).get("trainer", {})
        if not isinstance(data, (dict, type(None))):
            raise UsageError(f"{path}: trainer: must be a mapping of Trainer options, got {data!r:.40}")
        trainer.update(data or {})
    return trainer


def find_template(folder: Path) -> Optional[Path]:
    """The one .py file in folder that imports lightning_support (scaffold.py copies it beside it), else None."""
    found = [p for p in sorted(folder.glob("*.py")) if p.name != "lightning_support.py" and p.is_file()
             and "lightning_support" in p.read_text(encoding="utf-8", errors="replace")]
    if len(found) > 1:
        raise UsageError(f"{folder} holds several templates ({', '.join(p.name for p in found)}): pass --script FILE")
    return found[0].resolve() if found else None


def find_script(config: Path, given) -> Path:
    folders = (config.parent, config.parent.parent)  # next to the config or above it, where scaffold.py puts them
    if given:
        for path in (Path(given).expanduser(), *(folder / given for folder in folders)):
            if path.is_file():
                return path.resolve()
        raise UsageError(f"no such script: {given}: pass --script with the training script's path")
    for folder in folders:
        found = find_template(folder)
        if found:
            return found
    raise UsageError(f"no template next to {config} (a .py file that imports lightning_support): pass --script FILE")


def python_command() -> str:
    """`python` when that is this interpreter, else this interpreter's path (a bare python may lack torch)."""
    found = shutil.which("python")
    same = found is not None and os.path.abspath(found) == os.path.abspath(sys.executable)
    return "python" if same else shlex.quote(sys.executable)


def plan(trainer: dict, target: str, nodes, devices) -> tuple:
    config_nodes = count(trainer.get("num_nodes", 1), "trainer.num_nodes")
    config_devices = trainer.get("devices", "auto")
    if isinstance(config_devices, int) and (config_devices == 0 or config_devices < -1):
        raise UsageError(f"trainer.devices is {config_devices}: use a number of devices >= 1 (or -1 for all)")
    nodes, devices = [None if v is None else count(v, f"--{k}") for k, v in (("nodes", nodes), ("devices", devices))]
    if nodes is not None and nodes != config_nodes:
        raise UsageError(f"--nodes {nodes} but trainer.num_nodes is {config_nodes}: they must match, or the run fails"
                         f" or hangs at start-up; set trainer.num_nodes: {nodes} in the config")
    if devices is not None and isinstance(config_devices, int) and config_devices != -1 and devices != config_devices:
        raise UsageError(f"--devices {devices} but trainer.devices is {config_devices}: processes per node must equal"
                         " trainer.devices")
    per_node = devices if devices is not None else config_devices
    if target != "local" and not (isinstance(per_node, int) and per_node > 0):
        raise UsageError(f"trainer.devices is {config_devices!r}: {target} needs the number of GPUs per node; set"
                         " trainer.devices to it (or pass --devices N)")
    if target == "local" and config_nodes > 1:
        raise UsageError(f"trainer.num_nodes is {config_nodes}: a local launch runs one machine; use --target"
                         " torchrun or slurm")
    return config_nodes, per_node


def render(target: str, script: Path, configs: list, nodes: int, per_node, gpus: bool = True) -> str:
    folder = script.parent
    shown = [c.resolve().relative_to(folder) if c.resolve().is_relative_to(folder) else c.resolve() for c in configs]
    run = " ".join([shlex.quote(script.name), "fit", *(f"--config {shlex.quote(str(c))}" for c in shown)])
    cd = f"cd {shlex.quote(str(folder))} && "
    if target == "local":
        return f"{cd}{python_command()} {run}\n"
    if target == "torchrun" and nodes == 1:  # no other machine to meet: torchrun picks a free local port itself
        return f"{cd}torchrun --standalone --nproc-per-node {per_node} {run}\n"
    if target == "torchrun":
        return ("# on every machine, NODE_RANK=0 on the one at MASTER_ADDR:\n"
                f"{cd}torchrun --nnodes {nodes} --nproc-per-node {per_node} --node-rank $NODE_RANK"
                f" --master-addr $MASTER_ADDR --master-port ${{MASTER_PORT:-29500}} {run}\n")
    options = ["job-name=lightning", f"nodes={nodes}", f"ntasks-per-node={per_node}",
               *([f"gres=gpu:{per_node}"] if gpus else []), "cpus-per-task=8", "time=24:00:00",
               "signal=SIGUSR1@90", "requeue", "output=slurm-%j.out", f"chdir={folder}"]
    return "\n".join([
        "#!/bin/bash",
        f"# launch.py: {nodes} node(s) x {per_node} {'GPU(s)' if gpus else 'CPU process(es)'}; --nodes ="
        " trainer.num_nodes, --ntasks-per-node = trainer.devices",
        *(f"#SBATCH --{option}" for option in options),
        "",
        f"srun {python_command()} {run}",
        "",
    ])


def write_new(path: Path, text: str) -> None:
    """A new file through a staging file beside it, linked into place: never replaces a file, never leaves a partial
    one (a full disk, no permission)."""
    if path.exists():
        raise UsageError(f"{path} exists: choose another --write file (nothing was changed)")
    if not path.parent.is_dir():
        raise UsageError(f"no folder {path.parent} for --write {path}: create it first (nothing was written)")
    staged = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.") as f:
            staged = f.name
            f.write(text)
        os.link(staged, path)  # fails if the file appeared meanwhile
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err} (nothing was written)") from None
    finally:
        if staged:
            os.unlink(staged)


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("config", nargs="+", type=Path, help="LightningCLI config(s); the trainer: settings of the last that has each"
        " key count")
    add("--target", choices=["local", "torchrun", "slurm"], required=True)
    add("--nodes", type=int, help="machines you will launch on (checked against num_nodes)")
    add("--devices", type=int, help="processes per machine (checked against trainer.devices)")
    add("--script", help="training script (default: the only .py next to the config)")
    add("--write", help="write to this new file instead of printing")
    add("--format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    try:
        trainer = read_trainer(args.config)
        nodes, per_node = plan(trainer, args.target, args.nodes, args.devices)
        gpus = trainer.get("accelerator") != "cpu"
        text = render(args.target, find_script(args.config[0], args.script), args.config, nodes, per_node, gpus)
        if args.write:
            write_new(Path(args.write), text)
    except UsageError as err:
        print(f"launch.py: error: {err}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps({"target": args.target, "nodes": nodes, "processes_per_node": per_node,
                          "written": args.write, "text": text}, indent=2))
    elif args.write:
        print(f"wrote {args.write}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
