"""Documentation runs: every ```python block in SKILL.md and references/ executes on CPU in a fresh subprocess.

A block that cannot run here carries a marker on the line right above its fence:
    <!-- not run: <why> -->
Markers stay few (MAX_MARKERS) and each must give its reason.
"""

import re
import sys

import pytest

from conftest import CONFIGS, REPO, assert_ok, run

DOCS = [REPO / "SKILL.md", *sorted((REPO / "references").glob("*.md"))]
MARKER = re.compile(r"<!-- not run: (.+?) -->")
MAX_MARKERS = 3


def python_blocks():
    """(doc, line number, code, marker reason or None) for every ```python block."""
    blocks = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i + 1
                end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
                marker = MARKER.search(lines[i - 1]) if i > 0 else None
                blocks.append((doc, start, "\n".join(lines[start:end]) + "\n", marker.group(1) if marker else None))
                i = end
            i += 1
    return blocks


BLOCKS = python_blocks()


@pytest.mark.parametrize("doc, line, code, reason", BLOCKS,
                         ids=[f"{b[0].relative_to(REPO)}:{b[1]}" for b in BLOCKS])
def test_python_block_runs(doc, line, code, reason, tmp_path):
    if reason:
        compile(code, f"{doc.name}:{line}", "exec")  # a marked block must still be valid Python
        pytest.skip(f"marked not run: {reason}")
    script = tmp_path / "block.py"
    script.write_text(code)
    result = run([sys.executable, script], cwd=tmp_path, timeout=300)
    assert_ok(result)


def test_blocks_exist_and_markers_are_few_and_justified():
    assert len(BLOCKS) >= 3, "the references must carry runnable examples"
    reasons = [b[3] for b in BLOCKS if b[3]]
    assert len(reasons) <= MAX_MARKERS, f"too many blocks marked not run: {reasons}"
    assert all(len(r.split()) >= 3 for r in reasons), f"each marker must say why: {reasons}"


def test_commands_in_docs_name_real_files():
    """Every `python scripts/X.py`, `python templates/X.py` and `configs/X.yaml` the docs mention exists."""
    for doc in [REPO / "README.md", *DOCS]:
        text = doc.read_text()
        for path in re.findall(r"python ((?:scripts|templates)/[a-z_][\w/]*\.py)", text):
            assert (REPO / path).is_file(), f"{doc.name} mentions missing {path}"
        generated = set(re.findall(r">\s*configs/([\w.-]+\.yaml)", text))  # files the docs tell the agent to write
        for name in set(re.findall(r"configs/([\w.-]+\.yaml)", text)) - generated:
            assert (CONFIGS / name).is_file(), f"{doc.name} mentions missing configs/{name}"
        assert not re.search(r"(?<![\w.])\./scripts/", text), f"{doc.name}: run scripts as `python scripts/NAME.py`"


def test_procedure_uses_the_scripts_in_order():
    text = (REPO / "SKILL.md").read_text()
    procedure = text.split("## Procedure\n", 1)[1].split("\n## ", 1)[0]
    positions = [procedure.find(f"python scripts/{name}.py") for name in
                 ("detect_hardware", "scaffold", "smoke_test", "launch", "summarize_run")]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions


# Symptoms users report (lightning-facts.md's table and more): each must be findable where a user would look.
SYMPTOMS = ["hangs after validation", "deadlock when logging", "sync_dist", "FSDP checkpoint",
            "starts from scratch", "load_from_checkpoint", "floods SLURM logs", "persistent_workers",
            "_orig_mod.", "memory growing", "Initializing distributed", "--signal=SIGUSR1@90",
            "parameters that were not used in producing loss", "Expected a parent", "trainer.test", "NaN", "jsonargparse[signatures]",
            "KubeflowEnvironment", "NCCL_DEBUG=INFO", "ddp_notebook", "dataloader_idx", "on_epoch_end",
            "auto_lr_find", "fp16"]
FORBIDDEN_IN_CODE = [r"precision\s*=\s*['\"](fp16|half|bf16|16)['\"]", r"auto_lr_find", r"auto_scale_batch_size",
                     r"\.tune\(", r"def on_epoch_end\(", r"TuneReportCallback", r"suggest_loguniform",
                     r"import pytorch_lightning", r"from pytorch_lightning", r"activation_checkpointing\s*=",
                     r"NCCL_TIMEOUT"]


def code_blocks(text: str) -> list:
    return re.findall(r"```(?:python|bash|yaml)\n(.*?)```", text, re.S)


def test_each_symptom_is_findable_in_the_references():
    text = "\n".join(p.read_text() for p in (REPO / "references").glob("*.md"))
    missing = [s for s in SYMPTOMS if s not in text]
    assert not missing, f"not answered in references/: {missing}"


def test_no_known_wrong_api_in_code_blocks():
    for doc in [REPO / "README.md", *DOCS]:
        for block in code_blocks(doc.read_text()):
            lines = [line for line in block.splitlines() if "# raises" not in line]  # shown failing on purpose
            for pattern in FORBIDDEN_IN_CODE:
                assert not re.search(pattern, "\n".join(lines)), f"{doc.name}: {pattern!r} in a code block"


def test_every_lightning_name_in_the_docs_exists():
    import importlib

    names = set()
    for doc in [REPO / "README.md", *DOCS]:
        names |= set(re.findall(r"\blightning(?:\.[A-Za-z_]\w*)+", doc.read_text()))
    assert names
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"{name}: {attr} not found"
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"{name} does not import")


def test_migration_before_and_after_reach_the_same_loss(tmp_path):
    text = (REPO / "references" / "migration.md").read_text()
    losses = []
    for heading in ("## Before: a plain loop", "## After: LightningModule + Trainer"):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        (tmp_path / "block.py").write_text(code)
        result = run([sys.executable, tmp_path / "block.py"], cwd=tmp_path)
        assert_ok(result)
        losses.append(float(re.search(r"final loss: ([0-9.]+)", result.stdout).group(1)))
    print(f"plain loop {losses[0]:.6f}, Lightning {losses[1]:.6f}")
    assert abs(losses[0] - losses[1]) < 1e-5
