"""Check that this Python environment can run the skill's templates, and print the fix when it cannot.

Usage:
    python scripts/check_env.py                 # table of packages: found version, needed range, status
    python scripts/check_env.py --format json   # the same, for agents
    python scripts/check_env.py --python .venv/bin/python   # check another interpreter's environment

Exit code: 0 when every required package is present in a supported version, 1 otherwise (the install command
that fixes it is printed), 2 for bad usage. Reads package metadata only, so it runs in well under a second.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from importlib import metadata

# (distribution, lowest supported, first unsupported or None, required?, what needs it)
REQUIREMENTS = [
    ("lightning", "2.6", "2.7", True, "every template (Trainer, LightningCLI)"),
    ("torch", "2.11", None, True, "every template"),
    ("torchmetrics", "1.4", "2", True, "metrics in every template"),
    ("jsonargparse", "4.39", "5", True, "LightningCLI (needs the [signatures] extra)"),
    ("docstring-parser", "0.17", None, True, "LightningCLI help texts (jsonargparse[signatures])"),
    ("typeshed-client", "2.8", None, True, "LightningCLI type resolution (jsonargparse[signatures])"),
    ("pyyaml", "6", None, True, "YAML configs"),
    ("tensorboard", "2.14", None, False, "TensorBoard logs (without it Lightning falls back to CSVLogger)"),
    ("pillow", "10", None, False, "image-folder datasets"),
    ("numpy", "1.26", None, False, "causal_lm.py (it reads .npy token files)"),
    ("transformers", "5", "6", False, "Hugging Face templates"),
    ("optuna", "5", None, False, "hpo_optuna.py (hyperparameter search)"),
    ("optuna-integration", "5", None, False, "hpo_optuna.py (its Lightning pruning callback)"),
    ("peft", "0.21", None, False, "LoRA and QLoRA fine-tuning (causal_lm.py, transformers_finetune.py)"),
]
NEEDED = {name: f">={low}" + (f",<{high}" if high else "") for name, low, high, *_ in REQUIREMENTS}


def install_spec(name: str) -> str:
    """The pip requirement that installs a package; jsonargparse's [signatures] extra brings in two of them."""
    if name in ("jsonargparse", "docstring-parser", "typeshed-client"):
        return "jsonargparse[signatures]" + NEEDED["jsonargparse"]
    return name + NEEDED[name]


def version_tuple(text: str) -> tuple:
    """'2.6.6+cpu' -> (2, 6, 6); stops at the first non-numeric part."""
    parts = []
    for piece in text.split("+")[0].split("."):
        if not piece[:1].isdigit():
            break
        parts.append(int("".join(ch for ch in piece if ch.isdigit())))
    return tuple(parts)


def check(installed: dict) -> list:
    rows = []
    for name, low, high, required, purpose in REQUIREMENTS:
        found = installed.get(name)
        if found is None:
            status = "missing"
        elif version_tuple(found) < version_tuple(low) or (high and version_tuple(found) >= version_tuple(high)):
            status = "wrong version"
        else:
            status = "ok"
        rows.append({"package": name, "found": found, "needed": NEEDED[name], "required": required,
                     "status": status, "purpose": purpose})
    return rows


def installed_versions(python: str) -> dict:
    """Versions of the REQUIREMENTS packages in this interpreter, or in another one via a subprocess."""
    names = [r[0] for r in REQUIREMENTS]
    if python == sys.executable:
        found = {}
        for name in names:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        return found
    code = ("import json,sys\nfrom importlib import metadata\nout={}\nfor n in sys.argv[1:]:\n"
            "    try: out[n]=metadata.version(n)\n    except metadata.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    result = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise OSError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "it exited with an error")
    try:
        found = json.loads(result.stdout)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise OSError(f"it printed {result.stdout.strip()[:60]!r}, not a package list: is it a Python interpreter?")
    return found


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=["text", "json"], default="text")
    parser.add_argument("--python", default=sys.executable, help="interpreter to check (default: this one)")
    args = parser.parse_args(argv)
    try:
        installed = installed_versions(args.python)
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        print(f"check_env.py: error: cannot run {args.python}: {err}; pass --python a working interpreter",
              file=sys.stderr)
        return 2
    rows = check(installed)
    broken = [r for r in rows if r["required"] and r["status"] != "ok"]
    specs = sorted({install_spec(r["package"]) for r in rows if r["status"] != "ok"})
    # the checked interpreter installs into itself; a bare `python` only when it is that one
    same = os.path.abspath(shutil.which("python") or "") == os.path.abspath(args.python)
    python = "python" if same else shlex.quote(args.python)
    fix = (f"{python} -m pip install " + " ".join(f'"{s}"' for s in specs)) if specs else None
    if args.format == "json":
        print(json.dumps({"ok": not broken, "python": args.python, "packages": rows, "fix": fix}, indent=2))
    else:
        print(f"{'package':<18} {'found':<14} {'needed':<12} status")
        for r in rows:
            tag = r["status"] if r["required"] or r["status"] == "ok" else f"{r['status']} (optional: {r['purpose']})"
            print(f"{r['package']:<18} {r['found'] or '-':<14} {r['needed']:<12} {tag}")
        print("ready: every required package is present" if not broken else "NOT READY: required packages missing")
        if fix:
            print(f"fix: {fix}")
    return 0 if not broken else 1


if __name__ == "__main__":
    sys.exit(main())
