"""train_gpt.py: record defaults, model, end-to-end tiny runs, failure modes, 2 ranks, run.sh."""
import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt
from data.synthetic import main as synthetic_main
from train_gpt import GPT, Hyperparameters, build_optimizers, is_val_step, lr_multiplier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\d+\.\d{5}) train_time:\d+\.\d{3}s step_avg:(nan|\d+\.\d{2})ms$")
REFERENCE_LOG = os.path.join(ROOT, "..", "shared", "reference-logs", "track3_aurora_3175_n20.txt")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic_main(["--out", str(out), "--train-shards", "2", "--shard-tokens", "120000",
                    "--val-tokens", "40000"])
    return str(out)


def run(args, data_dir, records):
    return train_gpt.main(["--preset", "tiny", "--data-dir", data_dir, "--records-dir", str(records)]
                          + args)


def val_losses(log_text):
    return [(int(m.group(1)), float(m.group(3))) for m in map(VAL_LINE.match, log_text.splitlines()) if m]


def only_log(record_dir):
    logs = glob.glob(os.path.join(record_dir, "*.txt"))
    assert len(logs) == 1, logs
    return logs[0]


# --- the record's configuration ---

def test_record_defaults_match_the_spec():
    hp = Hyperparameters()
    assert (hp.batch_tokens, hp.seq_len, hp.micro_batch_seqs, hp.val_tokens) == (524288, 1024, 64, 10485760)
    assert (hp.vocab_size, hp.n_layer, hp.d_model, hp.head_dim) == (50304, 12, 768, 128)
    assert (hp.attn_scale, hp.logit_softcap, hp.rope_base, hp.init_var) == (0.12, 15.0, 1024.0, 0.33)
    assert (hp.train_steps, hp.lr_matrix, hp.momentum, hp.pp_iterations, hp.pp_beta) == (3200, 0.0375, 0.95, 2, 0.5)
    assert (hp.contra, hp.uw_floor, hp.weight_decay, hp.optimizer) == (0.4, 0.35, 0.0, "aurora")
    assert (hp.lr_embed, hp.lr_head, hp.lr_scalar, hp.adam_betas, hp.adam_eps) == (0.3, 1 / 320, 0.01, (0.8, 0.95), 1e-10)


def test_validation_steps_are_the_reference_logs():
    hp = Hyperparameters()
    ours = [s for s in range(hp.train_steps + 1) if is_val_step(s, hp)]
    if os.path.exists(REFERENCE_LOG):
        with open(REFERENCE_LOG) as f:
            first_trial = []
            for line in f:
                m = re.match(r"step:(\d+)/3200 val_loss", line)
                if m:
                    if first_trial and int(m.group(1)) <= first_trial[-1]:
                        break
                    first_trial.append(int(m.group(1)))
        assert ours == first_trial
    assert ours[:3] == [0, 125, 250] and ours[-3:] == [3150, 3175, 3200] and 2900 in ours


def test_lr_schedule():
    hp = Hyperparameters()
    assert lr_multiplier(0, hp) == 1.0 and lr_multiplier(959, hp) == 1.0
    assert lr_multiplier(960, hp) == pytest.approx((1 - 960 / 3200) / 0.7)  # = 1 at the switch
    assert lr_multiplier(2080, hp) == pytest.approx(0.5)
    assert lr_multiplier(3199, hp) == pytest.approx(1 / 3200 / 0.7)


def test_record_model_and_optimizer_groups():
    hp = Hyperparameters()
    with torch.device("meta"):
        model = GPT(hp, torch.bfloat16)
    adam, aurora = build_optimizers(model, hp)
    matrices = aurora.param_groups[0]["params"]
    assert len(matrices) == 72
    shapes = sorted({tuple(p.shape) for p in matrices})
    assert shapes == [(768, 768), (768, 3072), (3072, 768)]
    assert [g["lr"] for g in adam.param_groups] == [0.3, 1 / 320, 0.01]
    assert adam.param_groups[0]["params"][0] is model.embed.weight
    assert model.embed.weight.dtype == torch.bfloat16
    assert all(p.ndim < 2 for p in adam.param_groups[2]["params"])
    n_params = sum(p.numel() for p in model.parameters())
    n_blocks = sum(p.numel() for p in model.blocks.parameters())
    assert n_blocks == 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 2 * 768)
    assert n_params == n_blocks + 2 * 50304 * 768 + 50304 + 2 * 768


def test_initialization_rule():
    hp = train_gpt.hyperparameters_from(train_gpt.parse_args(["--preset", "tiny"]))
    torch.manual_seed(0)
    model = GPT(hp, torch.float32)
    for name, p in model.named_parameters():
        if p.ndim < 2:
            assert torch.all(p == (0 if name.endswith("bias") else 1)), name
        elif "proj" in name:
            assert torch.all(p == 0), name  # attention out, MLP proj and the LM head
        elif name == "embed.weight":
            assert abs(p.float().std().item() - 1) < 0.05
        else:
            assert abs(p.std().item() / math.sqrt(0.33 / p.size(1)) - 1) < 0.05, name
    assert model.lm_head_proj.weight.abs().sum() == 0


def test_rotary_scores_depend_on_relative_position_only():
    rot = train_gpt.Rotary(head_dim=32, base=1024)
    q, k = torch.randn(1, 1, 1, 32).expand(1, 20, 1, 32), torch.randn(1, 1, 1, 32).expand(1, 20, 1, 32)
    rq, rk = rot(q)[0, :, 0], rot(k)[0, :, 0]
    scores = rq @ rk.T
    assert torch.allclose(scores[5, 2], scores[15, 12], atol=1e-5)
    assert torch.allclose(rq[:, 8:16], q[0, :, 0, 8:16])  # zero-frequency quarter is not rotated
    assert not torch.allclose(scores[5, 2], scores[5, 3], atol=1e-3)


def test_logits_are_soft_capped():
    hp = train_gpt.hyperparameters_from(train_gpt.parse_args(["--preset", "tiny"]))
    model = GPT(hp, torch.float32)
    with torch.no_grad():
        model.lm_head_proj.weight.normal_(0, 100)
    x = torch.randint(0, hp.vocab_size, (2, 16))
    loss = model(x, x)  # summed CE; capped logits keep it finite and below 2 * 15 per token
    assert torch.isfinite(loss) and loss / x.numel() < 30


def test_world_size_that_cannot_split_the_batch():
    with pytest.raises(ValueError, match="world size 3 cannot split"):
        train_gpt.micro_batch_plan(Hyperparameters(), 3)
    assert train_gpt.micro_batch_plan(Hyperparameters(), 1) == (64, 8)
    assert train_gpt.micro_batch_plan(Hyperparameters(), 8) == (64, 1)
    assert train_gpt.micro_batch_plan(Hyperparameters(), 16) == (32, 1)  # 2 nodes: micro-batch shrinks


# --- end to end ---

def test_tiny_run_writes_self_contained_log_and_loss_falls(data_dir, tmp_path, capsys):
    assert run(["--train-steps", "40", "--run-name", "e2e"], data_dir, tmp_path) == 0
    record_dir = glob.glob(str(tmp_path / "*_e2e"))[0]
    text = open(only_log(record_dir)).read()
    # the log begins with all code that ran, then a line of 100 '='
    code = open(os.path.join(ROOT, "train_gpt.py")).read()
    code_aurora = open(os.path.join(ROOT, "aurora.py")).read()
    prefix = f"#### train_gpt.py ####\n{code}\n#### aurora.py ####\n{code_aurora}\n" + "=" * 100 + "\n"
    assert text.startswith(prefix)
    header = text[len(prefix):]
    for expected in ("torch 2.", "world_size 1", "seeds [0]", "lr_matrix: 0.0375", "train_steps: 40",
                     "vocab_size: 1024", "optimizer: aurora", "trial:0 seed:0"):
        assert expected in header, expected
    losses = val_losses(header)
    assert [s for s, _ in losses] == [0, 25, 40]
    assert losses[0][1] == pytest.approx(math.log(1024), abs=0.01)  # zero-init head: uniform
    assert losses[-1][1] < losses[0][1] - 2.0  # it learns the synthetic language
    summary = json.load(open(os.path.join(record_dir, "summary.json")))
    assert summary["n"] == 1
    out = capsys.readouterr().out
    assert "step:40/40 val_loss" in out and "summary:" in out


def test_existing_record_is_never_overwritten(data_dir, tmp_path, capsys):
    args = ["--train-steps", "3", "--run-name", "same"]
    assert run(args, data_dir, tmp_path) == 0
    record_dir = glob.glob(str(tmp_path / "*_same"))[0]
    first = only_log(record_dir)
    before = open(first).read()
    assert run(args, data_dir, tmp_path) == 2
    assert "already holds 1 log(s). Pass --append" in capsys.readouterr().err
    assert open(first).read() == before and only_log(record_dir) == first
    # --append adds a second log (more seeds of the same configuration) ...
    assert run(args + ["--append", "--seed", "5"], data_dir, tmp_path) == 0
    assert len(glob.glob(os.path.join(record_dir, "*.txt"))) == 2
    assert json.load(open(os.path.join(record_dir, "summary.json")))["n"] == 2
    # ... but not one of another configuration
    assert run(["--train-steps", "4", "--run-name", "same", "--append"], data_dir, tmp_path) == 2
    err = capsys.readouterr().err
    assert "differs" in err and "train_steps" in err


def test_missing_data_says_which_command_fetches_it(tmp_path, capsys):
    assert run(["--run-name", "x"], str(tmp_path / "nothing"), tmp_path) == 2
    err = capsys.readouterr().err
    assert "no train shards" in err and "data/cached_fineweb10B.py" in err
    assert not glob.glob(str(tmp_path / "*_x"))  # nothing created


def test_too_few_train_tokens_fails_before_training(data_dir, tmp_path, capsys):
    assert run(["--train-steps", "1000", "--run-name", "x"], data_dir, tmp_path) == 2
    assert "but 1000 are needed" in capsys.readouterr().err


def test_nan_loss_stops_names_the_step_and_keeps_the_log(data_dir, tmp_path, capsys, monkeypatch):
    forward, calls = GPT.forward, []

    def nan_from_third_micro_batch(self, idx, targets):  # fault injection: step 2 goes NaN
        loss = forward(self, idx, targets)
        calls.append(torch.is_grad_enabled())
        return loss * float("nan") if sum(calls) >= 3 else loss

    monkeypatch.setattr(GPT, "forward", nan_from_third_micro_batch)
    assert run(["--train-steps", "5", "--run-name", "nan"], data_dir, tmp_path) == 1
    err = capsys.readouterr().err
    assert re.search(r"trial 0 \(seed 0\): non-finite train loss \(nan\) at step 2", err), err
    assert "the log so far is kept in" in err
    text = open(only_log(glob.glob(str(tmp_path / "*_nan"))[0])).read()
    assert "step:1/5 train_loss" in text and "non-finite train loss" in text


def test_diverging_update_stops_and_names_the_matrices(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(train_gpt.PRESETS, "tiny", dict(train_gpt.PRESETS["tiny"], lr_matrix=1e30))
    assert run(["--train-steps", "5", "--run-name", "diverge"], data_dir, tmp_path) == 1
    err = capsys.readouterr().err
    assert re.search(r"non-finite (train loss|update for parameter\(s\) of shape \[\(192, 768\)).*step \d", err), err


def test_bad_flags_are_rejected(capsys):
    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--preset", "huge"])
    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--train-steps", "0"])
    assert "--train-steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--run-name", "../escape"])


def torchrun_or_python(nproc, args, env):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run(launcher + [os.path.join(ROOT, "train_gpt.py")] + args, env=env,
                          capture_output=True, text=True, timeout=300)


def test_two_gloo_processes_match_one(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on the CPU
    results = {}
    for nproc in (1, 2):
        args = ["--preset", "tiny", "--data-dir", data_dir, "--records-dir", str(tmp_path),
                "--train-steps", "12", "--run-name", f"procs{nproc}"]
        proc = torchrun_or_python(nproc, args, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = open(only_log(glob.glob(str(tmp_path / f"*_procs{nproc}"))[0])).read()
        assert f"world_size {nproc}" in text
        assert f"grad_accum_steps {2 // nproc}" in text
        results[nproc] = val_losses(text)
    assert [s for s, _ in results[1]] == [s for s, _ in results[2]] == [0, 12]
    for (_, a), (_, b) in zip(results[1], results[2]):
        assert abs(a - b) < 2e-3, (results[1], results[2])


def test_run_sh_cpu_path(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # the CPU path, GPU or not
    proc = subprocess.run([os.path.join(ROOT, "run.sh"), "--train-steps", "6", "--records-dir",
                           str(tmp_path), "--run-name", "runsh"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no NVIDIA GPU found" in proc.stdout
    assert os.path.exists(os.path.join(ROOT, "data", "synthetic", "fineweb_val_000000.bin"))
    text = open(only_log(glob.glob(str(tmp_path / "*_runsh"))[0])).read()
    assert "step:6/6 val_loss" in text
    # a failing run makes run.sh fail too
    bad = subprocess.run([os.path.join(ROOT, "run.sh"), "--train-steps", "-1"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
