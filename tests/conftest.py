"""Shared test helpers. Test modules import the plain functions with `from conftest import ...`
(pytest puts tests/ on sys.path); `data_dir` is a fixture available to every test module."""
import contextlib
import math
import os
import signal
import socket
import sys

# One OpenMP thread per process, for this process and every process a test starts (set before
# torch is imported; OMP_NUM_THREADS=N in the environment overrides it). The tests' models are
# tiny and gain nothing from threads, and on a 2-core machine with anything else running,
# OpenMP's spin-waiting threads make each step 10-30x slower. Results do not depend on it: every
# comparison is between runs under the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# Make the repository root importable (train_gpt, aurora, data.*, tools.*) whatever pytest's cwd.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Small synthetic shards (data/synthetic.py), written once per test session."""
    from data.synthetic import main as synthetic_main
    out = tmp_path_factory.mktemp("synthetic")
    synthetic_main(["--out", str(out), "--train-shards", "2", "--shard-tokens", "120000",
                    "--val-tokens", "40000"])
    return str(out)


@pytest.fixture
def one_thread():
    """One intra-op thread (as in the gloo workers and the subprocesses), restored afterwards:
    runs compared with each other round alike, and small matrices gain nothing from threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matrix(m, n, seed, cond=10.0, skew_rows=False):
    """A random float32 m x n matrix with singular values spread over [1/cond, 1] (well-posed for
    Newton-Schulz); skew_rows makes some rows much larger than others, like a real gradient."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.logspace(0, -math.log10(cond), k)
    A = U @ torch.diag(s) @ V.T
    if skew_rows:
        A = A * torch.logspace(-1, 1, m)[torch.randperm(m, generator=g)][:, None]
    return A


# Gradient scales at which the rules are checked against their written-out references: order 1
# (where no floor acts), training's (entries ~1e-6: the Newton-Schulz eps and SOAP's eps
# act), and far below (the 1e-10 and 1e-8 clamps of the norms and the u/w floor act).
GRADIENT_SCALES = {"unit": 1.0, "training": 1e-6, "tiny": 1e-12, "clamps": 1e-20}


def training_gradient(shape, seed, scale):
    """A gradient as training gives a matrix, `scale` per entry: rank 2 plus noise, its rows spread
    over ten orders of magnitude (starved neurons), one row exactly zero (a dead neuron)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    G = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) + 0.1 * torch.randn(m, n, generator=g)
    G = G * torch.logspace(0, -10, m)[torch.randperm(m, generator=g)][:, None]
    G[torch.randint(m, (1,), generator=g)] = 0
    return G * scale


def cv(r):
    """Coefficient of variation (std / mean)."""
    return (r.std() / r.mean()).item()


def rel_diff(a, b):
    """Frobenius norm of a - b relative to b's (float64, so the measure itself adds no rounding)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def reference_polar(G, dtype, scale=None):
    """The spec's polar(G), written out here independently of aurora.py: 12 simple-quintic
    Newton-Schulz steps in `dtype` on the wide orientation, X = G / (||G||_F + 1e-7) (or
    X / scale(X): the lineage's Schatten-4 estimate), then A = X X^T, B = -1.5 A + 0.5 A A,
    X = 2 X + B X (0.5 A A evaluated as (0.5 A) A, the order the record's `c * A @ A` has)."""
    X = G.to(dtype)
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7) if scale is None else X / scale(X)
    for _ in range(12):
        A = X @ X.T
        B = -1.5 * A + (0.5 * A) @ A
        X = 2 * X + B @ X
    return X.T if tall else X


def reference_update(G, M, W, dtype, rule="aurora", aurora_on="nonsquare", momentum=0.95,
                     nesterov=True, contra=0.4, floor=0.35, polar_fn=reference_polar):
    """The record's per-matrix rule for one float32 matrix, written out step by step from the spec
    (record-3175.md, with its bit-level details: the operations, their order and dtypes),
    independently of aurora.py. Newton-Schulz runs in `dtype`. Returns (U, new momentum); the
    step is W.add_(U, alpha=-lr)."""
    # 1. momentum, then the Nesterov look-ahead (torch.lerp: a + t (b - a), with lerp's rounding)
    M = torch.lerp(M, G, 1 - momentum)
    u = torch.lerp(G, M, momentum) if nesterov else M
    rows, cols = u.shape
    # 2. contra direction: u over its spectral norm, from 5 power iterations (matrix-vector
    #    products, u and v normalized, clamps 1e-10) from the normalized all-ones vector
    X = u.float()
    v = torch.ones(cols)
    v = v / v.norm().clamp(min=1e-10)
    for _ in range(5):
        w = X @ v
        w = w / w.norm().clamp(min=1e-10)
        v = X.T @ w
        v = v / v.norm().clamp(min=1e-10)
    c = X / (X @ v).norm().clamp(min=1e-10)
    # 3. orthogonalize: Aurora's leverage-uniform polar (2 iterations, beta 0.5) on non-square
    #    matrices (on tall ones only with aurora_on="tall"), plain polar otherwise; the result is
    #    the last Newton-Schulz output, in `dtype`
    if rule == "muon" or rows == cols or (aurora_on == "tall" and rows < cols):
        U = polar_fn(u, dtype)
    else:
        T = (u if rows > cols else u.T).float()  # the tall orientation, m x n
        m, n = T.shape
        D = 1.0 / T.norm(dim=1, keepdim=True).clamp(min=1e-7)  # start from row-normalized u
        U = polar_fn(D * T, dtype)
        D = D * ((n / m) / U.float().pow(2).sum(1, keepdim=True).clamp(min=1e-14)).pow(0.5)
        U = polar_fn(D * T, dtype)
        U = U if rows > cols else U.T
    # 4. contra-Muon: f = ||U|| of U as it is (bf16 in the record); U - 0.2 c promotes to float32;
    #    then (U * f) / ||U||
    if contra:
        f = U.norm()
        U = U - contra / 2 * c
        U = U * f / U.norm().clamp(min=1e-10)
    else:
        U = U.float()
    # 5. aspect scale of tall matrices
    U = U * max(1, rows / cols) ** 0.5
    # 6. update/weight floor: float32 norms, each clamped at 1e-8
    w_fro, u_fro = W.float().norm().clamp(min=1e-8), U.float().norm().clamp(min=1e-8)
    if floor and u_fro / w_fro < floor:
        U = U * (floor * w_fro / u_fro)
    return U, M


def free_port():
    """A TCP port free on this machine now (for a test's own process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank, world, port):
    """A spawned test process as gloo rank `rank` of `world`. On success it waits for its peers,
    then exits at once: gloo's teardown (the process group's destructor, or C++ statics at
    interpreter exit) can abort a rank with "terminate called without an active exception" after
    its results are written (a barrier before destroy_process_group still let a CI run abort).
    os._exit skips that teardown; the results are files the rank has already closed. A failure
    tears down normally and raises, so the spawn reports it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    exit_now()


def exit_now():
    """End a spawned test process with status 0 without interpreter or C++ teardown (see gloo_rank)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def sigterm_during(monkeypatch, step):
    """SIGTERM to this process in the middle of training step `step` (1-based), as `kill <pid>`
    sends it: with --save-every the stop waits for the step's end (checkpoint, then stop)."""
    import train_gpt
    train_step = train_gpt.train_step

    def sends_sigterm(run_, optimizers, index):
        if index + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(run_, optimizers, index)
    monkeypatch.setattr(train_gpt, "train_step", sends_sigterm)


# The order in which the test runner deals whole files to its workers (`-n auto --dist loadfile`):
# longest first, so that the last file to start is a short one and both workers end together.
# Measured with an empty inductor cache on 2 cores (records/2026-12-01_suite_time_2core): the
# compiled run waits ~2 minutes for inductor's C++ kernels, the checkpoint and gloo-rank files
# start many processes. Any other file follows in name order.
LONGEST_FIRST = ("test_compiled.py", "test_checkpoint.py", "test_distributed.py", "test_run_sh.py",
                 "test_train.py", "test_bench.py", "test_aurora.py", "test_lineage.py")


def pytest_configure(config):
    # pytest-xdist deals files with the most tests first unless told to keep the collection order
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: each file's tests keep their order
