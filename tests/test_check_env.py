"""scripts/check_env.py: what is installed against what the templates need, and the install command for the
interpreter it checked."""

import json
import os

import pytest

from conftest import SCRIPTS, assert_bad_input_changes_nothing, assert_ok, run_script


def script(name, *args, cwd, timeout=600):
    return run_script(name, *args, cwd=cwd, timeout=timeout)


def test_check_env_fix_installs_into_the_checked_interpreter(tmp_path):
    import venv

    venv.create(tmp_path / "bare", with_pip=False)  # an interpreter without the packages
    bare = tmp_path / "bare" / ("Scripts" if os.name == "nt" else "bin") / "python"
    result = script("check_env.py", "--python", bare, "--format", "json", cwd=tmp_path)
    assert result.returncode == 1 and json.loads(result.stdout)["fix"].startswith(f"{bare} -m pip install ")


def test_check_env_passes_here_and_names_every_package(tmp_path):
    result = script("check_env.py", "--format", "json", cwd=tmp_path)
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["ok"], report
    checked = {p["package"] for p in report["packages"]}
    assert {"lightning", "torch", "transformers", "jsonargparse", "optuna"} <= checked


@pytest.mark.parametrize("args, expected", [(["--python", "missing/python"], "cannot run")])
def test_bad_input_is_one_line_and_changes_no_file(args, expected, tmp_path):
    assert_bad_input_changes_nothing(SCRIPTS / "check_env.py", args, expected, tmp_path)
