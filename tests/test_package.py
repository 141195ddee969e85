"""The package as the Hermes client installs it and the agent reads it: SKILL.md's rules and house style, the skill.yaml
manifest against the files on disk, size and file count, links, every ```python block of SKILL.md and references/ run
on CPU, the commands the docs name, and an install, view and security scan through the real client.

A documentation block that cannot run here carries a marker on the line right above its fence:
    <!-- not run: <why> -->
Markers stay few (MAX_MARKERS) and each must give its reason. The real client (hermes-agent 0.19.0) is installed in
its own virtual environment, .hermes-venv/, on first use.
"""

import json
import re
import shutil
import sys
import textwrap

import pytest
import yaml

from conftest import CONFIGS, REPO, assert_ok, run, shipped_files


# ---- SKILL.md, skill.yaml and the files on disk -------------------------------------------------------------------
SKILL = REPO / "SKILL.md"
BANNED_WORDS = ["powerful", "comprehensive", "seamless", "revolutionary", "cutting-edge", "state-of-the-art"]
SECTIONS = ["When to Use", "Prerequisites", "How to Run", "Quick Reference", "Procedure", "Pitfalls", "Verification"]
MAX_FILES = 50  # above this the Hermes scan adds a "too many files" finding
MAX_TOTAL = 1024 * 1024
MAX_FILE = 256 * 1024


def frontmatter() -> dict:
    text = SKILL.read_text()
    assert text.startswith("---\n"), "SKILL.md must open with YAML frontmatter"
    end = text.index("\n---\n", 4)
    assert end + 5 <= 4000, "the frontmatter must sit inside the first 4,000 characters"
    return yaml.safe_load(text[4:end]), text[4:end]


def manifest() -> dict:
    return yaml.safe_load((REPO / "skill.yaml").read_text())


def test_frontmatter_rules():
    meta, raw = frontmatter()
    for key in ("name", "description", "version", "author", "license", "platforms"):
        assert meta.get(key), f"frontmatter lacks {key}"
    assert meta["name"] == "pytorch-lightning"
    description = meta["description"]
    assert len(description) <= 60 and description.endswith("."), description
    assert not [w for w in BANNED_WORDS if w in description.lower()]
    assert set(meta["platforms"]) <= {"linux", "macos", "windows"}
    assert meta["metadata"]["hermes"]["tags"], "tags go under metadata.hermes.tags"
    assert meta["license"] == "MIT" and (REPO / "LICENSE").read_text().startswith("MIT License")
    assert not re.search(r":\s*\[", raw), "use block-style YAML lists in the frontmatter"


def test_skill_md_house_style():
    text = SKILL.read_text()
    assert len(text.splitlines()) <= 200 and len(text) <= 100_000
    assert re.search(r"^# .+ Skill$", text, re.M)
    positions = [text.find(f"\n## {s}\n") for s in SECTIONS]
    assert all(p > 0 for p in positions), dict(zip(SECTIONS, positions))
    assert positions == sorted(positions), "house-style sections out of order"


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def markdown_files():
    return [REPO / "SKILL.md", REPO / "README.md", *sorted((REPO / "references").glob("*.md"))]


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: broken link {target}"
        if anchor and file.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
            assert anchor in anchors, f"{doc.name}: no heading for #{anchor} in {file.name}"


def test_manifest_agrees_with_skill_md_and_pyproject():
    meta, _ = frontmatter()
    skill = manifest()
    for key in ("name", "version", "description", "license"):
        assert skill[key] == meta[key], key
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(skill["dependencies"]) == sorted(meta["dependencies"]) == sorted(pyproject["dependencies"])
    assert sorted(skill["test_dependencies"]) == sorted(pyproject["optional-dependencies"]["test"])
    assert pyproject["version"] == meta["version"]


def test_manifest_lists_exactly_the_files_on_disk():
    skill = manifest()
    listed = {e["file"] for section in ("scripts", "templates", "configs", "references", "assets")
              for e in skill[section]}
    listed.add(skill["support"]["file"])
    listed |= {c for t in skill["templates"] for c in t["configs"]}
    on_disk = {str(p) for p in shipped_files() if p.parts[0] in ("scripts", "references", "assets")
               or (p.parts[0] == "templates" and p.suffix in (".py", ".ipynb", ".yaml"))}
    assert listed == on_disk, f"only listed: {sorted(listed - on_disk)}; only on disk: {sorted(on_disk - listed)}"
    for entry in skill["scripts"]:
        assert entry["command"].startswith(f"python {entry['file']}") and entry["purpose"]
    for entry in skill["references"]:
        assert entry["topic"] and entry["file"] in SKILL.read_text(), f"SKILL.md must link {entry['file']}"


def test_no_machine_local_paths():
    pattern = re.compile(r"/home/[a-z_][\w-]*/|/Users/[A-Za-z][\w-]*/|[A-Za-z]:\\\\?Users\\\\?|/root/")
    for rel in shipped_files():
        if (REPO / rel).suffix in (".gz", ".png") or rel.name == "test_package.py":  # this file spells the patterns
            continue
        match = pattern.search((REPO / rel).read_text())
        assert not match, f"{rel}: machine-local path {match.group(0)!r}"


def test_installed_size_and_file_count():
    files = shipped_files()
    sizes = {str(p): (REPO / p).stat().st_size for p in files}
    total = sum(sizes.values())
    print(f"installed package: {len(files)} files, {total / 1024:.0f} KB "
          f"(limits: {MAX_FILES} files, {MAX_TOTAL // 1024} KB, {MAX_FILE // 1024} KB per file)")
    assert total < MAX_TOTAL
    assert not {p: s for p, s in sizes.items() if s > MAX_FILE}
    assert len(files) <= MAX_FILES
    assert (REPO / "assets" / "digits.csv.gz").stat().st_size < 100 * 1024


# ---- documentation code blocks and names ------------------------------------------------------------------
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


@pytest.mark.slow
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
                     r"\.tune\(", r"def on_epoch_end\(", r"integration\.pytorch_lightning", r"suggest_loguniform",
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


# ---- the real Hermes client --------------------------------------------------------------------------------------
HERMES_VERSION = "0.19.0"
VENV = REPO / ".hermes-venv"
BIN = VENV / ("Scripts" if sys.platform == "win32" else "bin")

DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from tools.skills_tool import skill_view
    from tools.skills_guard import scan_skill

    view = json.loads(skill_view("pytorch-lightning"))
    scan = scan_skill(Path(sys.argv[1]), source="community")
    findings = [{k: getattr(f, k) for k in ("severity", "pattern_id", "file", "line", "match")} for f in scan.findings]
    print(json.dumps({"view": view, "verdict": scan.verdict, "findings": findings}))
""")


@pytest.fixture(scope="module")
def hermes():
    """Path of the client's bin folder; builds the virtual environment on first use (about a minute)."""
    marker = VENV / f"hermes-agent-{HERMES_VERSION}.ok"
    if not marker.exists():
        built = run([sys.executable, "-m", "venv", "--clear", VENV], cwd=REPO, timeout=300)
        assert_ok(built)
        installed = run([BIN / "python", "-m", "pip", "install", "--quiet", f"hermes-agent=={HERMES_VERSION}"],
                        cwd=REPO, timeout=1200)
        if installed.returncode != 0:
            pytest.fail(f"could not install hermes-agent=={HERMES_VERSION} into {VENV} (needs the package index):\n"
                        f"{installed.stderr[-2000:]}")
        marker.write_text("ok\n")
    return BIN


@pytest.fixture(scope="module")
def installed(hermes, tmp_path_factory):
    """Installs a copy of the checkout with `hermes skills install`, then views and scans it with the client."""
    root = tmp_path_factory.mktemp("hermes")
    source = root / "optional" / "mlops" / "pytorch-lightning"
    for rel in shipped_files():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, source / rel)
    env = ["env", f"HERMES_HOME={root / 'home'}", f"HERMES_OPTIONAL_SKILLS={root / 'optional'}"]
    result = run([*env, hermes / "hermes", "skills", "install", "official/mlops/pytorch-lightning", "--yes"],
                 cwd=root, timeout=300)
    assert_ok(result)
    target = root / "home" / "skills" / "mlops" / "pytorch-lightning"
    (root / "driver.py").write_text(DRIVER)
    viewed = run([*env, hermes / "python", root / "driver.py", target], cwd=root, timeout=300)
    assert_ok(viewed)
    return {"cli": result.stdout, "target": target, **json.loads(viewed.stdout.strip().splitlines()[-1])}


def test_install_copies_every_shipped_file(installed):
    assert "Installed: mlops/pytorch-lightning" in installed["cli"], installed["cli"][-2000:]
    copied = sorted(str(p.relative_to(installed["target"])) for p in installed["target"].rglob("*") if p.is_file())
    assert copied == sorted(str(p) for p in shipped_files())


def test_skill_view_returns_body_and_links(installed):
    view = installed["view"]
    assert view["success"] and view["name"] == "pytorch-lightning"
    assert "## Procedure" in view["content"] and "python templates/tabular.py fit" in view["content"]
    linked = view["linked_files"]
    assert "references/checkpointing.md" in linked["references"]
    assert "templates/image_classifier.py" in linked["templates"]
    assert "templates/configs/gpu.yaml" in linked["templates"]
    assert "templates/lightning_support.py" in linked["templates"] and "scripts/hpo_optuna.py" in linked["scripts"]
    assert "scripts/check_env.py" in linked["scripts"]


def test_security_scan_as_community_source_is_safe(installed):
    findings = installed["findings"]
    for f in findings:
        print(f"{f['severity']:<8} {f['pattern_id']:<24} {f['file']}:{f['line']} {f['match'][:60]!r}")
    serious = [f for f in findings if f["severity"] in ("high", "critical")]
    assert not serious, serious
    assert installed["verdict"] == "safe"
