"""The paths a first `./run.sh` on an 8-GPU node (or several nodes) takes, on the CPU: 8 and 4 gloo
ranks against one process, run.sh on two nodes (one machine, localhost rendezvous), and the logic
of tools/gpu_check.sh. The compiled paths are in test_compiled.py."""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_GPT = os.path.join(ROOT, "train_gpt.py")
VAL_LINE = re.compile(r"^step:(\d+)/\d+ val_loss:(\d+\.\d{5}) ", re.M)
# Variables torchrun or run.sh read; every launch here starts from none of them.
SCRUB = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RUN_SH_NGPU", "WORLD_SIZE", "RANK",
         "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PYTHON")

# 3 blocks of width 64: 18 block matrices (3 shapes), not a multiple of 8 or 4, so the last round
# of the per-matrix all-gather is short (ranks without a matrix send padding) and every mixed
# round pads the smaller shapes to the largest. 32 sequences of 128 tokens per step in
# micro-batches of 4: one process runs 8 micro-batches, 4 ranks 2 each, 8 ranks one each (as 8
# GPUs do). 2 steps, validated at 0, 1 and 2 on one batch; diagnostics on, as by default.
ARGS = ["--preset", "tiny", "--n-layer", "3", "--d-model", "64", "--head-dim", "16", "--train-steps", "2",
        "--val-every", "1", "--val-every-late", "1", "--val-tokens", "4096", "--micro-batch-seqs", "4",
        "--seed", "3"]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(dict(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"), **extra)
    return env


def the_log(records_dir):
    logs = glob.glob(os.path.join(str(records_dir), "*", "*.txt"))
    assert len(logs) == 1, logs  # one record folder with one log, whatever the number of ranks
    return open(logs[0]).read()


def val_losses(text):
    return [(int(s), v) for s, v in VAL_LINE.findall(text)]


def torchrun(nproc, data_dir, records_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", TRAIN_GPT, *ARGS, "--data-dir", data_dir,
                           "--records-dir", str(records_dir)],
                          capture_output=True, text=True, timeout=600, env=clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return the_log(records_dir)


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    records_dir = tmp_path_factory.mktemp("one_process")
    assert train_gpt.main(ARGS + ["--data-dir", data_dir, "--records-dir", str(records_dir)]) == 0
    return the_log(records_dir)


@pytest.fixture(scope="module")
def four_ranks(data_dir, tmp_path_factory):
    return torchrun(4, data_dir, tmp_path_factory.mktemp("four_ranks"))


def assert_same_run(log, reference, world):
    """The same run on `world` gloo ranks as in one process. Step 0 is exactly the same computation
    (rank 0's weights, broadcast; only the validation sum is associated per rank, rounding far below
    the 5 printed decimals). After it, the gradients are summed in another order (8 micro-batches
    in turn, against per-rank sums all-reduced by gloo): weights differ by float32 rounding, and a
    printed loss may move by one unit in the 5th decimal (measured: none at 8 or 4 ranks over these
    2 steps; 1e-5 at the 3rd step at 8 ranks)."""
    accum = 8 // world
    assert f"world_size {world}" in log and f"grad_accum_steps {accum}" in log
    hp = train_gpt.parse_args(ARGS)[0]
    matrices = sum(p.ndim == 2 for p in train_gpt.GPT(hp, torch.float32).blocks.parameters())
    assert matrices == 18 and matrices % world  # the all-gather's padding path runs
    got, expected = val_losses(log), val_losses(reference)
    assert [s for s, _ in got] == [s for s, _ in expected] == [0, 1, 2]
    assert got[0] == expected[0]
    for (_, a), (_, b) in zip(got, expected):
        assert abs(float(a) - float(b)) <= 2e-5, (got, expected)
    assert "diagnostics: dead:" in log


def test_eight_gloo_ranks_one_micro_batch_each_train_as_one_process(data_dir, tmp_path, one_process):
    assert_same_run(torchrun(8, data_dir, tmp_path), one_process, 8)


def test_four_gloo_ranks_train_as_one_process(one_process, four_ranks):
    assert_same_run(four_ranks, one_process, 4)


def test_run_sh_on_two_nodes_writes_one_log_equal_to_the_four_rank_run(data_dir, tmp_path, four_ranks):
    """./run.sh started twice with NNODES=2 (node ranks 0 and 1, 2 ranks each: RUN_SH_NGPU=2 stands
    in for the GPUs, the ranks train on the CPU with gloo), rendezvous on localhost. Same world size
    and ranks as the single-node 4-rank run: the same arithmetic, the same val losses exactly."""
    env = clean_env(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RUN_SH_NGPU="2",
                    PYTHON=sys.executable)
    cmd = ["bash", os.path.join(ROOT, "run.sh"), *ARGS, "--data-dir", data_dir, "--records-dir", str(tmp_path)]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(env, NODE_RANK=str(rank))) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, out[-3000:]
        assert f"run.sh: node {rank} of 2: 2 GPU(s) here, world size 4" in out
    log = the_log(tmp_path)
    assert "world_size 4" in log and "grad_accum_steps 2" in log
    assert val_losses(log) == val_losses(four_ranks) and len(val_losses(log)) == 3


# --- the GPU preflight's logic ---

def test_gpu_check_script_smoke_on_cpu(tmp_path):
    """tools/gpu_check.sh end to end on the CPU with the tiny preset (no tests, 4 steps): every
    step runs, and the verdict line has the numbers a GPU node's would have."""
    env = clean_env(PRESET="tiny", VOCAB="1024", SHARD_TOKENS="60000", VAL_TOKENS="4096", PYTEST="0",
                    DATA=str(tmp_path / "data"), TRAIN_FLAGS="--n-layer 1 --d-model 64 --head-dim 16")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(out), "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdict = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"gpu_check: PASS \| no CUDA \| tests: cpu not run, cuda not run \| tiny preset: "
                        r"4 steps, step \d+ ms, compile\+first step \d+\.\d s \(compile ~-?\d+\.\d s\), "
                        r"peak n/a \(no CUDA\), run \d+ s \| total \d+ s", verdict), verdict
    assert (out / "verdict.txt").read_text().strip() == verdict
    for name in ("record_run.txt", "torchrun.txt"):
        assert (out / name).read_text().endswith("exit 0\n"), name
    assert len(glob.glob(str(out / "records" / "*" / "*.txt"))) == 2  # the run's log and torchrun's
