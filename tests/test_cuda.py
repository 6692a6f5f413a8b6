"""CUDA-only checks (skipped without a GPU): bf16 numerics, torch.compile, NCCL. Run on a GPU
machine with `python3 -m pytest -q tests/test_cuda.py` (tools/gpu_check.sh runs the whole suite)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist

import train_gpt
from aurora import Aurora, aurora_polar, polar
from test_aurora import matrix, reference_update, row_leverage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_polar_on_cuda_is_orthogonal_and_close_to_cpu():
    G = matrix(3072, 768, seed=0, skew_rows=True)
    for fn in (polar, aurora_polar):
        gpu = fn(G.cuda()).float().cpu()
        s = torch.linalg.svdvals(gpu)
        assert s.min() > 0.9 and s.max() < 1.1
        assert (gpu - fn(G).float()).norm() / gpu.norm() < 0.05  # bf16 kernels differ in rounding
    lev = row_leverage(aurora_polar(G.cuda()).cpu())
    assert (lev.std() / lev.mean()) < 0.05


def test_aurora_step_on_cuda_matches_rule_written_out():
    torch.manual_seed(0)
    shapes = [(3072, 768), (768, 3072), (768, 768)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    Aurora(params, lr=0.0375).step()
    for p, w, g in zip(params, start, grads):
        U, _ = reference_update(g, torch.zeros_like(g), w)
        torch.testing.assert_close(p.detach(), w - 0.0375 * U, atol=1e-6, rtol=1e-5)


def test_compiled_model_matches_eager_on_cuda():
    hp = train_gpt.Hyperparameters(n_layer=2, vocab_size=50304)
    torch.manual_seed(0)
    model = train_gpt.GPT(hp, torch.bfloat16).cuda()
    with torch.no_grad():  # non-zero head and proj so the comparison means something
        for name, p in model.named_parameters():
            if "proj" in name:
                p.normal_(0, 0.02)
    x = torch.randint(0, 50257, (4, 1024), device="cuda")
    eager = model(x, x)
    compiled = torch.compile(model, dynamic=False)(x, x)
    assert torch.isfinite(compiled)
    assert abs(compiled.item() - eager.item()) / eager.item() < 2e-3


def test_nccl_one_rank_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        p = torch.nn.Parameter(torch.randn(256, 64, device="cuda"))
        p.grad = torch.randn(256, 64, device="cuda")
        before = p.detach().clone()
        Aurora([p], lr=0.1).step()
        assert torch.isfinite(p).all() and not torch.equal(p, before)
        t = torch.ones(3, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_batched_fast_path_matches_reference_on_cuda():
    torch.manual_seed(0)
    shapes = [(3072, 768)] * 4 + [(768, 3072)] * 4 + [(768, 768)] * 8
    grads = [torch.randn(s, device="cuda") for s in shapes]
    updates = {}
    for batched in (False, True):
        params = [torch.nn.Parameter(torch.zeros(s, device="cuda")) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = Aurora(params, lr=1.0, uw_floor=0.0, batched=batched)
        opt.step()
        opt.check_finite()
        updates[batched] = [-p.detach() for p in params]
    for a, b in zip(updates[True], updates[False]):
        rel = ((a - b).norm() / b.norm()).item()
        print(f"{tuple(a.shape)} batched vs reference relative difference {rel:.2e}")
        assert rel < 1e-2  # same math; batched bf16 matmuls may round differently
