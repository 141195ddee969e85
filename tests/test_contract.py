"""The package contract: SKILL.md frontmatter rules, links, the skill.yaml manifest, and what the client installs."""

import re

import pytest
import yaml

from conftest import REPO, shipped_files

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
    listed = {e["file"] for section in ("scripts", "templates", "configs", "launch", "references", "assets")
              for e in skill[section]}
    listed |= {c for t in skill["templates"] for c in t["configs"]}
    on_disk = {str(p) for p in shipped_files() if p.parts[0] in ("scripts", "references", "assets")
               or (p.parts[0] == "templates" and p.suffix in (".py", ".ipynb", ".yaml", ".sh", ".sbatch"))}
    assert listed == on_disk, f"only listed: {sorted(listed - on_disk)}; only on disk: {sorted(on_disk - listed)}"
    for entry in skill["scripts"]:
        assert entry["command"].startswith(f"python {entry['file']}") and entry["purpose"]
    for entry in skill["references"]:
        assert entry["topic"] and entry["file"] in SKILL.read_text(), f"SKILL.md must link {entry['file']}"


def test_no_machine_local_paths():
    pattern = re.compile(r"/home/[a-z_][\w-]*/|/Users/[A-Za-z][\w-]*/|[A-Za-z]:\\\\?Users\\\\?|/root/")
    for rel in shipped_files():
        if (REPO / rel).suffix in (".gz", ".png") or rel.name == "test_contract.py":  # this file spells the patterns
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
