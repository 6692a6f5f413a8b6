"""The compiled paths a GPU node takes, on the CPU: the compiled model and per-matrix update in a
whole run (inductor's C++ kernels), and Dynamo's compilations at the record's matrix shapes against
its recompile limit. (A file of their own: compiling from an empty inductor cache is the suite's
longest single wait, and the test runner can then schedule it beside the gloo runs.)"""
import subprocess
import sys

import pytest
import torch

import aurora
import train_gpt
from aurora import Aurora
from diagnostics import LeverageProbe
from harness import owners
from test_distributed import TRAIN_GPT, clean_env, the_log, val_losses

# One block of width 64: a tall, a wide and square matrices (Aurora's three compiled graphs); 2
# steps, validated at 0, 1 and 2 (the model's training and validation graphs); diagnostics on.
ARGS = ["--preset", "tiny", "--n-layer", "1", "--d-model", "64", "--head-dim", "16", "--train-steps", "2",
        "--val-every", "1", "--val-every-late", "1", "--val-tokens", "4096", "--seed", "3"]


def test_compiled_model_and_update_train_a_tiny_run_to_the_end(data_dir, tmp_path):
    """--compile on: the model (torch.compile, inductor's CPU backend, training and validation
    graphs) and Aurora's per-matrix update (tall, wide and square graphs) compiled, a whole run,
    in a fresh process as on a GPU node. The compiled arithmetic is fused and reordered: the val
    losses match the eager run's (here, in this process) up to rounding (bound 1e-4)."""
    proc = subprocess.run([sys.executable, TRAIN_GPT, *ARGS, "--compile", "on", "--data-dir", data_dir,
                           "--records-dir", str(tmp_path / "compiled")],
                          capture_output=True, text=True, timeout=600, env=clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert train_gpt.main(ARGS + ["--data-dir", data_dir, "--records-dir", str(tmp_path / "eager")]) == 0
    log, eager_log = the_log(tmp_path / "compiled"), the_log(tmp_path / "eager")
    got, expected = val_losses(log), val_losses(eager_log)
    assert "compile_used True" in log and "compile_used False" in eager_log
    assert [s for s, _ in got] == [s for s, _ in expected] == [0, 1, 2]
    for (_, a), (_, b) in zip(got, expected):
        assert abs(float(a) - float(b)) <= 1e-4, (got, expected)


RECORD_SHAPES = [(3072, 768)] * 12 + [(768, 3072)] * 12 + [(768, 768)] * 48  # the 72 block matrices
RECOMPILE_MARGIN = 3  # room left below Dynamo's limit


def aurora_trial(shapes, steps, device="meta"):
    """A trial of the record's Aurora (per-matrix, compiled) on matrices of `shapes`: `steps` steps,
    the last one tracking leverage as a diagnostics step does. Returns the leverage probe."""
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    opt = Aurora(params, lr=0.05, ns_dtype="float32", compile=True)
    probe = LeverageProbe(opt)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device=device)
        if step == steps - 1:
            probe.track_leverage()
        opt.step()
    return probe


@pytest.fixture
def traced_compile():
    """aurora's compiled wrapper traced with aot_eager (Dynamo's compilations and recompiles are
    inductor's; no kernels are generated), Dynamo's caches and counters emptied before and after."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    aurora.COMPILE_BACKEND = "aot_eager"
    aurora._COMPILED.clear()
    yield counters
    aurora.COMPILE_BACKEND = "inductor"
    aurora._COMPILED.clear()
    torch._dynamo.reset()
    counters.clear()


def test_record_shapes_compile_three_graphs_far_below_the_recompile_limit(traced_compile):
    """Dynamo's compilations of the per-matrix update over a record trial: the 72 matrices in the
    record's order, two steps, the second a diagnostics step (track_leverage adds no compiled
    variant; pop_leverage computes eagerly). A fallback to eager at the recompile limit in the
    middle of a record run would change its numbers and speed silently. 3 graphs: tall (static),
    wide (recompiled with dynamic sizes), square (another branch); then nothing, for any number
    of matrices of those shapes, and nothing for the next trial's new optimizer. The matrices are
    on the meta device: shapes, dtypes and guards as on the CPU, without the arithmetic (float32
    Newton-Schulz on 72 record-sized matrices would take minutes here); the count is the same
    with inductor, which only turns the same graphs into kernels."""
    counters = traced_compile
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    aurora_trial(RECORD_SHAPES, steps=1)  # step 0 of a record trial is a diagnostics step
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3 and graphs <= limit - RECOMPILE_MARGIN, (graphs, limit)
    # the next trial (a new Aurora): a plain step, then a diagnostics step, then pop_leverage
    # (eager); one matrix of each shape, as every shape hits the same cached graph
    probe = aurora_trial([(3072, 768), (768, 3072), (768, 768)], steps=2)
    assert len(probe.pop_leverage()) == 3
    assert counters["stats"]["unique_graphs"] == 3
    # 8 ranks: each rank updates its share (matrix j of the record's order on rank j % 8) and
    # visits the shape classes in world 1's order (tall, wide, square), so it compiles the same
    # 3 graphs, once each.
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in RECORD_SHAPES]
    opt = Aurora(params, lr=0.05)
    owner = {id(p): r for p, r in zip(params, owners(opt, opt.param_groups[0], 8))}
    order = Aurora._record_order(params)
    for rank in range(8):
        mine = [tuple(p.shape) for p in order if owner[id(p)] == rank]
        classes = [s for i, s in enumerate(mine) if s not in mine[:i]]
        assert classes == [(3072, 768), (768, 3072), (768, 768)], (rank, mine)


