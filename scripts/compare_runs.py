"""Compare two runs step by step: a plain PyTorch loop's losses and learning rates against the Lightning version's.

Usage:
    python scripts/compare_runs.py loop_steps.csv steps.csv               # PASS (exit 0) or FAIL (exit 1)
    python scripts/compare_runs.py loop_steps.csv steps.csv --rtol 1e-4   # a looser tolerance (e.g. GPU runs)
    python scripts/compare_runs.py A.csv B.csv --steps 100 --format json

Each file is a step,loss[,lr] CSV: a template writes one with `fit --record_steps FILE`, a plain loop with the lines
in references/migration.md ("Prove it"). Steps in both files are compared, a step written twice (a resumed run redoes
steps) with its last row. A value matches when |a - b| <= atol + rtol * |b| (NaN matches NaN). Prints the steps
compared, the largest differences, the first diverging step with a likely cause, and PASS or FAIL.
Exit codes: 0 PASS, 1 FAIL, 2 bad input.
"""

import argparse
import csv
import json
import math
import sys
from pathlib import Path


class UsageError(ValueError):
    """Bad input: one line on stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def read_steps(path: Path) -> dict:
    """{step: {"loss": float, "lr": float}} from a step,loss[,lr] CSV; a later row of a step replaces the earlier."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    header = [h.strip() for h in rows[0]] if rows else []
    if "step" not in header or "loss" not in header:
        raise UsageError(f"{path} needs a header with the columns step,loss[,lr] (found: {','.join(header) or 'none'})"
                         ": write it with `fit --record_steps FILE` or the loop lines in references/migration.md")
    columns = {name: header.index(name) for name in ("step", "loss", "lr") if name in header}
    steps = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            values = {name: float(row[i]) for name, i in columns.items()}
            if not all(math.isfinite(v) or row[columns[n]].strip().lower().lstrip("+-") in ("nan", "inf", "infinity")
                       for n, v in values.items()):
                raise ValueError  # an overflow such as 1e400 is no logged loss
        except (ValueError, IndexError):
            raise UsageError(f"{path} line {line}: expected numbers in {','.join(columns)}, got {','.join(row)}")
        step = values.pop("step")
        if not step.is_integer() or step < 0:
            raise UsageError(f"{path} line {line}: step must be a whole number >= 0, got {row[columns['step']]}")
        steps[int(step)] = values
    if not steps:
        raise UsageError(f"{path} holds no steps")
    return steps


def difference(a: float, b: float) -> float:
    if math.isfinite(a) and math.isfinite(b):
        return abs(a - b)
    return 0.0 if a == b or (math.isnan(a) and math.isnan(b)) else math.inf  # NaN matches NaN, inf the same inf


def close(a: float, b: float, atol: float, rtol: float) -> bool:
    finite = math.isfinite(a) and math.isfinite(b)
    return difference(a, b) <= (atol + rtol * abs(b) if finite else 0)


def likely_cause(step: int, key: str, first: int) -> str:
    if key == "lr":
        return ("the learning rates differ: check the scheduler's interval (step or epoch), its arguments, and the"
                " optimizer's lr")
    if step == first:
        return ("the first loss differs: different initial weights or first batch. Seed the same way (fit"
                " --seed_everything N as your loop's torch.manual_seed(N)), build the model before anything else"
                " draws random numbers, and give both the same data order, precision (32-true) and dropout")
    return ("the first loss matches, a later one does not: the update differs (optimizer, its arguments, gradient"
            " clipping or accumulation, loss scaling) or the data order or dropout draws do (shuffling, a"
            " validation that draws no random numbers in one run but does in the other, augmentation)")


def compare(a: dict, b: dict, atol: float, rtol: float, limit=None) -> dict:
    common = sorted(set(a) & set(b))[:limit]
    if not common:
        raise UsageError("the files share no step numbers (both count from step 0 at the first batch)")
    keys = [k for k in ("loss", "lr") if all(k in a[s] and k in b[s] for s in common)]
    worst = {k: max(difference(a[s][k], b[s][k]) for s in common) for k in keys}
    bad = [(s, k) for s in common for k in keys if not close(a[s][k], b[s][k], atol, rtol)]
    result = {"verdict": "FAIL" if bad else "PASS", "steps_compared": len(common), "first_step": common[0],
              "last_step": common[-1], "rows": [len(a), len(b)], "max_abs_diff": worst,
              "bitwise_equal": all(a[s][k] == b[s][k] for s in common for k in keys), "atol": atol, "rtol": rtol,
              "steps_differing": len({s for s, _ in bad}), "first_divergence": None,
              "not_compared": [k for k in ("lr",) if k not in keys]}
    if bad:
        step, key = bad[0]
        result["first_divergence"] = {"step": step, "value": key, "a": a[step][key], "b": b[step][key],
                                      "likely_cause": likely_cause(step, key, common[0])}
    return result


def report(result: dict, names: tuple) -> str:
    lines = [f"compared {result['steps_compared']} steps ({result['first_step']}..{result['last_step']}): "
             f"A {names[0]} has {result['rows'][0]}, B {names[1]} has {result['rows'][1]}"]
    lines += [f"{key}: max |A - B| = {diff:.3g}" for key, diff in result["max_abs_diff"].items()]
    lines += [f"{key}: not compared (a file has no {key} column)" for key in result["not_compared"]]
    tolerance = f"atol {result['atol']:g} + rtol {result['rtol']:g} x |B|"
    first = result["first_divergence"]
    if first:
        lines += [f"first diverging step {first['step']}: {first['value']} A={first['a']!r} B={first['b']!r}",
                  f"likely cause: {first['likely_cause']}",
                  f"FAIL: {result['steps_differing']} of {result['steps_compared']} steps differ beyond {tolerance}"]
    else:
        exact = " (bitwise equal)" if result["bitwise_equal"] else ""
        lines.append(f"PASS: every step within {tolerance}{exact}")
    return "\n".join(lines)


def plain_json(value):
    """Strict JSON: a NaN or infinite number becomes the string "nan", "inf" or "-inf"."""
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("a", type=Path, help="step,loss,lr CSV of one run (e.g. your loop's)")
    add("b", type=Path, help="step,loss,lr CSV of the other (e.g. fit --record_steps FILE)")
    add("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    add("--rtol", type=float, default=1e-6, help="relative tolerance (default 1e-6, a few float32 roundings; CPU"
        " float32 runs of the same computation are bitwise equal)")
    add("--steps", type=int, default=None, help="compare only the first N common steps")
    add("--format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    try:
        for name in ("atol", "rtol"):
            value = getattr(args, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"--{name} must be a number >= 0, got {value}")
        if args.steps is not None and args.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {args.steps}")
        result = compare(read_steps(args.a), read_steps(args.b), args.atol, args.rtol, args.steps)
    except UsageError as err:
        print(f"compare_runs.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plain_json(result), indent=2, allow_nan=False) if args.format == "json" else
          report(result, (args.a.name, args.b.name)))
    return 0 if result["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
