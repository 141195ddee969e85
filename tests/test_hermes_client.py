"""The real Hermes client (hermes-agent 0.19.0, in its own virtual environment) installs this checkout offline.

The client copies <HERMES_OPTIONAL_SKILLS>/mlops/pytorch-lightning into <HERMES_HOME>/skills after its security scan;
the tests point both variables at temporary folders. The virtual environment is built once, in .hermes-venv/.
"""

import json
import shutil
import sys
import textwrap

import pytest

from conftest import REPO, assert_ok, run, shipped_files

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
    assert "## Procedure" in view["content"] and "python templates/classifier.py fit" in view["content"]
    linked = view["linked_files"]
    assert "references/checkpointing.md" in linked["references"]
    assert "templates/classifier.py" in linked["templates"] and "templates/configs/gpu.yaml" in linked["templates"]
    assert "scripts/check_env.py" in linked["scripts"]


def test_security_scan_as_community_source_is_safe(installed):
    findings = installed["findings"]
    for f in findings:
        print(f"{f['severity']:<8} {f['pattern_id']:<24} {f['file']}:{f['line']} {f['match'][:60]!r}")
    serious = [f for f in findings if f["severity"] in ("high", "critical")]
    assert not serious, serious
    assert installed["verdict"] == "safe"
