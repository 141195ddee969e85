"""scripts/launch.py: the command or sbatch file for a config's devices and nodes, checked against them; the
printed torchrun command run for real on two simulated nodes."""

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import (CONFIGS, QUIET, SCRIPTS, TEMPLATES, assert_bad_input_changes_nothing, assert_ok, final_val_loss,
                      load_ckpt, run_script)


def script(name, *args, cwd, timeout=600):
    return run_script(name, *args, cwd=cwd, timeout=timeout)


def test_launch_files_match_config(tmp_path):
    config = CONFIGS / "multinode.yaml"
    trainer = yaml.safe_load(config.read_text())["trainer"]
    out = tmp_path / "job.sbatch"
    assert_ok(script("launch.py", config, "--target", "slurm", "--script", "causal_lm.py", "--write", out,
                     cwd=tmp_path))
    text = out.read_text()
    assert f"#SBATCH --nodes={trainer['num_nodes']}" in text
    assert f"#SBATCH --ntasks-per-node={trainer['devices']}" in text and "#SBATCH --signal=SIGUSR1@90" in text
    assert f"#SBATCH --chdir={TEMPLATES}" in text and " causal_lm.py fit --config configs/multinode.yaml" in text
    torchrun = script("launch.py", config, "--target", "torchrun", "--script", "causal_lm.py", cwd=tmp_path)
    assert_ok(torchrun)
    assert f"--nnodes {trainer['num_nodes']} --nproc-per-node {trainer['devices']}" in torchrun.stdout
    local = script("launch.py", CONFIGS / "cpu.yaml", "--target", "local", "--script", "classifier.py",
                   cwd=tmp_path)
    assert local.stdout.startswith(f"cd {TEMPLATES} && ")  # --script found in the folder above the config's
    assert local.stdout.rstrip().endswith(" classifier.py fit --config configs/cpu.yaml")
    # one machine: torchrun needs no rendezvous address; a CPU config asks SLURM for no GPUs
    standalone = script("launch.py", CONFIGS / "cpu.yaml", "--target", "torchrun", "--script", "classifier.py",
                        cwd=tmp_path)
    assert standalone.stdout.startswith(f"cd {TEMPLATES} && torchrun --standalone --nproc-per-node 1 classifier.py")
    cpu_job = script("launch.py", CONFIGS / "cpu.yaml", "--target", "slurm", "--script", "classifier.py", cwd=tmp_path)
    assert "#SBATCH --ntasks-per-node=1" in cpu_job.stdout and "--gres" not in cpu_job.stdout
    # several configs: passed on in order; the trainer settings of the later one count (multinode's 2 x 8 GPUs)
    layered = script("launch.py", CONFIGS / "cpu.yaml", config, "--target", "torchrun", "--script", "causal_lm.py",
                     cwd=tmp_path)
    assert_ok(layered)
    assert "--nnodes 2 --nproc-per-node 8 " in layered.stdout
    assert layered.stdout.rstrip().endswith(" fit --config configs/cpu.yaml --config configs/multinode.yaml")


@pytest.mark.parametrize("args, expected", [
    (["multinode.yaml", "--target", "slurm", "--nodes", "3"], "--nodes 3 but trainer.num_nodes is 2"),
    (["multinode.yaml", "--target", "torchrun", "--devices", "4"], "--devices 4 but trainer.devices is 8"),
    (["ddp.yaml", "--target", "slurm"], "trainer.devices is -1"),
    (["multinode.yaml", "--target", "local"], "a local launch runs one machine"),
    (["missing.yaml", "--target", "local"], "cannot read"),
    (["cpu.yaml", "--target", "local"], "no such script: x.py"),
])
def test_launch_mismatch_is_an_error(tmp_path, args, expected):
    result = script("launch.py", CONFIGS / args[0], *args[1:], "--script", "x.py", cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_launch_write_never_replaces(tmp_path):
    (tmp_path / "job.sbatch").write_text("keep me\n")
    result = script("launch.py", CONFIGS / "multinode.yaml", "--target", "slurm", "--script", "causal_lm.py",
                    "--write", tmp_path / "job.sbatch", cwd=tmp_path)
    assert result.returncode == 2 and "exists" in result.stderr and (tmp_path / "job.sbatch").read_text() == "keep me\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_simulated_two_node_torchrun(tmp_path):
    """The torchrun command launch.py prints, run on two "machines" (node ranks 0 and 1 on this one), in a project
    made by scaffold.py: its config.yaml says 2 nodes x 1 process; both ranks end with the same val_loss."""
    made = script("scaffold.py", "causal_lm", "proj", "--hardware", "none", "--set", "data.block_size=32",
                  "--set", "trainer.max_steps=4", "--set", "trainer.val_check_interval=2",
                  "--set", "trainer.num_nodes=2",
                  "--set", "trainer.devices=1", "--set", "trainer.accelerator=cpu", "--set", "trainer.strategy=ddp",
                  "--set", "trainer.precision=32-true", cwd=tmp_path)
    assert_ok(made)
    printed = script("launch.py", tmp_path / "proj" / "config.yaml", "--target", "torchrun", cwd=tmp_path)
    assert_ok(printed)
    command = printed.stdout.strip().splitlines()[-1]
    assert "--nnodes 2 --nproc-per-node 1 --node-rank $NODE_RANK" in command
    port, bin_dir = free_port(), shlex.quote(str(Path(sys.executable).parent))  # bin_dir: this venv's torchrun
    procs = [subprocess.Popen(["bash", "-c", f'PATH={bin_dir}:"$PATH" NODE_RANK={rank} MASTER_ADDR=127.0.0.1'
                               f' MASTER_PORT={port} eval "$0" "$@"', command, *QUIET],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    loss0, loss1 = final_val_loss(outputs[0]), final_val_loss(outputs[1])
    assert set(loss0) == {0} and set(loss1) == {1} and loss0[0] == loss1[1]
    assert "MEMBER: 2/2" in outputs[1]
    ckpt = load_ckpt(tmp_path / "proj" / "runs" / "causal_lm" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["datamodule_hyper_parameters"]["block_size"] == 32  # config.yaml's


@pytest.mark.parametrize("args, expected", [(["missing.yaml", "--target", "slurm"], "cannot read"),
    ([str(CONFIGS / "ddp.yaml"), "--target", "torchrun", "--devices", "2", "--script", str(TEMPLATES / "classifier.py"),
      "--write", "existing.txt"], "exists")])
def test_bad_input_is_one_line_and_changes_no_file(args, expected, tmp_path):
    assert_bad_input_changes_nothing(SCRIPTS / "launch.py", args, expected, tmp_path)
