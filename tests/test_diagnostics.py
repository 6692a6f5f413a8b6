"""Issue 4: NorMuon and the Aurora variants, neuron-health diagnostics, the ablation tool."""
import glob
import json
import math
import os

import pytest
import torch

import train_gpt
from aurora import Aurora, aurora_polar, aurora_update, orthogonalize, polar, polar_cans12
from test_aurora import matrix
from test_train import data_dir, run  # noqa: F401  (module fixture: small synthetic shards)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cv(r):
    return (r.std() / r.mean()).item()


@pytest.mark.parametrize("fn", [polar, polar_cans12])
@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (96, 96)])
def test_both_polar_iterations_give_singular_values_near_one(fn, shape):
    s = torch.linalg.svdvals(fn(matrix(*shape, seed=0)).float())
    assert s.min() > 0.9 and s.max() < 1.1, s


def test_cans12_runs_in_float32():
    assert polar_cans12(matrix(64, 32, seed=1)).dtype == torch.float32


def test_normuon_update_matches_the_formula():
    u = matrix(48, 16, seed=2, skew_rows=True)
    v = torch.full((48, 1), 0.01)
    O = polar(u).float()
    v_new = 0.95 * 0.01 + 0.05 * O.square().mean(dim=1, keepdim=True)
    N = O / (v_new.sqrt() + 1e-10)
    expected = N * O.norm() / N.norm()
    got = orthogonalize(u, "normuon", row_v=v)
    torch.testing.assert_close(v, v_new)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert math.isclose(got.norm().item(), O.norm().item(), rel_tol=1e-5)


def test_normuon_optimizer_keeps_per_row_state():
    W = torch.nn.Parameter(torch.zeros(32, 8))
    W.grad = matrix(32, 8, seed=3)
    opt = Aurora([W], lr=0.1, rule="normuon")
    opt.step()
    assert opt.state[W]["row_v"].shape == (32, 1) and (opt.state[W]["row_v"] > 0).all()


def test_aurora_on_tall_leaves_wide_matrices_on_plain_polar():
    wide, tall = matrix(32, 128, seed=4, skew_rows=True), matrix(128, 32, seed=5, skew_rows=True)
    torch.testing.assert_close(orthogonalize(wide, "aurora", aurora_on="tall"), polar(wide).float())
    torch.testing.assert_close(orthogonalize(tall, "aurora", aurora_on="tall"), aurora_polar(tall))
    assert not torch.allclose(orthogonalize(wide, "aurora"), polar(wide).float(), atol=1e-3)


def test_leverage_of_aurora_updates_is_uniform_and_plain_polar_is_not():
    G = matrix(768, 192, seed=6, skew_rows=True)
    lev = []
    aurora_update(G, torch.zeros_like(G), torch.randn(768, 192), leverage=lev)
    assert cv(lev[0]) < 0.05
    lev_muon = []
    aurora_update(G, torch.zeros_like(G), torch.randn(768, 192), rule="muon", leverage=lev_muon)
    assert cv(lev_muon[0]) > 0.3
    assert abs(lev_muon[0].mean().item() - 1) < 0.02  # orthogonal: leverage averages to 1


def test_mlp_diagnostics_on_a_hand_built_layer():
    hp = train_gpt.Hyperparameters(**train_gpt.PRESETS["tiny"])
    torch.manual_seed(0)
    model = train_gpt.GPT(hp, torch.float32)
    fc = model.blocks[0].mlp.fc
    fc_init = [b.mlp.fc.weight.detach().clone() for b in model.blocks]
    hidden = fc.weight.size(0)
    with torch.no_grad():
        fc.bias[:hidden // 4] = -1e4         # a quarter of layer 0's neurons can never fire
        fc.bias[hidden // 4:] = 1e4          # the rest always fire
    opt = Aurora([b.mlp.fc.weight for b in model.blocks], lr=0.1)
    lev = torch.ones(hidden)
    lev[:hidden // 8] = 0.05                 # an eighth of the rows starved
    opt.leverage = {fc.weight: lev}
    x = torch.randint(0, hp.vocab_size, (2 * 16 * 128,))
    rows = train_gpt.mlp_diagnostics(model, fc_init, opt, x, hp, micro=16, world=1, rank=0)
    layer0 = rows[0]
    assert layer0["tokens"] == 2 * 16 * 128
    assert layer0["dead"] == 0.25
    assert layer0["starved"] == 0.125 and math.isclose(layer0["leverage_min"], 0.05, rel_tol=1e-6)
    assert math.isclose(layer0["leverage_cv"], cv(lev), rel_tol=1e-5)
    assert layer0["frozen"] is None  # nothing moved yet: no median movement to compare with
    assert rows[1]["leverage_cv"] is None and not opt.leverage  # consumed; layer 1 had none
    with torch.no_grad():
        fc.weight[:hidden * 3 // 4] += 1.0   # three quarters of the rows moved by sqrt(192) ...
        fc.weight[hidden * 3 // 4:hidden * 3 // 4 + 10] += 0.01  # ... 10 rows barely
    rows = train_gpt.mlp_diagnostics(model, fc_init, opt, x, hp, micro=16, world=1, rank=0)
    assert rows[0]["frozen"] == 0.25  # the unmoved quarter, the 10 barely-moved rows among them


def test_dead_fraction_matches_a_direct_count_in_every_layer():
    """The hooks must observe, not alter, the forward pass (deeper layers see true inputs)."""
    hp = train_gpt.Hyperparameters(**train_gpt.PRESETS["tiny"])
    torch.manual_seed(1)
    model = train_gpt.GPT(hp, torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.ndim == 2:
                p.normal_(0, 0.05)  # non-zero residual branches, so layers depend on each other
            if name.endswith("mlp.fc.bias"):
                p.normal_(-0.3, 0.5)  # some neurons nearly dead
    x = torch.randint(0, hp.vocab_size, (4 * 16 * 128,))
    pre = []
    hooks = [b.mlp.fc.register_forward_hook(lambda m, a, out: pre.append(out.detach().clone()) and None)
             for b in model.blocks]
    with torch.no_grad():
        reference_out = model.trunk(x.view(-1, 16, 128).flatten(0, 0)[0])
        pre.clear()
        for xm in x.view(-1, 16, 128):
            model.trunk(xm)
    for h in hooks:
        h.remove()
    opt = Aurora([b.mlp.fc.weight for b in model.blocks], lr=0.1)
    fc_init = [b.mlp.fc.weight.detach().clone() for b in model.blocks]
    rows = train_gpt.mlp_diagnostics(model, fc_init, opt, x, hp, micro=16, world=1, rank=0)
    n_layer = len(model.blocks)
    for layer in range(n_layer):
        acts = torch.cat([pre[k * n_layer + layer].flatten(0, 1) for k in range(4)])
        direct = ((acts > 0).sum(0) < 0.001 * acts.size(0)).float().mean().item()
        assert rows[layer]["dead"] == direct, (layer, rows[layer]["dead"], direct)
    with torch.no_grad():  # and the model computes the same thing after the diagnostics
        torch.testing.assert_close(model.trunk(x.view(-1, 16, 128)[0]), reference_out)


def test_training_writes_diagnostics_jsonl_and_log_line(data_dir, tmp_path):  # noqa: F811
    assert run(["--train-steps", "12", "--run-name", "diag", "--optimizer", "normuon"], data_dir, tmp_path) == 0
    record_dir = glob.glob(str(tmp_path / "*_diag"))[0]
    log = glob.glob(os.path.join(record_dir, "*.txt"))[0]
    rows = [json.loads(line) for line in open(os.path.splitext(log)[0] + ".jsonl")]
    assert [(r["step"], r["layer"]) for r in rows] == [(s, layer) for s in (0, 12) for layer in range(4)]
    last = rows[-1]
    assert set(last) >= {"trial", "step", "layer", "dead", "leverage_cv", "leverage_min", "starved", "frozen"}
    assert last["leverage_cv"] is not None and 0 <= last["dead"] <= 1
    text = open(log).read()
    assert "optimizer: normuon" in text and "aurora_on: nonsquare" in text and "polar: quintic12" in text
    assert "\ndiagnostics: dead:" in text


def test_bad_variant_flags():
    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--pp-iterations", "0"])
    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--pp-beta", "1.5"])
    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--polar", "cubic"])


def test_ablation_tool_end_to_end(data_dir, tmp_path):  # noqa: F811
    from tools import ablate
    out = tmp_path / "abl"
    ablate.main(["--train-steps", "6", "--data-dir", data_dir, "--out", str(out)])
    table = (out / "ablation.md").read_text()
    for name in ("muon", "normuon", "aurora"):
        assert f"| {name} | " in table
    for png in ("val_loss.png", "dead.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="not empty"):
        ablate.main(["--out", str(out)])
