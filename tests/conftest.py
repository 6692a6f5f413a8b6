"""Shared test helpers. Test modules import the plain functions with `from conftest import ...`
(pytest puts tests/ on sys.path); `data_dir` is a fixture available to every test module."""
import math
import os
import socket
import sys

import pytest
import torch

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


def row_leverage(U):
    """||U_i||^2 relative to the uniform value cols/rows (1 everywhere = uniform)."""
    m, n = U.shape
    return U.float().square().sum(1) / (n / m)


def cv(r):
    """Coefficient of variation (std / mean)."""
    return (r.std() / r.mean()).item()


def rel_diff(a, b):
    """Frobenius norm of a - b relative to b's (float64, so the measure itself adds no rounding)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def reference_update(G, M, W, dtype, rule="aurora", aurora_on="nonsquare", momentum=0.95,
                     nesterov=True, contra=0.4, floor=0.35, polar_fn=None):
    """The record's per-matrix rule for one matrix (float32; float64 works too), written out step by step from the spec
    and independently of aurora.py except for the Newton-Schulz iteration itself (`polar_fn`,
    default aurora.polar), which runs in `dtype`. Returns (U, new momentum); the step is W - lr U."""
    if polar_fn is None:
        from aurora import polar as polar_fn
    # 1. momentum, then the Nesterov look-ahead (torch.lerp: a + t (b - a), with lerp's rounding)
    M = torch.lerp(M, G, 1 - momentum)
    u = torch.lerp(G, M, momentum) if nesterov else M
    rows, cols = u.shape
    # 2. contra direction: u over its spectral norm, from 5 power iterations on u^T u
    v = torch.ones(cols, 1, dtype=u.dtype, device=u.device) / math.sqrt(cols)
    for _ in range(5):
        v = u.T @ (u @ v)
        v = v / v.norm()
    c = u / (u @ v).norm()
    # 3. orthogonalize: Aurora's leverage-uniform polar (2 iterations, beta 0.5) on non-square
    #    matrices (on tall ones only with aurora_on="tall"), plain polar otherwise. Polar of a
    #    square matrix already has uniform rows, so Aurora is exactly Muon there.
    if rule == "muon" or rows == cols or (aurora_on == "tall" and rows < cols):
        U = polar_fn(u, dtype=dtype).to(u.dtype)
    else:
        T = u if rows > cols else u.T  # the tall orientation
        m, n = T.shape
        D = 1 / T.norm(dim=1, keepdim=True).clamp_min(1e-7)  # start from row-normalized u
        U = polar_fn(D * T, dtype=dtype).to(u.dtype)
        D = D * ((n / m) / U.square().sum(1, keepdim=True).clamp_min(1e-14)) ** 0.5
        U = polar_fn(D * T, dtype=dtype).to(u.dtype)
        U = U if rows > cols else U.T
    # 4. contra-Muon: subtract contra/2 of c, then restore U's Frobenius norm
    if contra:
        f = U.norm()
        U = U - contra / 2 * c
        U = U * (f / U.norm())
    # 5. aspect scale of tall matrices
    U = U * math.sqrt(max(1, rows / cols))
    # 6. update/weight floor
    ratio = U.norm().clamp_min(1e-8) / W.norm().clamp_min(1e-8)
    if floor and ratio < floor:
        U = U * (floor / ratio)
    return U, M


def free_port():
    """A TCP port free on this machine now (for a test's own process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
