"""train_gpt.py: the record's configuration, init and forward at the bit level, end-to-end tiny
runs, one-file logs, record folders, failure modes, 2 gloo ranks."""
import ast
import dataclasses
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import harness
import train_gpt
from conftest import exit_now, free_port, sigterm_during
from data.shards import write_shard
from train_gpt import GPT, Hyperparameters, build_optimizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\d+\.\d{5}) train_time:\d+\.\d{3}s step_avg:(nan|\d+\.\d{2})ms$")
SEPARATOR = "=" * 100
SUBPROCESS_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH="")  # a fresh CPU process


def run(args, data_dir, records):
    return train_gpt.main(["--preset", "tiny", "--data-dir", data_dir, "--records-dir", str(records)]
                          + args)


def val_losses(log_text):
    return [(int(m.group(1)), float(m.group(3))) for m in map(VAL_LINE.match, log_text.splitlines()) if m]


def only_log(record_dir):
    logs = glob.glob(os.path.join(record_dir, "*.txt"))
    assert len(logs) == 1, logs
    return logs[0]


# The smallest run that still trains: 1 block of width 64, 6 steps, validations at 0, 3 and 6 on
# one batch of tokens.
SMALL = ["--n-layer", "1", "--d-model", "64", "--head-dim", "16", "--train-steps", "6", "--val-every", "3",
         "--val-every-late", "3", "--val-tokens", "4096"]


def tiny_hp(**overrides):
    return Hyperparameters(**{**train_gpt.PRESETS["tiny"], "preset": "tiny", **overrides})


# --- bit level: initialization, random stream, forward and gradients ---

def spec_parameter_order(n_layer):
    """named_parameters() order of the record's modules, written out from the spec."""
    names = ["embed.weight"]
    for i in range(n_layer):
        for lin in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj"):
            names += [f"blocks.{i}.{lin}.weight", f"blocks.{i}.{lin}.bias"]
        names += [f"blocks.{i}.norm1.gains", f"blocks.{i}.norm2.gains"]
    return names + ["proj.weight", "proj.bias", "norm1.gains", "norm2.gains"]


def spec_init(shapes_and_dtypes, init_var=0.33):
    """The spec's re-initialization, one call per parameter, from the current generator state."""
    out = {}
    for name, (shape, dtype) in shapes_and_dtypes.items():
        t = torch.empty(shape, dtype=dtype)
        if "proj" in name and name.endswith("weight"):
            t.zero_()
        elif name == "embed.weight":
            t.normal_()
        elif name.endswith("weight"):
            t.normal_(std=math.sqrt(init_var) / math.sqrt(shape[1]))
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.normal_(mean=1, std=0)  # gains: value 1, but it draws
        out[name] = t
    return out


def test_initial_weights_equal_the_spec_procedure_exactly():
    hp = tiny_hp()
    model = GPT(hp, torch.float32)
    params = dict(model.named_parameters())
    assert list(params) == spec_parameter_order(hp.n_layer)
    for seed in (0, 123):
        torch.manual_seed(seed)
        model.init_weights(hp.init_var)
        after_ours = torch.rand(3)  # the generator must end in the same state too
        torch.manual_seed(seed)
        expected = spec_init({n: (tuple(p.shape), p.dtype) for n, p in params.items()})
        assert torch.equal(torch.rand(3), after_ours)
        for name, p in params.items():
            assert p.dtype == expected[name].dtype and torch.equal(p.detach(), expected[name]), name
    assert params["embed.weight"].dtype == torch.bfloat16
    assert params["blocks.0.norm1.gains"].eq(1).all() and params["proj.weight"].eq(0).all()


def trial_losses(log_text):
    """{seed: val losses} of each trial of a log (seeds as logged)."""
    text = log_text.split(SEPARATOR)[-1]
    return {int(m.group(1)): val_losses(part) for m, part in
            zip(re.finditer(r"^trial:\d+ seed:(\S+)$", text, re.M), re.split(r"^trial:\d+ seed:\S+$", text, flags=re.M)[1:])}


def test_every_trial_has_an_int_seed_and_a_logged_seed_reruns_its_trial(data_dir, tmp_path):
    # unseeded: the process draws S from the OS entropy and logs it; trial i has seed S + i
    assert run(SMALL + ["--trials", "2", "--run-name", "drawn"], data_dir, tmp_path) == 0
    text = open(only_log(glob.glob(str(tmp_path / "*_drawn"))[0])).read()
    seed = int(re.search(r"^seed: (\d+)$", text, re.M).group(1))  # the header: the seed used
    assert re.search(rf"^seeds \[{seed}, {seed + 1}\] \(drawn from the OS entropy", text, re.M)
    drawn = trial_losses(text)
    assert list(drawn) == [seed, seed + 1] and drawn[seed] != drawn[seed + 1]
    # --seed <a trial's seed> runs that trial again (here trial 1, alone): the same val losses
    assert run(SMALL + ["--seed", str(seed + 1), "--run-name", "again"], data_dir, tmp_path) == 0
    again = trial_losses(open(only_log(glob.glob(str(tmp_path / "*_again"))[0])).read())
    assert again == {seed + 1: drawn[seed + 1]} and len(drawn[seed + 1]) == 3


def spec_loss(model, idx, targets, hp):
    """The forward pass written out from the spec with bfloat16 activations; the record's
    constants as literals (rope base 1024, attention scale 0.12, softcap 15), not the config's."""
    P, bf = dict(model.named_parameters()), torch.bfloat16
    B, T = idx.shape
    C, D = hp.d_model, hp.head_dim
    H = C // D

    def linear(x, name):  # every Linear has a bias; weights cast to the activation dtype
        return F.linear(x, P[name + ".weight"].to(bf), P[name + ".bias"].to(bf))

    def norm(x, name):
        return F.rms_norm(x, (C,), P[name + ".gains"].to(bf))

    freqs = torch.cat([(1 / 1024) ** torch.linspace(0, 1, D // 4), torch.zeros(D // 4)])
    angle = torch.arange(T, dtype=torch.float32)[:, None] * freqs
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]

    def rotary(t):  # in float32: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos
        x1, x2 = t.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).to(bf)

    x = norm(F.embedding(idx, P["embed.weight"]), "norm1")
    for i in range(hp.n_layer):
        b = f"blocks.{i}."
        h = norm(x, b + "norm1")
        q, k, v = (linear(h, b + "attn." + n).view(B, T, H, D) for n in "qkv")
        q, k = rotary(F.rms_norm(q, (D,))), rotary(F.rms_norm(k, (D,)))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=0.12)
        x = x + linear(y.transpose(1, 2).reshape(B, T, C), b + "attn.proj")
        x = x + linear(F.relu(linear(norm(x, b + "norm2"), b + "mlp.fc")).square(), b + "mlp.proj")
    logits = linear(norm(x, "norm2"), "proj").float()
    logits = 15 * logits * torch.rsqrt(logits.square() + 15 ** 2)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


def test_loss_and_gradients_equal_the_spec_forward_bit_for_bit_in_bfloat16():
    hp = tiny_hp(n_layer=2, d_model=64, head_dim=32, vocab_size=128)
    torch.manual_seed(0)
    model = GPT(hp, torch.bfloat16)
    with torch.no_grad():  # non-zero everywhere, so every parameter gets a gradient
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("gains") else 0.0, 0.02 if p.ndim == 1 else 0.1)
    idx = torch.randint(0, 128, (2, 32), dtype=torch.int32)  # inputs int32, targets int64
    targets = torch.randint(0, 128, (2, 32))
    grads = []
    for fn in (lambda: model(idx, targets), lambda: spec_loss(model, idx, targets, hp)):
        model.zero_grad()
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ours, ours_g), (spec, spec_g) = grads
    assert torch.equal(ours, spec)
    for name in ours_g:
        assert torch.equal(ours_g[name], spec_g[name]), name


def test_rotary_scores_depend_on_relative_position_only():
    rot = train_gpt.Rotary(head_dim=32, base=1024)
    q, k = torch.randn(1, 1, 1, 32).expand(1, 20, 1, 32), torch.randn(1, 1, 1, 32).expand(1, 20, 1, 32)
    rq, rk = rot(q)[0, :, 0], rot(k)[0, :, 0]
    scores = rq @ rk.T
    assert torch.allclose(scores[5, 2], scores[15, 12], atol=1e-5)
    assert torch.allclose(rq[:, 8:16], q[0, :, 0, 8:16])  # zero-frequency quarter is not rotated
    assert not torch.allclose(scores[5, 2], scores[5, 3], atol=1e-3)


def test_logits_are_soft_capped():
    model = GPT(tiny_hp(), torch.float32)
    with torch.no_grad():
        model.proj.weight.normal_(0, 100)
    logits = model.logits(torch.randint(0, 1024, (2, 16)))
    assert logits.abs().max() < 15 and logits.abs().max() > 14  # capped, and the cap is reached


def test_world_size_that_cannot_split_the_batch():
    with pytest.raises(ValueError, match="world size 3 cannot split"):
        train_gpt.micro_batch_plan(Hyperparameters(), 3)
    assert train_gpt.micro_batch_plan(Hyperparameters(), 1) == (64, 8)
    assert train_gpt.micro_batch_plan(Hyperparameters(), 8) == (64, 1)
    assert train_gpt.micro_batch_plan(Hyperparameters(), 16) == (32, 1)  # 2 nodes: micro-batch shrinks


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every matrix multiplication that runs."""
    OPS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "_scaled_dot_product_flash_attention_for_cpu"}

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in self.OPS:
            self.seen |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


def test_no_bfloat16_matmul_runs_on_the_cpu_path(data_dir):
    """A CPU without native bf16 runs bf16 matmuls hundreds of times slower: the CPU path must have none."""
    hp = tiny_hp(data_dir=data_dir, train_steps=2)
    for batched in (True, False):
        hp = Hyperparameters(**{**hp.__dict__, "aurora_batched": batched})
        ctx = train_gpt.Context(0, 1, torch.device("cpu"), *train_gpt.micro_batch_plan(hp, 1))
        model = GPT(hp, train_gpt.activation_dtype(ctx))
        model.init_weights(hp.init_var)
        loader = train_gpt.TokenLoader(train_gpt.find_shards(data_dir, "train"), hp.batch_tokens, ctx, hp.vocab_size)
        run_ = train_gpt.Run(hp, ctx, train_gpt.Logger(1), model, model, loader, None)
        optimizers = build_optimizers(model, hp, ctx.device)
        with MatmulDtypes() as spy:
            train_gpt.train_step(run_, optimizers, 0)
        assert torch.float32 in spy.seen and torch.bfloat16 not in spy.seen, spy.seen


def test_the_timed_steps_make_no_host_sync(data_dir, tmp_path, monkeypatch):
    """While the clock runs, nothing waits for the device, as in the record: no tensor is read by
    the host (.item(), .tolist(), .numpy(), .cpu(), bool(), float(), int()) and nothing calls
    torch.cuda.synchronize. The one read allowed is the train loss of the step before, once per
    step, from the host buffer its non-blocking copy went to (TrainLosses.buffers)."""
    clocks, readers, calls = [], [], []

    class SpyClock(train_gpt.Clock):
        def __init__(self, ctx):
            super().__init__(ctx)
            clocks.append(self)

    class SpyLosses(train_gpt.TrainLosses):
        def __init__(self, device):
            super().__init__(device)
            readers.append(self)

    def timed():
        return bool(clocks) and clocks[-1].started is not None

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            if timed():
                calls.append((name, self))
            return original(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(train_gpt, "Clock", SpyClock)
    monkeypatch.setattr(train_gpt, "TrainLosses", SpyLosses)
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: timed() and calls.append(("cuda.synchronize", None)))
    assert run(SMALL + ["--seed", "1", "--run-name", "nosync"], data_dir, tmp_path) == 0  # diagnostics on
    buffers = [b for r in readers for b in r.buffers]
    reads = [name for name, t in calls if name == "item" and any(t is b for b in buffers)]
    others = [name for name, t in calls if not (name == "item" and any(t is b for b in buffers))]
    assert others == []
    assert len(reads) == 4  # losses of steps 1, 2, 4, 5; those of 3 and 6 are read at their validation


def keeping_final_weights(monkeypatch):
    """A list that gets each trial's final weights (its model's state dict) as train_gpt.main runs."""
    finals, train_trial = [], train_gpt.train_trial

    def keep_final_weights(run_, trial, *rest):
        loss = train_trial(run_, trial, *rest)
        finals.append({k: v.clone() for k, v in run_.model.state_dict().items()})
        return loss

    monkeypatch.setattr(train_gpt, "train_trial", keep_final_weights)
    return finals


def test_diagnostics_change_nothing_in_training(data_dir, tmp_path, monkeypatch):
    """Diagnostics on and off: the same weights at the end, bit for bit, and the same val losses."""
    finals = keeping_final_weights(monkeypatch)
    logs = []
    for flag in ("--diagnostics", "--no-diagnostics"):
        assert run(SMALL + ["--seed", "1", "--run-name", flag[2:], flag], data_dir, tmp_path) == 0
        logs.append(open(only_log(glob.glob(str(tmp_path / f"*_{flag[2:]}"))[0])).read())
    assert "\ndiagnostics: dead:" in logs[0] and "\ndiagnostics: dead:" not in logs[1]
    assert val_losses(logs[0]) == val_losses(logs[1]) and len(val_losses(logs[0])) == 3
    assert list(finals[0]) == list(finals[1])
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name


# --- end to end ---

@pytest.fixture(scope="module")
def logged_run(data_dir, tmp_path_factory):
    """One run of train_gpt.py in a fresh process, as a user starts it (SMALL, seed 3, diagnostics
    on), shared by the tests that read its log or folder: (log path, stdout, the flags)."""
    args = ["--preset", "tiny"] + SMALL + ["--data-dir", data_dir, "--seed", "3", "--run-name", "e2e"]
    records_dir = tmp_path_factory.mktemp("logged_run")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py"), *args, "--records-dir",
                           str(records_dir)], capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return only_log(glob.glob(str(records_dir / "*_e2e"))[0]), proc.stdout, args


# What a code part must not carry: the harness (record folders, locks, seeds, checkpoints), and the
# code of techniques the run does not use (the lineage; the batched path, cans12, NorMuon).
NOT_IN_THE_RECORD = {"harness": ("def save_checkpoint", "records_lock", "def open_record", "reopen_record",
                                 "class Harness"),
                     "lineage": ("class LineageAurora", "class EMANesterov", "SoapPreconditioner"),
                     "variants": ("class VariantAurora", "polar_cans12", "NORMUON_BETA2", "_shape_stacks"),
                     "diagnostics": ("LeverageProbe", "track_leverage", "pop_leverage", "row_leverage"),
                     "frontier": ("class FrontierAurora", "class TailEMA", "def raw_adam_step")}


def redefined(code):
    """Top-level names a code part defines more than once (the inlined modules share one namespace:
    a clash would make the code part compute something else than the run did)."""
    names = []
    for node in ast.parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names += [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                      if isinstance(t, ast.Name)]
    return sorted({n for n in names if names.count(n) > 1})


def code_part(log_text):
    return log_text.split("\n" + SEPARATOR + "\n", 1)[0] + "\n"


def test_a_run_writes_a_one_file_log_and_loss_falls(logged_run):
    log, stdout, _ = logged_run
    text = open(log).read()
    code, header = text.split("\n" + SEPARATOR + "\n", 1)
    assert code + "\n" == harness.code_part()
    for module in ("aurora.py", "measure.py", "plugins.py"):  # inlined, not imported
        assert f"{module} (inlined)" in code
    assert not re.search(r"^from (aurora|data\.shards|diagnostics|measure|plugins) import", code, re.M)
    for part, marks in NOT_IN_THE_RECORD.items():  # the record's computation, nothing around it
        assert not [m for m in marks if m in code], part
    assert "LINEAGE = None  # lineage.py: not used by this run" in code
    assert train_gpt.PER_RUN == harness.PER_RUN  # what the toolkit reads from the code part
    assert len(code.splitlines()) <= 1200  # measured 1192 (README); upstream's largest script: 981
    assert redefined(code) == ["Hyperparameters"]  # one namespace: no module's name shadows another's
    for expected in ("torch 2.", "world_size 1", "seeds [3]\n", "lr_matrix: 0.0375", "train_steps: 6",
                     "vocab_size: 1024", 'rule: "aurora"', "trial:0 seed:3", "ns_dtype_used float32"):
        assert expected in header, expected
    losses = val_losses(header)
    assert [s for s, _ in losses] == [0, 3, 6]
    assert losses[0][1] == pytest.approx(math.log(1024), abs=0.01)  # zero-init head: uniform
    assert losses[-1][1] < losses[1][1] < losses[0][1] - 0.3  # it learns the synthetic language
    assert "\ndiagnostics: dead:" in header
    assert oct(os.stat(os.path.join(os.path.dirname(log), "config.json")).st_mode & 0o777) == "0o644"
    assert "step:6/6 val_loss" in stdout


def computation_flags(args):
    """The flags of a run without harness.py's (record folders, diagnostics: a code part run alone
    has none of them)."""
    fields = {f"--{f.name.replace('_', '-')}": f for f in dataclasses.fields(harness.Hyperparameters)}
    out, skip_value = [], False
    for a in args:
        if skip_value:
            skip_value = False
        elif a in fields:
            skip_value = fields[a].type is not bool
        elif not (a.startswith("--no-") and "--" + a[5:] in fields):
            out.append(a)
    return out


def runs_alone(runs, cwd):
    """Run each (code part, flags) as a script of its own, in its own folder, with nothing of the
    repository on the path (one process runs them all, each as __main__, as `python x.py` would);
    returns each one's log: logs/<uuid>.txt in its folder, upstream's form."""
    driver = ("import os, runpy, sys\n"
              f"sys.path[:] = [p for p in sys.path if p and p != {ROOT!r}]\n"
              f"for script, args in {runs!r}:\n"
              "    os.chdir(os.path.dirname(script))\n"
              "    sys.argv = [script, *args]\n"
              "    try:\n"
              "        runpy.run_path(script, run_name='__main__')\n"
              "    except SystemExit as e:\n"
              "        assert e.code == 0, (script, e.code)\n")
    env = dict(SUBPROCESS_ENV, OMP_NUM_THREADS="1")
    alone = subprocess.run([sys.executable, "-c", driver], cwd=cwd, capture_output=True, text=True,
                           timeout=300, env=env)
    assert alone.returncode == 0, alone.stderr[-2000:]
    return [open(only_log(os.path.join(os.path.dirname(script), "logs"))).read() for script, _ in runs]


def test_the_code_part_of_a_log_runs_on_its_own(logged_run, data_dir, tmp_path):
    """The code part alone (no repository on the path) reruns the run and writes its own log,
    logs/<uuid>.txt, the code then the output: the same code, the same val losses; for the record
    and for an ablation (NorMuon on the batched path), whose code part adds the variants' module
    and nothing of the lineage."""
    log, _, args = logged_run
    ablation = ["--preset", "tiny"] + SMALL + ["--data-dir", data_dir, "--seed", "4", "--rule", "normuon",
                                              "--aurora-batched", "--no-diagnostics"]
    assert train_gpt.main(ablation + ["--records-dir", str(tmp_path / "ablation")]) == 0
    logs_a = [open(log).read(), open(only_log(glob.glob(str(tmp_path / "ablation" / "*"))[0])).read()]
    runs = []
    for name, text, flags in zip(("record", "ablation"), logs_a, (args, ablation)):
        (tmp_path / "alone" / name).mkdir(parents=True)
        (tmp_path / "alone" / name / "train.py").write_text(code_part(text))
        runs.append((str(tmp_path / "alone" / name / "train.py"), computation_flags(flags)))
    ablation_code = code_part(logs_a[1])
    assert "aurora_variants.py (inlined)" in ablation_code and "LINEAGE = None" in ablation_code
    assert redefined(ablation_code) == ["Hyperparameters"]
    assert not [m for m in NOT_IN_THE_RECORD["lineage"] + NOT_IN_THE_RECORD["harness"] if m in ablation_code]
    for log_a, log_b in zip(logs_a, runs_alone(runs, tmp_path)):
        assert log_b.split(SEPARATOR, 1)[0] == log_a.split(SEPARATOR, 1)[0]  # byte-identical code
        assert val_losses(log_b) == val_losses(log_a) and len(val_losses(log_a)) == 3


def test_a_one_constant_variant_diffs_from_the_baseline_in_one_code_line(logged_run, tmp_path):
    """A speedrunner's change to one constant of train_gpt.py is the one changed line of the code
    part that `tools/records.py diff` shows between the variant's log and the baseline's."""
    log_a, _, args = logged_run
    code = code_part(open(log_a).read())
    assert code.count("return self.proj(F.relu(self.fc(x)).square())") == 1
    variant = tmp_path / "variant"
    variant.mkdir()
    (variant / "train_gpt.py").write_text(code.replace("return self.proj(F.relu(self.fc(x)).square())",
                                                       "return self.proj(F.relu(self.fc(x)).square() * 0.5)"))
    other = subprocess.run([sys.executable, "train_gpt.py", *computation_flags(args)],
                           cwd=variant, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert other.returncode == 0, other.stderr[-2000:]
    log_b = only_log(str(variant / "logs"))
    diff = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "records.py"), "diff", log_a, log_b, "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert diff.returncode == 0, diff.stderr[-2000:]
    d = json.loads(diff.stdout)
    changed = [line for line in d["code_diff"][2:] if line[:1] in "+-"]
    assert changed == ["-        return self.proj(F.relu(self.fc(x)).square())",
                       "+        return self.proj(F.relu(self.fc(x)).square() * 0.5)"], d["code_diff"]
    assert d["hyperparameters"] == []  # and nothing else differs in the configuration


def test_existing_record_is_never_overwritten_and_seeds_are_never_reused(data_dir, tmp_path, capsys, monkeypatch):
    draws, real_draw = [10, 99, 9, 11], harness.draw_seed  # what the OS entropy gives, in order
    monkeypatch.setattr(harness, "draw_seed", lambda: draws.pop(0) if draws else real_draw())
    args = SMALL + ["--train-steps", "2", "--run-name", "same", "--no-diagnostics"]
    assert run(args, data_dir, tmp_path) == 0
    record_dir = glob.glob(str(tmp_path / "*_same"))[0]
    first = only_log(record_dir)
    before = open(first).read()
    assert "trial:0 seed:10" in before
    assert run(args, data_dir, tmp_path) == 2
    assert "already holds 1 log(s). Pass --append" in capsys.readouterr().err
    assert open(first).read() == before and only_log(record_dir) == first
    # --append without --seed: the drawn 9 (trials 9, 10) clashes with trial 10, so 11 is drawn
    assert run(args + ["--append", "--trials", "2"], data_dir, tmp_path) == 0
    second = [f for f in glob.glob(os.path.join(record_dir, "*.txt")) if f != first][0]
    text = open(second).read()
    assert "trial:0 seed:11" in text and "trial:1 seed:12" in text and "\nseed: 11\n" in text and not draws
    # a seed given with --seed that is already in the folder is refused, and nothing is written
    assert run(args + ["--append", "--seed", "4"], data_dir, tmp_path) == 0
    assert run(args + ["--append", "--seed", "4"], data_dir, tmp_path) == 2
    assert "seed(s) [4] already in this record" in capsys.readouterr().err
    assert run(args + ["--append", "--seed", "3", "--trials", "2"], data_dir, tmp_path) == 2
    assert "seed(s) [4] already in this record" in capsys.readouterr().err
    assert len(glob.glob(os.path.join(record_dir, "*.txt"))) == 3
    # another configuration is refused, even when config.json is gone (read from the logs)
    os.remove(os.path.join(record_dir, "config.json"))
    assert run(args + ["--train-steps", "3", "--append"], data_dir, tmp_path) == 2
    err = capsys.readouterr().err
    assert "differs" in err and "train_steps 2 -> 3" in err
    assert len(glob.glob(os.path.join(record_dir, "*.txt"))) == 3


def test_append_joins_the_latest_folder_of_the_run_name(data_dir, tmp_path):
    old = tmp_path / "2000-01-01_late"
    args = SMALL + ["--train-steps", "2", "--run-name", "late", "--no-diagnostics"]
    assert run(args, data_dir, tmp_path) == 0
    os.rename(glob.glob(str(tmp_path / "*_late"))[0], old)  # as if it started before midnight
    assert run(args + ["--append"], data_dir, tmp_path) == 0
    assert len(glob.glob(str(old / "*.txt"))) == 2 and len(glob.glob(str(tmp_path / "*_late"))) == 1


def test_missing_data_says_which_command_fetches_it(tmp_path, capsys):
    assert run(["--run-name", "x"], str(tmp_path / "nothing"), tmp_path) == 2
    err = capsys.readouterr().err
    assert "no train shards" in err and "data/cached_fineweb10B.py" in err
    assert not glob.glob(str(tmp_path / "*_x"))  # nothing created


def test_too_few_train_tokens_fails_before_training(data_dir, tmp_path, capsys):
    assert run(["--train-steps", "1000", "--run-name", "x"], data_dir, tmp_path) == 2
    assert "but 1000 are needed" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "*_x"))


def test_a_bad_token_id_in_a_later_shard_fails_before_the_record_folder(data_dir, tmp_path, capsys):
    bad = tmp_path / "data"
    bad.mkdir()
    for f in glob.glob(os.path.join(data_dir, "*.bin")):
        os.symlink(f, bad / os.path.basename(f))
    os.remove(bad / "fineweb_train_000002.bin")
    write_shard(str(bad / "fineweb_train_000002.bin"), np.full(120000, 5000))
    assert run(["--train-steps", "40", "--run-name", "x"], str(bad), tmp_path / "rec") == 2
    assert "token id 5000 >= the model's vocab_size 1024" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "rec" / "*_x"))


def test_nan_loss_stops_names_the_step_and_keeps_the_log(data_dir, tmp_path, capsys, monkeypatch):
    forward, calls = GPT.forward, []

    def nan_from_third_micro_batch(self, idx, targets):  # fault injection: step 2 goes NaN
        loss = forward(self, idx, targets)
        calls.append(torch.is_grad_enabled())
        return loss * float("nan") if sum(calls) >= 3 else loss

    monkeypatch.setattr(GPT, "forward", nan_from_third_micro_batch)
    assert run(SMALL + ["--train-steps", "5", "--run-name", "nan", "--seed", "0"], data_dir, tmp_path) == 1
    err = capsys.readouterr().err
    # the loss is read a step late, when step 2's updates are NaN too: their consequence, not the cause
    assert re.search(r"trial 0 \(seed 0\): non-finite train loss \(nan\) at step 2", err), err
    assert "the log so far is kept in" in err
    text = open(only_log(glob.glob(str(tmp_path / "*_nan"))[0])).read()
    assert "step:1/5 train_loss" in text and "\nfailed: trial 0 (seed 0): non-finite train loss" in text


@pytest.mark.parametrize("batched", [True, False])
def test_a_non_finite_update_stops_and_names_the_matrix(data_dir, tmp_path, capsys, monkeypatch, batched):
    build = train_gpt.build_optimizers

    def nan_gradient_for_one_fc(model, hp, device):  # finite loss, NaN gradient of blocks.1.mlp.fc
        model.blocks[1].mlp.fc.weight.register_hook(lambda g: g * float("nan"))
        return build(model, hp, device)

    monkeypatch.setattr(train_gpt, "build_optimizers", nan_gradient_for_one_fc)
    flag = "--aurora-batched" if batched else "--no-aurora-batched"
    assert run(SMALL + ["--n-layer", "2", "--run-name", "div", "--seed", "5", flag], data_dir, tmp_path) == 1
    err = capsys.readouterr().err
    # the NaN weights make step 2's loss NaN; the update of step 0 (the first step()) is named as its cause
    failed = re.search(r"^failed: trial 0 \(seed 5\): .*non-finite update.*$", err, re.M)
    assert failed and "(256, 64)" in failed.group() and re.search(r"\bat step 0\b", failed.group()), err
    assert "train loss" not in err


def test_bad_flags_are_rejected_with_a_message(capsys):
    for argv, message in ((["--preset", "huge"], "invalid choice: 'huge'"),
                          (["--train-steps", "0"], "--train-steps must be >= 1"),
                          (["--pp-beta", "1.5"], "--pp-beta must be in (0, 1]"),
                          (["--rule", "adam"], "invalid choice: 'adam'"),
                          (["--run-name", "../escape"], "--run-name must be a plain folder name"),
                          (["--seed", "-1"], "--seed must be in [0, 2^63 - trials]"),
                          (["--val-tokens", "1000"], "must be a multiple of the batch")):
        with pytest.raises(SystemExit) as exit_:
            train_gpt.parse_args(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_gpu_presets_refuse_to_start_on_a_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for preset in ("record", "small"):
        assert train_gpt.main(["--preset", preset, "--records-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"the {preset} preset trains the 124M model and needs CUDA" in err and "--allow-cpu" in err
        assert train_gpt.main(["--preset", preset, "--dry-run"]) == 2
        assert "--allow-cpu" in capsys.readouterr().err
        assert train_gpt.main(["--preset", preset, "--dry-run", "--allow-cpu"]) == 0
    assert not os.listdir(tmp_path)
    capsys.readouterr()
    assert train_gpt.main(["--preset", "tiny", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("dry run: configuration ok (preset tiny, world size 1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert train_gpt.main(["--dry-run", "--allow-cpu"]) == 2
    assert "world size 3 cannot split" in capsys.readouterr().err


def test_sigterm_writes_an_interrupted_line(data_dir, tmp_path, monkeypatch):
    """SIGTERM without --save-every: training stops at once, the log says where, the exit status
    is 143 (128 + 15, as a shell reports a SIGTERM), and a caller of main() gets its own handler back."""
    sigterm_during(monkeypatch, 4)  # the step after validation 3
    mine = lambda *_: None  # noqa: E731
    signal.signal(signal.SIGTERM, mine)
    try:
        assert run(SMALL + ["--run-name", "killed", "--no-diagnostics"], data_dir, tmp_path) == 143
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert restored is mine
    text = open(only_log(glob.glob(str(tmp_path / "*_killed"))[0])).read()
    assert re.search(r"^interrupted: SIGTERM at step 3, trial 0 \(seed \d+\)$", text, re.M), text[-500:]
    assert "step:3/6 val_loss" in text and "step:4/6 train_loss" not in text  # step 4 never ended


def _rank_with_its_own_generator(rank, runs):
    """Rank `rank` of 2 gloo processes running train_gpt.main(args) for each (port, args) of
    `runs` (a fresh port for each process group: reusing one can hang the second). Rank
    1's generator is not where rank 0's is when it initializes the model (it draws 5 numbers
    first), as the record's ranks' are not (each process seeded from the OS entropy): only rank
    0's broadcast makes the ranks' weights agree."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    if rank == 1:
        init = GPT.init_weights

        def init_elsewhere(self, init_var):
            torch.rand(5, device=self.embed.weight.device)
            return init(self, init_var)
        GPT.init_weights = init_elsewhere
    for port, args in runs:
        os.environ["MASTER_PORT"] = str(port)
        assert train_gpt.main(args) == 0
    exit_now()  # skip gloo's teardown at exit (see conftest.gloo_rank)


def test_two_gloo_ranks_with_different_generators_match_one_process(data_dir, tmp_path):
    args = SMALL + ["--preset", "tiny", "--data-dir", data_dir, "--records-dir", str(tmp_path), "--seed", "3",
                    "--no-diagnostics"]
    paths = ("batched", "--aurora-batched"), ("per-matrix", "--no-aurora-batched")
    for name, flag in paths:
        assert train_gpt.main(args + [flag, "--run-name", f"{name}1"]) == 0
    mp.spawn(_rank_with_its_own_generator, nprocs=2, join=True,
             args=([(free_port(), args + [flag, "--run-name", f"{name}2"]) for name, flag in paths],))
    for name, _ in paths:
        results = {}
        for world in (1, 2):
            text = open(only_log(glob.glob(str(tmp_path / f"*_{name}{world}"))[0])).read()
            assert f"world_size {world}" in text and f"grad_accum_steps {2 // world}" in text
            results[world] = val_losses(text)
        # Same weights (rank 0's, broadcast), same batches, same gradients (summed per parameter in
        # its own dtype), same updates; only the validation sum is associated differently (per-rank
        # partial sums), float32 rounding far below the 5 printed decimals: the printed losses agree.
        assert [s for s, _ in results[1]] == [0, 3, 6]
        assert results[1] == results[2], name


def test_two_runs_started_together_cannot_join_one_folder_with_different_configurations(tmp_path, monkeypatch):
    """Two runs of different configurations open the same record folder at the same time. The
    interleaving is forced: the first run inside open_record's critical section (just before it
    names its log) waits until the other has also reached it, or has asked for the folder lock
    (then it is blocked on the lock, and waits are over). Without the lock both runs are inside
    together, every time, and both would join the folder."""
    import fcntl
    import threading
    import uuid
    cond, seen = threading.Condition(), dict(inside=0, locking=0)
    real_flock, real_uuid4 = fcntl.flock, uuid.uuid4

    def flock(fd, operation):
        if operation == fcntl.LOCK_EX:
            with cond:
                seen["locking"] += 1
                cond.notify_all()
        return real_flock(fd, operation)

    def uuid4():  # called in the critical section, after the folder's checks
        with cond:
            seen["inside"] += 1
            cond.notify_all()
            cond.wait_for(lambda: seen["inside"] == 2 or seen["locking"] == 2, timeout=60)
        return real_uuid4()

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(uuid, "uuid4", uuid4)
    outcomes = {}

    def start(steps):
        hp = tiny_hp(records_dir=str(tmp_path), run_name="race", append=True, train_steps=steps)
        try:
            _, _, log, hp = harness.open_record(hp, lambda log, hp: None)
            log.write(f"trial:0 seed:{hp.seed}\n")  # a log now exists: the folder is taken
            log.close()
            outcomes[steps] = ("ok", None)
        except BaseException as e:  # every outcome is kept, whatever it is
            outcomes[steps] = ("refused" if isinstance(e, ValueError) else "error", f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=start, args=(steps,)) for steps in (10, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(outcomes) == [10, 11], outcomes  # both threads reported
    assert sorted(kind for kind, _ in outcomes.values()) == ["ok", "refused"], outcomes
    winner = next(steps for steps, (kind, _) in outcomes.items() if kind == "ok")
    config = json.load(open(glob.glob(str(tmp_path / "*_race" / "config.json"))[0]))
    assert config["train_steps"] == winner
    assert "differs" in outcomes[21 - winner][1] and "train_steps" in outcomes[21 - winner][1]



# --- record folders at the harness level: seeds taken by runs going on, folder names, config.json ---

def join(records_dir, run_name="seeds", **overrides):
    """harness.open_record as a run calls it, with a header that names its seeds: (log path, the
    open log (its lock held: a run going on; close it to end the run), hp)."""
    hp = tiny_hp(**{"records_dir": str(records_dir), "run_name": run_name, "append": True, **overrides})

    def header(f, hp):
        f.write(f"code\n{SEPARATOR}\nseed: {hp.seed}\ntrials: {hp.trials}\n{SEPARATOR}\n")
        f.flush()
    _, path, log, hp = harness.open_record(hp, header)
    return path, log, hp


def test_runs_that_overlap_never_take_the_same_seeds(tmp_path, monkeypatch):
    draws = [6, 8, 8, 9]  # what the OS entropy gives, in order
    monkeypatch.setattr(harness, "draw_seed", lambda: draws.pop(0))
    _, a, _ = join(tmp_path, seed=5, trials=3)  # going on: seeds 5, 6, 7 are its own, logged or not
    for seed, trials, clash in ((5, 1, [5]), (7, 1, [7]), (3, 3, [5])):
        with pytest.raises(ValueError, match=rf"seed\(s\) \{clash}\ already in this record"):
            join(tmp_path, seed=seed, trials=trials)
    _, c, hp = join(tmp_path)  # drawn: 6 is taken, so 8
    assert hp.seed == 8
    _, d, hp = join(tmp_path)  # 8 is c's (going on, nothing logged yet), so 9
    assert hp.seed == 9
    # a is killed during its trial 1: its complete trial 0's seed stays taken, 6 and 7 are free again
    a.write("trial:0 seed:5\nstep:2/2 val_loss:4.0\ntrial:1 seed:6\nstep:1/2 train_loss:4.0\n")
    a.close()
    with pytest.raises(ValueError, match=r"seed\(s\) \[5\] already"):
        join(tmp_path, seed=5)
    _, again, hp = join(tmp_path, seed=6, trials=2)
    assert hp.seed == 6
    # a run killed with a checkpoint beside its log: its seeds wait for the resume
    path, e, _ = join(tmp_path, seed=20, trials=2)
    e.close()
    open(os.path.splitext(path)[0] + ".ckpt", "w").close()
    with pytest.raises(ValueError, match=r"seed\(s\) \[21\] already"):
        join(tmp_path, seed=21)
    os.remove(os.path.splitext(path)[0] + ".ckpt")  # no resume coming: they are free
    for log in (c, d, again, join(tmp_path, seed=21)[1]):
        log.close()


def test_append_joins_only_a_folder_named_date_and_run_name(tmp_path):
    today = time.strftime("%Y-%m-%d", time.gmtime())
    for folder in ("2026-11-23_tiny_example", "track_3_optimization", "2026-11-23_examples"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "other.txt").write_text("not this run's record\n")
    for name in ("example", "optimization"):
        path, log, _ = join(tmp_path, run_name=name, seed=1)
        log.close()
        assert os.path.dirname(path) == str(tmp_path / f"{today}_{name}")
    (tmp_path / "2026-11-22_example").mkdir()  # a folder of its own, before midnight: joined
    os.rename(tmp_path / f"{today}_example", tmp_path / "2026-11-21_example")
    path, log, _ = join(tmp_path, run_name="example", seed=2)
    log.close()
    assert os.path.dirname(path) == str(tmp_path / "2026-11-22_example")


def test_a_config_json_left_without_logs_is_replaced_and_one_configuration_stays(tmp_path, capsys):
    path, log, _ = join(tmp_path, seed=1, train_steps=10)
    log.close()
    os.remove(path)  # its logs deleted, config.json left
    config = os.path.join(os.path.dirname(path), "config.json")
    _, log, _ = join(tmp_path, seed=1, train_steps=11, append=False)
    log.close()
    err = capsys.readouterr().err
    assert f"note: {config} held another configuration (train_steps 10 -> 11)" in err and "holds no log" in err
    assert json.load(open(config))["train_steps"] == 11
    with pytest.raises(ValueError, match="differs from the record .*train_steps 11 -> 10"):
        join(tmp_path, seed=2, train_steps=10)


def test_a_signal_during_the_final_summary_leaves_the_run_complete(monkeypatch):
    ctx = train_gpt.Context(rank=0, world=1, device=torch.device("cpu"), micro=1, accum=1)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        h = harness.Harness(tiny_hp(), ctx, train_gpt.Logger(0))
        monkeypatch.setattr(harness, "refresh_summary", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
        h.run_ended()  # no Interrupted: the log gets no `interrupted:` line, the exit status is 0
        assert h.stop.signum == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])


def test_a_full_disk_during_a_checkpoint_write_is_logged_and_training_goes_on(data_dir, tmp_path, monkeypatch):
    errors = [RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                           "file data/3: file write failed"),  # what torch.save raises when the disk fills
              OSError(28, "No space left on device")]

    def full_disk(obj, f):  # in the middle of the write
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise errors.pop(0)
    monkeypatch.setattr(torch, "save", full_disk)
    args = SMALL + ["--train-steps", "3", "--save-every", "1", "--run-name", "full", "--seed", "1", "--no-diagnostics"]
    assert run(args, data_dir, tmp_path) == 0
    record_dir = glob.glob(str(tmp_path / "*_full"))[0]
    text = open(only_log(record_dir)).read()
    not_written = re.findall(r"^checkpoint not written: step (\d) of trial 0: (.*); training goes on", text, re.M)
    assert not_written == [("1", "[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed "
                                 "writing file data/3: file write failed"),
                           ("2", "[Errno 28] No space left on device")], text[-2000:]
    assert "\nstep:3/3 val_loss:" in text and "\nfinal val losses: " in text
    assert not re.search(r"^(interrupted|failed):", text, re.M)
    assert not glob.glob(os.path.join(record_dir, "*.ckpt*"))  # no partial file left


# --- the harness: what a variant's log shows, the record folder's config.json, --records-dir ---

@pytest.mark.parametrize("damage, why", [("corrupt", "not valid JSON"), ("empty", "is empty"),
                                         ("directory", "a directory"), ("list", "not a JSON object (a list)")])
def test_an_unusable_config_json_is_named_with_the_fix(data_dir, tmp_path, capsys, damage, why):
    args = SMALL + ["--train-steps", "2", "--run-name", "cfg", "--no-diagnostics", "--seed", "1"]
    assert run(args, data_dir, tmp_path) == 0
    record_dir = glob.glob(str(tmp_path / "*_cfg"))[0]
    config = os.path.join(record_dir, "config.json")
    os.remove(config)
    if damage == "directory":
        os.mkdir(config)
    else:
        open(config, "w").write({"corrupt": '{"train_steps": 2,', "empty": "", "list": "[1, 2]"}[damage])
    capsys.readouterr()
    assert run(args + ["--append", "--seed", "2"], data_dir, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{config} is" in err and why in err and "delete it" in err and "logs' headers" in err, err
    assert len(glob.glob(os.path.join(record_dir, "*.txt"))) == 1


@pytest.mark.parametrize("kind", ["a file", "read-only"])
def test_an_unusable_records_dir_is_named_before_training(data_dir, tmp_path, capsys, kind):
    target = tmp_path / "records"
    if kind == "a file":
        target.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        target.mkdir()
        target.chmod(0o555)
    assert run(SMALL + ["--train-steps", "2", "--no-diagnostics"], data_dir, target) == 2
    err = capsys.readouterr().err
    assert f"cannot use --records-dir {target}: " in err and "Traceback" not in err, err
    assert "step:" not in err
