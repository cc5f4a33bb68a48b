"""SLURM clusters with dask-jobqueue (``predict --slurm cluster.yaml``, ``slurm-script``).

No SLURM here: the job scripts are checked as text, and ``predict --slurm`` runs against a
stand-in ``sbatch`` that runs each job script on this machine (in the background, in a process
group of its own) and a stand-in ``scancel`` that ends that group, so dask-jobqueue's whole
path (submission, workers joining, cancelling) runs for real. Where the network tasks run
(GPU-resource workers only) is tested on local clusters in ``tests/test_cluster.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cellulus_scale.cli.main import main
from conftest import assert_one_line_error

from cellulus_scale.blockwise.slurm import SlurmSpec, job_scripts
from cellulus_scale.io.ome_zarr import open_labels

pytest.importorskip(
    "dask_jobqueue", reason="dask-jobqueue not installed: pip install -e '.[slurm]'"
)

CLUSTER_YAML = """\
account: mylab
queue: normal
walltime: "02:00:00"
interface: ib0
prologue:
  - module load cuda/12.4
  - source /shared/envs/cellulus/bin/activate
gpu: {jobs: 2, queue: gpu, memory: 64GB, cores: 8}
cpu: {jobs: 4, cores: 16, memory: 32GB}
"""

SBATCH = """\
#!/usr/bin/env bash
# A stand-in for SLURM's sbatch: runs the job script here, in the background, in a process
# group of its own whose ID is the job ID.
set -e
folder="$(dirname "$0")"
copy="$(mktemp "$folder/job-XXXXXX.sh")"
cp "$1" "$copy"
setsid bash "$copy" > "$copy.log" 2>&1 < /dev/null &
echo "$!" >> "$folder/submitted"
echo "Submitted batch job $!"
"""

SCANCEL = """\
#!/usr/bin/env bash
# A stand-in for SLURM's scancel: ends the job's process group.
echo "$1" >> "$(dirname "$0")/cancelled"
kill -TERM -- "-$1" 2>/dev/null || true
"""


def _spec(tmp_path: Path, text: str = CLUSTER_YAML) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_job_scripts_of_gpu_and_cpu_jobs(tmp_path):
    spec = SlurmSpec.load(_spec(tmp_path))
    scripts = job_scripts(spec)
    assert set(scripts) == {"gpu", "cpu"}
    gpu, cpu = scripts["gpu"].splitlines(), scripts["cpu"].splitlines()
    for lines, queue, cores in ((gpu, "gpu", 8), (cpu, "normal", 16)):
        assert lines[0] == "#!/usr/bin/env bash"
        for directive in (f"-p {queue}", "-A mylab", "-t 02:00:00", "-n 1"):
            assert f"#SBATCH {directive}" in lines, (directive, lines)
        assert f"#SBATCH --cpus-per-task={cores}" in lines
        assert lines.index("module load cuda/12.4") < len(lines) - 1
        assert "source /shared/envs/cellulus/bin/activate" in lines
    assert "#SBATCH --gres=gpu:1" in gpu and "#SBATCH --gres=gpu:1" not in cpu
    assert 'export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"' in gpu
    assert 'export CUDA_VISIBLE_DEVICES=""' in cpu
    gpu_worker, cpu_worker = gpu[-1].split(), cpu[-1].split()
    assert gpu_worker[0] == sys.executable and gpu_worker[1:3] == [
        "-m",
        "distributed.cli.dask_worker",
    ]
    # 4 single-threaded workers per GPU job, each advertising one GPU; 16 in a CPU job
    for worker, processes in ((gpu_worker, "4"), (cpu_worker, "16")):
        assert worker[worker.index("--nthreads") + 1] == "1"
        assert worker[worker.index("--nworkers") + 1] == processes
        assert worker[worker.index("--interface") + 1] == "ib0"
    assert gpu_worker[gpu_worker.index("--resources") + 1] == "GPU=1"
    assert "--resources" not in cpu_worker
    assert "#SBATCH --mem=60G" in gpu  # 64 GB, in SLURM's GiB


def test_slurm_script_command(tmp_path, run_cli):
    result = run_cli("slurm-script", _spec(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "# --- gpu jobs: 2 x sbatch of this script ---" in result.stdout
    assert "# --- cpu jobs: 4 x sbatch of this script ---" in result.stdout
    assert result.stdout.count("#SBATCH --gres=gpu:1") == 1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("gpu: {jobs: 1, memory: 8GB}\nqueues: gpu\n", ["unknown key queues"]),
        ("cpu: {jobs: 2, cores: 4}\n", ["memory is missing"]),
        ("cpu: {jobs: 0, cores: 4, memory: 8GB}\n", ["no job"]),
        ("gpu: {jobs: two, memory: 8GB}\n", ["jobs must be a whole number"]),
        ("gpu: [1, 2\n", ["not readable YAML"]),
        ("- a list\n", ["not a mapping"]),
    ],
)
def test_bad_cluster_yaml(tmp_path, cli_runner, text, words):
    config = _spec(tmp_path, text)
    predict = ["predict", tmp_path / "in.zarr", tmp_path / "out.zarr", "--method", "watershed"]
    predict += ["--diameter", "16", "--slurm", config]  # refused before the input is opened
    for args in (["slurm-script", config], predict):
        ran = cli_runner.invoke(main, [str(a) for a in args])
        result = subprocess.CompletedProcess(args, ran.exit_code, ran.output, ran.stderr)
        assert_one_line_error(result, *words)


def test_missing_cluster_yaml_and_other_schedulers(tmp_path, cli_runner, simulated_store):
    path = _spec(tmp_path)
    cases = [
        (["--slurm", tmp_path / "none.yaml"], ["no such file"]),
        (["--slurm", path, "--scheduler", "tcp://127.0.0.1:1"], ["starts its own scheduler"]),
    ]
    for options, words in cases:
        args = ["predict", simulated_store, tmp_path / "out.zarr", "--method", "watershed"]
        args += ["--diameter", "16", *options]
        ran = cli_runner.invoke(main, [str(a) for a in args])
        assert_one_line_error(
            subprocess.CompletedProcess(args, ran.exit_code, ran.output, ran.stderr), *words
        )


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_predict_on_slurm_jobs(tmp_path, simulated_store, run_cli):
    """``predict --slurm``: one GPU job (2 workers advertising GPU=1) and one CPU job are
    submitted with sbatch, join over loopback, compute the labels of a local run, and are
    cancelled with scancel at the end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    config = _spec(
        tmp_path,
        "walltime: '00:10:00'\ninterface: lo\nwait_minutes: 3\n"
        f"log_directory: {tmp_path / 'logs'}\n"
        "gpu: {jobs: 1, workers_per_gpu: 2, memory: 4GB}\n"
        "cpu: {jobs: 1, cores: 1, memory: 2GB}\n",
    )
    reference = tmp_path / "local.zarr"
    watershed = ["--method", "watershed", "--diameter", "16"]
    local = run_cli("predict", simulated_store, reference, *watershed, "--workers", "1")
    assert local.returncode == 0, local.stderr
    out = tmp_path / "slurm.zarr"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "cellulus-scale"), "predict", str(simulated_store)]
    command += [str(out), *watershed, "--slurm", str(config)]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        submitted = [int(v) for v in (bin_dir / "submitted").read_text().split()]
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in submitted) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [pid for pid in submitted if _alive(pid)]
        for pid in left:  # the test's own stand-in jobs, by their process group
            os.killpg(pid, signal.SIGKILL)
    assert result.returncode == 0, result.stderr
    assert len(submitted) == 2  # one GPU job, one CPU job
    cancelled = [int(v) for v in (bin_dir / "cancelled").read_text().split()]
    assert sorted(cancelled) == sorted(submitted) and not left
    np.testing.assert_array_equal(
        open_labels(out, "cellulus").data.compute(),
        open_labels(reference, "cellulus").data.compute(),
    )
    scripts = sorted(bin_dir.glob("job-*.sh"))
    texts = [s.read_text() for s in scripts]
    assert sum("--resources GPU=1" in t for t in texts) == 1
    assert all("--interface lo" in t and "tcp://127.0.0.1:" in t for t in texts)
