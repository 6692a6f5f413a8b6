"""run.sh: flag checks before any download, environment checks, paths, CPU and (stubbed) GPU paths.

The GPU path is exercised without GPUs: RUN_SH_NGPU sets the number of GPUs run.sh assumes, and
PYTHON points to a wrapper that records every call run.sh makes (argv, cwd, WORLD_SIZE), fakes the
FineWeb download and the torchrun launch, and hands every other call to the real interpreter.
Because the dry run of train_gpt.py then runs on this CPU, GPU-path runs use --allow-cpu or the
tiny preset to get past train_gpt.py's hardware guard.
"""
import glob
import json
import os
import subprocess
import sys

import pytest

from data.synthetic import main as synthetic_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "run.sh")
TRAIN_GPT = os.path.join(ROOT, "train_gpt.py")
LAUNCH = ["-m", "torch.distributed.run"]
SHAPES = ["--n-layer", "1", "--d-model", "64", "--head-dim", "16", "--val-tokens", "4096"]  # a fast tiny run
# Variables run.sh (or torchrun) reads; the tests start from none of them.
SCRUB = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RUN_SH_NGPU", "WORLD_SIZE", "RANK",
         "LOCAL_RANK", "CUDA_VISIBLE_DEVICES", "PYTHON")

WRAPPER = """\
import json, os, sys
argv = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(dict(argv=argv, cwd=os.getcwd(), world_size=os.environ.get("WORLD_SIZE"))) + "\\n")
if argv[:2] == ["-m", "torch.distributed.run"] or (argv and argv[0].endswith("cached_fineweb10B.py")):
    sys.exit(0)  # the launch and the download are only recorded
os.execv(sys.executable, [sys.executable] + argv)
"""


class RunSh:
    def __init__(self, tmp_path):
        self.log = tmp_path / "calls.jsonl"
        self.cwd = tmp_path / "caller"
        self.cwd.mkdir()
        wrapper = tmp_path / "python_wrapper"
        wrapper.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{tmp_path / 'wrapper.py'}' \"$@\"\n")
        wrapper.chmod(0o755)
        (tmp_path / "wrapper.py").write_text(WRAPPER.format(log=str(self.log)))
        self.python = str(wrapper)

    def __call__(self, *args, gpus=None, **env):
        """Run run.sh from self.cwd. gpus: RUN_SH_NGPU (0 is the CPU path without asking torch);
        None: the CPU path found by torch with CUDA hidden, as a user gets it."""
        full = {k: v for k, v in os.environ.items() if k not in SCRUB}
        full["PYTHON"] = self.python
        if gpus is None:
            full["CUDA_VISIBLE_DEVICES"] = ""
        else:
            full["RUN_SH_NGPU"] = str(gpus)
        full.update(env)
        if self.log.exists():
            self.log.unlink()
        proc = subprocess.run([RUN_SH, *args], cwd=self.cwd, env=full, capture_output=True,
                              text=True, timeout=300)
        proc.all_calls = [json.loads(line) for line in self.log.read_text().splitlines()] \
            if self.log.exists() else []
        # the interpreter check and the GPU count are `python -c` probes: not part of the plan
        proc.calls = [c for c in proc.all_calls if c["argv"][:1] != ["-c"]]
        return proc


@pytest.fixture
def run_sh(tmp_path):
    return RunSh(tmp_path)


def dry_runs(calls):
    return [c for c in calls if c["argv"][:2] == [TRAIN_GPT, "--dry-run"]]


def downloads(calls):
    return [c for c in calls if c["argv"] and c["argv"][0].endswith("cached_fineweb10B.py")]


def generations(calls):
    return [c for c in calls if c["argv"] and c["argv"][0].endswith("synthetic.py")]


def launches(calls):
    return [c for c in calls if c["argv"][:2] == LAUNCH]


def trainings(calls):
    return [c for c in calls if c["argv"][:1] == [TRAIN_GPT] and "--dry-run" not in c["argv"][:2]]


def only_log(pattern):
    dirs = glob.glob(pattern)
    assert len(dirs) == 1, dirs
    logs = glob.glob(os.path.join(dirs[0], "*.txt"))
    assert len(logs) == 1, logs
    return open(logs[0]).read()


# ---- the CPU path, end to end ---------------------------------------------------------------------

def test_cpu_smoke_run_from_another_directory(run_sh):
    """`./run.sh` without GPUs: the tiny preset on synthetic shards; relative --records-dir is the
    caller's, not the repository's."""
    proc = run_sh("--train-steps", "6", "--records-dir", "recs", "--run-name", "runsh", *SHAPES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no NVIDIA GPU found" in proc.stdout
    assert "running the tiny preset on the CPU with synthetic shards" in proc.stdout
    assert os.path.exists(os.path.join(ROOT, "data", "synthetic", "meta.json"))
    assert "step:6/6 val_loss" in only_log(str(run_sh.cwd / "recs" / "*_runsh"))
    assert not os.path.exists(os.path.join(ROOT, "recs"))
    # flags checked first with one rank, then the same flags trained; nothing downloaded or launched
    (check,) = dry_runs(proc.calls)
    assert check["argv"][2:] == ["--preset", "tiny", "--train-steps", "6", "--records-dir", "recs",
                                 "--run-name", "runsh", *SHAPES]
    assert check["world_size"] == "1"
    (train,) = trainings(proc.calls)
    assert train["argv"][1:] == check["argv"][2:]
    assert proc.calls.index(check) < proc.calls.index(train)
    assert not downloads(proc.calls) and not launches(proc.calls)
    (generate,) = generations(proc.calls)  # checks the shards against meta.json: a lost one is rewritten
    assert generate["argv"][1:] == ["--out", os.path.join(ROOT, "data", "synthetic"), "--if-needed"]
    assert {c["cwd"] for c in proc.calls} == {str(run_sh.cwd)}


def test_cpu_relative_data_dir(run_sh):
    """--data-dir=REL (the = form) is read from the caller's directory; no shards are generated."""
    synthetic_main(["--out", str(run_sh.cwd / "syn"), "--train-shards", "1", "--shard-tokens",
                    "10000", "--val-tokens", "5000"])
    proc = run_sh("--data-dir=syn", "--records-dir=recs", "--train-steps", "2", "--run-name", "rel", *SHAPES,
                  gpus=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running the tiny preset on the CPU with the shards in --data-dir" in proc.stdout
    assert "step:2/2 val_loss" in only_log(str(run_sh.cwd / "recs" / "*_rel"))
    assert not generations(proc.calls) and not downloads(proc.calls)


def test_cpu_failures_propagate(run_sh, tmp_path):
    bad = run_sh("--train-steps", "-1", gpus=0)  # refused by the dry run
    assert bad.returncode == 2
    assert "--train-steps must be >= 1" in bad.stderr
    assert not trainings(bad.calls)
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = run_sh("--data-dir", str(empty), "--records-dir", str(tmp_path / "recs"), gpus=0)
    assert failed.returncode != 0  # the dry run reads no data; the real run's failure is run.sh's
    assert str(empty) in failed.stderr  # the data error of train_gpt.py
    assert len(trainings(failed.calls)) == 1


@pytest.mark.parametrize("python, message", [
    ("/bin/false", "PYTHON=/bin/false does not run Python 3 (exit status 1)"),
    ("nonexistent-python", "PYTHON=nonexistent-python: no such command"),
])
def test_a_python_that_does_not_run_is_named_first(run_sh, python, message):
    for gpus in (None, 8):
        proc = run_sh("--preset", "tiny", gpus=gpus, PYTHON=python)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout  # no "CPU run" first
        assert proc.stderr.startswith("run.sh: ") and message in proc.stderr, proc.stderr


def test_a_python_without_torch_is_named_first(run_sh, tmp_path):
    """An interpreter that runs but has no torch (here: ours without its site-packages)."""
    bare = tmp_path / "python_without_site"
    bare.write_text(f"#!/bin/sh\nexec '{sys.executable}' -S \"$@\"\n")
    bare.chmod(0o755)
    for gpus in (None, 8):
        proc = run_sh("--dry-run", gpus=gpus, PYTHON=str(bare))
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout  # no "CPU run" first
        assert proc.stderr.startswith(f"run.sh: torch is not installed for PYTHON={bare} "), proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("preset, gpus", [(["--preset", "record"], None), (["--preset=small"], 0)])
def test_cpu_refuses_gpu_presets_without_allow_cpu(run_sh, preset, gpus):
    proc = run_sh(*preset, "--train-steps", "6", gpus=gpus)
    assert proc.returncode == 2
    assert "--allow-cpu" in proc.stderr
    assert "tiny" not in proc.stdout and "running the" not in proc.stdout
    assert len(dry_runs(proc.calls)) == 1
    assert not generations(proc.calls) and not downloads(proc.calls)
    assert not trainings(proc.calls) and not launches(proc.calls)


# ---- the GPU path (RUN_SH_NGPU, stubbed download and torchrun) ---------------------------------------

@pytest.mark.parametrize("args, gpus, message", [
    (["--bogus"], 8, "unrecognized arguments: --bogus"),
    (["--train-steps", "0", "--allow-cpu"], 8, "--train-steps must be >= 1"),
    (["--preset", "record"], 8, "--allow-cpu"),  # the hardware guard (this machine has no CUDA)
    (["--preset", "tiny"], 3, "world size 3"),  # the world-size split, checked with WORLD_SIZE=3
])
def test_gpu_path_checks_flags_before_download(run_sh, args, gpus, message):
    proc = run_sh(*args, gpus=gpus)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert dry_runs(proc.calls)[0]["world_size"] == str(gpus)
    assert not downloads(proc.calls) and not generations(proc.calls) and not launches(proc.calls)


def test_gpu_path_downloads_then_launches(run_sh):
    proc = run_sh("--allow-cpu", "--train-steps", "5", gpus=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check, download, launch = proc.calls
    assert check["argv"] == [TRAIN_GPT, "--dry-run", "--allow-cpu", "--train-steps", "5"]
    assert check["world_size"] == "8"
    assert download["argv"] == [os.path.join(ROOT, "data", "cached_fineweb10B.py")]
    assert launch["argv"] == LAUNCH + ["--standalone", "--nproc_per_node=8", TRAIN_GPT,
                                       "--allow-cpu", "--train-steps", "5"]


def test_gpu_path_data_dir_skips_download(run_sh):
    """A relative --data-dir reaches train_gpt.py unchanged, launched from the caller's directory."""
    proc = run_sh("--preset", "tiny", "--data-dir", "mine", gpus=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not downloads(proc.calls) and not generations(proc.calls)
    (launch,) = launches(proc.calls)
    assert launch["argv"][-4:] == ["--preset", "tiny", "--data-dir", "mine"]
    assert launch["cwd"] == str(run_sh.cwd)


def test_help_and_dry_run_start_nothing(run_sh):
    helped = run_sh("--help", gpus=8)
    assert helped.returncode == 0
    assert "usage:" in helped.stdout
    checked = run_sh("--dry-run", "--allow-cpu", gpus=8)
    assert checked.returncode == 0, checked.stderr
    assert "dry run: configuration ok" in checked.stdout
    for proc in (helped, checked):
        assert len(proc.calls) == 1 and dry_runs(proc.calls)


# ---- multi-node -------------------------------------------------------------------------------------

def test_multi_node_launch(run_sh):
    proc = run_sh("--preset", "tiny", "--data-dir=d", gpus=4, NNODES="2", NODE_RANK="1",
                  MASTER_ADDR="10.1.2.3", MASTER_PORT="29601")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check, launch = proc.calls
    assert check["world_size"] == "8"  # every rank of every node
    assert launch["argv"] == LAUNCH + ["--nnodes=2", "--node_rank=1", "--master_addr=10.1.2.3",
                                       "--master_port=29601", "--nproc_per_node=4", TRAIN_GPT,
                                       "--preset", "tiny", "--data-dir=d"]
    default_port = run_sh("--preset", "tiny", "--data-dir=d", gpus=4, NNODES="2", NODE_RANK="0",
                          MASTER_ADDR="node0")
    assert default_port.returncode == 0, default_port.stderr[-3000:]
    assert "--master_port=29500" in launches(default_port.calls)[0]["argv"]


def test_multi_node_world_size_is_checked(run_sh):
    proc = run_sh("--preset", "tiny", gpus=1, NNODES="3", NODE_RANK="0", MASTER_ADDR="node0")
    assert proc.returncode == 2
    assert "world size 3" in proc.stderr
    assert dry_runs(proc.calls)[0]["world_size"] == "3"
    assert not launches(proc.calls) and not generations(proc.calls)


@pytest.mark.parametrize("env, message", [
    (dict(NNODES="abc"), "NNODES must be a positive integer"),
    (dict(NNODES="0"), "NNODES must be a positive integer"),
    (dict(NNODES="-2"), "NNODES must be a positive integer"),
    (dict(NNODES="2", NODE_RANK="5", MASTER_ADDR="node0"), "NODE_RANK must be an integer from 0 to"),
    (dict(NNODES="2", NODE_RANK="x", MASTER_ADDR="node0"), "NODE_RANK must be an integer from 0 to"),
    (dict(NNODES="2", MASTER_ADDR="node0"), "set NODE_RANK"),
    (dict(NNODES="2", NODE_RANK="1"), "set MASTER_ADDR"),
    (dict(NODE_RANK="1"), "NODE_RANK must be an integer from 0 to"),  # NNODES forgotten
    (dict(MASTER_PORT="70000"), "MASTER_PORT must be a port number"),
    (dict(MASTER_PORT="0"), "MASTER_PORT must be a port number"),
    (dict(MASTER_PORT="http"), "MASTER_PORT must be a port number"),
    (dict(RUN_SH_NGPU="two"), "RUN_SH_NGPU must be a non-negative integer"),
])
def test_bad_environment_is_refused_before_anything_runs(run_sh, env, message):
    gpus = env.pop("RUN_SH_NGPU", "8")
    proc = run_sh("--preset", "tiny", gpus=gpus, **env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("run.sh: ") and message in proc.stderr, proc.stderr
    assert proc.all_calls == []  # not even the interpreter ran


def test_multi_node_needs_gpus(run_sh):
    proc = run_sh("--preset", "tiny", NNODES="2", NODE_RANK="0", MASTER_ADDR="node0")
    assert proc.returncode == 2
    assert "no NVIDIA GPU found" in proc.stderr
    assert not dry_runs(proc.calls) and not trainings(proc.calls)


def test_the_trainers_lock_file_is_ignored_by_git():
    """records/.lock (the trainer's lock for record folders) never shows in `git status`."""
    try:
        proc = subprocess.run(["git", "check-ignore", "-q", "records/.lock"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
    except OSError:
        pytest.skip("git not available")
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0, "records/.lock is not in .gitignore"
