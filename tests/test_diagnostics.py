"""The trainer's neuron-health diagnostics and the ablation tool. (The optimizer's variants,
NorMuon, aurora_on=tall, cans12 and the leverage diagnostics, are tested in test_aurora.py; the
leverage of the frontier's matrix rule here.)"""
import glob
import io
import json
import math
import os
import re

import pytest
import torch

import train_gpt
from aurora import Aurora
from diagnostics import LeverageProbe, NeuronHealth, row_leverage, summary_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, data_dir, records):
    return train_gpt.main(["--preset", "tiny", "--data-dir", data_dir, "--records-dir", str(records)] + args)


def cv(r):
    return (r.std() / r.mean()).item()


class GivenLeverage:
    """Stands in for a LeverageProbe: hands a fixed leverage once, as pop_leverage() does."""

    def __init__(self, leverage):
        self.leverage, self.tracking = leverage, False

    def track_leverage(self):
        self.tracking = True

    def pop_leverage(self):
        leverage, self.leverage = self.leverage, {}
        return leverage


def probe(model, optimizer, tokens, hp=None, jsonl=None):
    hp = hp or train_gpt.Hyperparameters(**train_gpt.PRESETS["tiny"])
    ctx = train_gpt.Context(0, 1, torch.device("cpu"), 16, 1)
    return NeuronHealth(model, optimizer, tokens, hp, ctx, jsonl)


def test_neuron_health_on_a_hand_built_layer():
    hp = train_gpt.Hyperparameters(**train_gpt.PRESETS["tiny"])
    torch.manual_seed(0)
    model = train_gpt.GPT(hp, torch.float32)
    model.init_weights(hp.init_var)
    fc = model.blocks[0].mlp.fc
    hidden = fc.weight.size(0)
    with torch.no_grad():
        fc.bias[:hidden // 4] = -1e4         # a quarter of layer 0's neurons can never fire
        fc.bias[hidden // 4:] = 1e4          # the rest always fire
    lev = torch.ones(hidden)
    lev[:hidden // 8] = 0.05                 # an eighth of the rows starved
    given = GivenLeverage({fc.weight: lev})
    tokens = torch.randint(0, hp.vocab_size, (2 * 16, 128))
    health = probe(model, given, tokens, hp)
    rows = health.measure()
    layer0 = rows[0]
    assert layer0["tokens"] == 2 * 16 * 128
    assert layer0["dead"] == 0.25
    assert layer0["starved"] == 0.125 and math.isclose(layer0["leverage_min"], 0.05, rel_tol=1e-6)
    assert math.isclose(layer0["leverage_cv"], cv(lev), rel_tol=1e-5)
    assert layer0["frozen"] is None  # nothing moved yet: no median movement to compare with
    assert rows[1]["leverage_cv"] is None and not given.leverage  # consumed; layer 1 had none
    with torch.no_grad():
        fc.weight[:hidden * 3 // 4] += 1.0   # three quarters of the rows moved by sqrt(192) ...
        fc.weight[hidden * 3 // 4:hidden * 3 // 4 + 10] += 0.01  # ... 10 rows barely
    assert health.measure()[0]["frozen"] == 0.25  # the unmoved quarter, the 10 barely-moved among them


@pytest.mark.parametrize("rule", ["aurora", "muon"])
def test_leverage_is_asked_for_before_the_step_a_validation_reports(rule):
    """Skewed gradients (a quarter of the rows 100x larger, as a few hot neurons give): plain
    polar starves the small rows, Aurora's leverage stays near uniform. The probe must see the
    difference, from the step before the validation only."""
    hp = train_gpt.Hyperparameters(**train_gpt.PRESETS["tiny"])
    model = train_gpt.GPT(hp, torch.float32)
    matrices = [b.mlp.fc.weight for b in model.blocks]
    aurora = Aurora(matrices, lr=0.1, rule=rule)
    leverage = LeverageProbe(aurora)
    health = probe(model, leverage, torch.zeros(16, 128, dtype=torch.long), hp, io.StringIO())
    gen = torch.Generator().manual_seed(0)

    def step(next_step_validates):
        health.before_step(next_step_validates)
        for p in matrices:
            scale = torch.ones(p.size(0), 1)
            scale[torch.randperm(p.size(0), generator=gen)[:p.size(0) // 4]] = 100.0
            p.grad = torch.randn(p.shape, generator=gen) * scale
        aurora.step()

    step(False)
    assert leverage.pop_leverage() == {}  # not asked for: not kept
    step(True)
    rows = health.measure()  # the tracked step's leverage reached the probe
    lev_cv = [r["leverage_cv"] for r in rows]
    starved = [r["starved"] for r in rows]
    print(f"{rule}: leverage cv {[round(c, 3) for c in lev_cv]}, starved {starved}")
    if rule == "aurora":  # measured cv 0.011-0.012, nothing starved
        assert max(lev_cv) < 0.1 and max(starved) == 0
    else:  # measured cv 1.20-1.24, starved 0.54-0.57 (rows small in both steps' gradients)
        assert min(lev_cv) > 0.6 and min(starved) > 0.4


def test_diagnostics_off_do_nothing():
    hp = train_gpt.Hyperparameters(**{**train_gpt.PRESETS["tiny"], "diagnostics": False})
    model = train_gpt.GPT(hp, torch.float32)
    given = GivenLeverage({})
    health = probe(model, given, None, hp)
    health.before_step(True)
    lines = []
    health.report(0, 0, lines.append)
    assert not given.tracking and lines == []


def test_summary_line_means_over_layers():
    rows = [dict(dead=0.0, starved=0.5, leverage_cv=0.1, leverage_min=0.2, frozen=None),
            dict(dead=1.0, starved=None, leverage_cv=0.3, leverage_min=0.4, frozen=None)]
    assert summary_line(rows) == ("diagnostics: dead:0.5000 starved:0.5000 leverage_cv:0.2000 "
                                  "leverage_min:0.3000 frozen:nan (mean over 2 MLP layers)")


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
    tokens = torch.randint(0, hp.vocab_size, (4 * 16, 128))
    pre = []
    hooks = [b.mlp.fc.register_forward_hook(lambda m, a, out: pre.append(out.detach().clone()) and None)
             for b in model.blocks]
    with torch.no_grad():
        reference_out = model.trunk(tokens[:16])
        pre.clear()
        for xm in tokens.split(16):
            model.trunk(xm)
    for h in hooks:
        h.remove()
    rows = probe(model, GivenLeverage({}), tokens, hp).measure()
    n_layer = len(model.blocks)
    for layer in range(n_layer):
        acts = torch.cat([pre[k * n_layer + layer].flatten(0, 1) for k in range(4)])
        direct = ((acts > 0).sum(0) < 0.001 * acts.size(0)).float().mean().item()
        assert rows[layer]["dead"] == direct, (layer, rows[layer]["dead"], direct)
    with torch.no_grad():  # and the model computes the same thing after the diagnostics
        assert torch.equal(model.trunk(tokens[:16]), reference_out)


def test_training_writes_diagnostics_jsonl_and_log_line(data_dir, tmp_path):
    assert run(["--train-steps", "12", "--run-name", "diag", "--rule", "normuon", "--d-model", "64", "--head-dim",
                "16", "--val-tokens", "4096", "--diag-tokens", "4096"], data_dir, tmp_path) == 0
    record_dir = glob.glob(str(tmp_path / "*_diag"))[0]
    log = glob.glob(os.path.join(record_dir, "*.txt"))[0]
    rows = [json.loads(line) for line in open(os.path.splitext(log)[0] + ".jsonl")]
    assert [(r["step"], r["layer"]) for r in rows] == [(s, layer) for s in (0, 12) for layer in range(4)]
    last = rows[-1]
    assert set(last) >= {"trial", "step", "layer", "dead", "leverage_cv", "leverage_min", "starved", "frozen"}
    assert last["leverage_cv"] is not None
    assert rows[0]["leverage_cv"] is None  # step 0: no update yet
    text = open(log).read()
    # the log line is the mean over layers of the file's rows, at every validation
    lines = [line for line in text.splitlines() if line.startswith("diagnostics: dead:")]
    assert lines == [summary_line([r for r in rows if r["step"] == s]) for s in (0, 12)]
    assert 'rule: "normuon"' in text and 'aurora_on: "nonsquare"' in text and 'ns_iteration: "quintic12"' in text
    assert "\ndiagnostics: dead:" in text


def test_ablation_tool_refuses_a_folder_that_is_not_empty(tmp_path):
    """(tools/ablate.py end to end, with its table and figures: tests/test_bench.py's smoke run of
    tools/gpu_ablation.sh.)"""
    from tools import ablate
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "ablation.md").write_text("an earlier ablation")
    with pytest.raises(SystemExit, match="not empty"):
        ablate.main(["--out", str(tmp_path / "abl")])
    assert os.listdir(tmp_path / "abl") == ["ablation.md"]


@pytest.mark.parametrize("rule", ["aurora", "muon"])
def test_a_zero_fc_update_is_not_reported_as_starved(rule):
    """At the first steps mlp.proj is still zero, so no gradient reaches fc and its update is zero:
    every row's leverage is 0, which is no direction at all, not one that starves every row."""
    hp = train_gpt.Hyperparameters(**train_gpt.PRESETS["tiny"])
    model = train_gpt.GPT(hp, torch.float32)
    matrices = [b.mlp.fc.weight for b in model.blocks]
    aurora = Aurora(matrices, lr=0.1, rule=rule)
    health = probe(model, LeverageProbe(aurora), torch.zeros(16, 128, dtype=torch.long), hp, io.StringIO())
    health.before_step(True)
    for p in matrices:
        p.grad = torch.zeros_like(p)
    aurora.step()
    rows = health.measure()
    assert [(r["starved"], r["leverage_cv"], r["leverage_min"]) for r in rows] == [(None, None, None)] * len(rows)
    assert "starved:nan leverage_cv:nan leverage_min:nan" in summary_line(rows)


# --- the frontier's matrix rule (frontier.py's FrontierAurora) ---

FRONTIER_TINY = ["--n-layer", "1", "--d-model", "64", "--head-dim", "16", "--val-tokens", "4096", "--seed", "0"]


@pytest.mark.parametrize("preset", ["soap_2690", "soap_2690+aurora_nonsquare"])
def test_the_probe_measures_the_frontiers_orthogonalized_updates(preset, monkeypatch):
    """The probe keeps each look-ahead FrontierAurora orthogonalizes (after SOAP and the trust
    gate) and measures the row leverage of its polar factor: the very factor the step used, before
    the aspect scale sqrt(rows/cols) of tall matrices (2 here, a power of two: exact), for every
    hidden matrix; nothing on a step not asked for."""
    import frontier
    hp, _ = train_gpt.parse_args(["--preset", preset + "+tiny", *FRONTIER_TINY])
    model = train_gpt.GPT(hp, torch.float32)
    _, aurora = train_gpt.build_optimizers(model, hp, torch.device("cpu"))
    assert type(aurora) is frontier.FrontierAurora
    probe_ = LeverageProbe(aurora)
    used, orthogonalize = [], frontier.frontier_orthogonalize

    def seen(u, dtype, rule):  # the factors the step uses, in the order it updates the matrices
        O = orthogonalize(u, dtype, rule)
        used.append(O.clone() / max(1, u.shape[0] / u.shape[1]) ** 0.5)
        return O
    monkeypatch.setattr(frontier, "frontier_orthogonalize", seen)
    gen = torch.Generator().manual_seed(0)
    matrices = aurora.param_groups[0]["params"]
    with torch.no_grad():
        for p in matrices:
            p.normal_(0, 0.05, generator=gen)
    for step in range(3):
        used.clear()
        if step == 2:
            probe_.track_leverage()
        for p in matrices:
            p.grad = torch.randn(p.shape, generator=gen)
        aurora.step()
        leverage = probe_.pop_leverage()
        assert (leverage == {}) == (step < 2)
    order = aurora._record_order(matrices)  # (one rank: every matrix, in this order)
    assert len(used) == len(order) == 6 and sorted(map(id, leverage)) == sorted(map(id, matrices))
    for p, O in zip(order, used):
        assert torch.equal(leverage[p], row_leverage(O)), p.shape
        assert abs(leverage[p].mean().item() - 1) < 1e-3  # orthogonal: the leverage averages 1
    if preset.endswith("aurora_nonsquare"):  # Aurora's polar on the MLP's: near uniform
        assert max(cv(leverage[p]) for p in matrices if p.shape[0] != p.shape[1]) < 0.1


def test_a_frontier_run_reports_its_leverage_and_trains_alike_without_diagnostics(data_dir, tmp_path, monkeypatch):
    """soap_2690 over 4 tiny steps (validations at 2 and 4): the diagnostics line at step 4 has a
    measured leverage, not nan; at step 2 it is not measured, as the fc update of step 1 was zero
    (the head is zero at step 0, so no gradient reaches the trunk; mlp.proj is zero at step 1, so
    none reaches fc). With diagnostics off: the same val losses and val_ema_losses and the same
    final weights, bit for bit."""
    from test_train import keeping_final_weights
    finals, logs = keeping_final_weights(monkeypatch), []
    for flags in (["--diagnostics", "--diag-tokens", "4096"], ["--no-diagnostics"]):
        records = tmp_path / flags[0][2:]
        assert train_gpt.main(["--preset", "soap_2690+tiny", "--data-dir", data_dir, "--records-dir", str(records),
                               "--train-steps", "4", "--val-every", "2", "--val-every-late", "2", *FRONTIER_TINY,
                               *flags]) == 0
        logs.append(open(glob.glob(str(records / "*" / "*.txt"))[0]).read())
    lines = [line for line in logs[0].splitlines() if line.startswith("diagnostics: dead:")]
    assert len(lines) == 2 and "starved:nan leverage_cv:nan leverage_min:nan" in lines[0], lines
    assert not re.search(r"(starved|leverage_cv|leverage_min):nan", lines[1]), lines
    assert "\ndiagnostics: dead:" not in logs[1]
    val = [[line.split(" train_time:")[0] for line in log.splitlines() if line.startswith("step:") and " val_loss:" in line]
           for log in logs]
    assert val[0] == val[1] and len(val[0]) == 2 and "val_ema_loss:" in val[0][-1], val
    assert list(finals[0]) == list(finals[1])
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name
