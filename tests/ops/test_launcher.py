"""What `psana-ipc slurm` writes: the #SBATCH header and activation lines the
options and facility presets ask for, settings that bash reads back exactly,
and jobs it refuses to write. Also the rank/world lookup clients shard by."""
import argparse
import os
import shlex
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch.distributed as dist
from psana_ipc.client import slurm
from psana_ipc.client.distributed import rank_and_world, shard

S3DF_PSCONDA = "/sdf/group/lcls/ds/ana/sw/conda1/manage/bin/psconda.sh"
CDS_PSCONDA = "/cds/sw/ds/ana/conda1/manage/bin/psconda.sh"


def generate(capsys, monkeypatch, argv: List[str], facility: str = "") -> str:
    """The script `psana-ipc slurm ARGV` prints, through the sub-command the CLI registers."""
    monkeypatch.setenv("FACILITY", facility)
    parser = argparse.ArgumentParser(prog="psana-ipc")
    slurm.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["slurm"] + argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def sbatch_header(script: str) -> Dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line[len("#SBATCH "):].partition("=")
            options[name] = value
    return options


def setting(script: str, name: str) -> str:
    """The value bash gives a `NAME=...` line of the script."""
    line = next(line for line in script.splitlines() if line.startswith(name + "="))
    return shlex.split(line[len(name) + 1:])[0]


def test_s3df_preset_header_and_psana_activation(capsys, monkeypatch, tmp_path):
    script = generate(capsys, monkeypatch, [
        "--log-dir", str(tmp_path), "-N", "2", "-n", "8", "-c", "4", "--gpus", "a100:4",
        "-t", "02:00:00", "-J", "train", "--reservation", "lcls_beamtime", "--", "python", "x.py",
    ], facility="S3DF")
    assert sbatch_header(script) == {
        "--partition": "milano", "--job-name": "train",
        "--output": f"{tmp_path}/train-%j.out", "--error": f"{tmp_path}/train-%j.err",
        "--nodes": "2", "--ntasks": "8", "--cpus-per-task": "4", "--gpus": "a100:4",
        "--time": "02:00:00", "--mem": "0", "--exclusive": "", "--account": "lcls",
        "--reservation": "lcls_beamtime"}
    assert setting(script, "SERVER_ENV") == f"source {S3DF_PSCONDA}"
    assert setting(script, "CLIENT_ENV") == ""


@pytest.mark.parametrize("facility", ["SLAC", "SRCF_FFB"])
def test_cds_presets_use_the_ffb_queue_and_no_account(capsys, monkeypatch, facility):
    script = generate(capsys, monkeypatch, ["--facility", facility, "--", "python", "x.py"])
    header = sbatch_header(script)
    assert header["--partition"] == "ffbh3q"
    assert "--account" not in header and "--reservation" not in header
    assert setting(script, "SERVER_ENV") == f"source {CDS_PSCONDA}"


def test_options_override_the_preset(capsys, monkeypatch, tmp_path):
    venv = tmp_path / "torch-env"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").touch()
    script = generate(capsys, monkeypatch, [
        "-p", "ampere", "-A", "lcls:mfx123", "--no-exclusive", "--mem", "",
        "--server-env", "source /my/psana/setup.sh && conda activate ana-4.0.62",
        "--client-env", str(venv), "--", "python", "x.py"], facility="S3DF")
    header = sbatch_header(script)
    assert (header["--partition"], header["--account"]) == ("ampere", "lcls:mfx123")
    assert "--exclusive" not in header and "--mem" not in header
    assert setting(script, "SERVER_ENV") == "source /my/psana/setup.sh && conda activate ana-4.0.62"
    assert setting(script, "CLIENT_ENV") == f"source {venv}/bin/activate"


def test_no_facility_leaves_partition_and_environments_to_the_submitter(capsys, monkeypatch):
    script = generate(capsys, monkeypatch, ["--", "python", "x.py"], facility="elsewhere")
    assert "--partition" not in sbatch_header(script)
    assert setting(script, "SERVER_ENV") == setting(script, "CLIENT_ENV") == ""


def test_environment_kinds(tmp_path):
    script = tmp_path / "setup.sh"
    script.touch()
    conda = tmp_path / "conda-env"
    (conda / "conda-meta").mkdir(parents=True)
    assert slurm.activation(str(script)) == f"source {script}"
    assert slurm.activation(str(conda)).endswith(f"conda activate {conda}")
    assert slurm.activation("module load psana") == "module load psana"
    with pytest.raises(ValueError, match="not an activation script"):
        slurm.activation(str(tmp_path / "missing"))


def test_bash_reads_back_the_commands_exactly(tmp_path):
    command = ["python", "train.py", "--name", "a b", "$HOME", "it's", "--out", "r{rank}.json",
               "@CLIENT@", "${SERVER_ARGS[@]}"]   # not placeholders, not expanded
    server_args = ["--source", "psana2", "--data-dir", "/data/with space"]
    script = slurm.render_script(slurm.JobSpec(command=command, server_args=server_args))
    settings = script.split("# Everything below")[0]
    printed = subprocess.run(
        ["bash", "-c", settings + 'printf "%s\\0" "${CLIENT[@]}"; printf "|\\0";'
                                  'printf "%s\\0" "${SERVER_ARGS[@]}"'],
        capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    assert printed == command + ["|"] + server_args
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_script_option_writes_an_executable_job(capsys, monkeypatch, tmp_path):
    path = tmp_path / "job.sh"
    generate(capsys, monkeypatch, ["--log-dir", str(tmp_path / "new"), "--script", str(path),
                                   "--", "python", "x.py"])
    assert os.access(path, os.X_OK) and (tmp_path / "new").is_dir()
    assert path.read_text().startswith("#!/bin/bash\n#SBATCH --job-name=psana-ipc\n")


@pytest.mark.parametrize("argv, message", [
    (["--server-args=--port 6000", "--", "x"], "the launcher sets"),
    (["--server-args=--unix=/tmp/s", "--", "x"], "the launcher sets"),
    (["--server-args=--ready /tmp/r", "--", "x"], "the launcher sets"),
    (["-N", "3", "-n", "2", "--", "x"], "nodes <= ntasks"),
    (["--"], "no client command"),
    (["-J", "two words", "--", "x"], "cannot contain spaces"),
])
def test_refuses_jobs_it_cannot_run(capsys, argv, message):
    assert slurm.main(argv) == 2
    assert message in capsys.readouterr().err


def test_rank_and_world_sources_in_order(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert rank_and_world() == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world() == (1, 2)


def test_an_initialized_torch_group_wins_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "9")
    dist.init_process_group("gloo", init_method=Path(tmp_path, "rendezvous").as_uri(),
                            rank=0, world_size=1)
    try:
        assert rank_and_world() == (0, 1)
    finally:
        dist.destroy_process_group()


def test_shards_are_disjoint_and_cover_everything():
    shares = [list(shard(range(10), rank, 3)) for rank in range(3)]
    assert sorted(sum(shares, [])) == list(range(10))
    assert shares[1] == [1, 4, 7]
