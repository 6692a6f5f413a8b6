"""train_gpt.py's refusals: every numeric flag in its range (finite), schedules in range over the
run, settings that cannot act in this run, torchrun's environment, and a log that cannot be
started (a full disk, a read-only folder). All of it before the record folder exists: most of
these tests parse flags or call main(--dry-run) in-process and never train."""
import dataclasses
import errno
import glob
import io
import itertools
import os
import random
import re

import pytest
import torch

import harness
import train_gpt
from harness import RANGES
from train_gpt import Hyperparameters, parse_args

NUMERIC = (int, float, tuple)


def refused(argv, capsys):
    """The error line parse_args gives for `argv` (it must exit with status 2)."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# --- ranges: every numeric field, nan and inf ---------------------------------------------------

def test_every_numeric_hyperparameter_has_a_range():
    fields = {f.name for f in dataclasses.fields(Hyperparameters) if f.type in NUMERIC}
    assert fields - set(RANGES) == {"seed"}  # seed's range depends on --trials
    assert set(RANGES) <= fields


@pytest.mark.parametrize("name", [n for n, f in Hyperparameters.__dataclass_fields__.items()
                                  if f.type is float or (f.type is tuple and f.default)])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused_for_every_float_flag(name, value, capsys):
    default, flag = getattr(Hyperparameters, name), "--" + name.replace("_", "-")
    if isinstance(default, tuple):  # (argparse reads a -inf among a tuple's values as a flag)
        argv = [flag, value.lstrip("-")] + [str(v) for v in default[1:]]
    else:
        argv = [f"{flag}={value}"]
    err = refused(["--preset", "tiny", *argv], capsys)  # the range comes before all else
    assert f": error: {flag} must be " in err, err


@pytest.mark.parametrize("argv, message", [
    # negative PowerCool constants: negative learning rates
    (["--preset", "aurora_2860+tiny", "--power-c", "-1", "-1", "-1", "-1"], "--power-c must be > 0 (each value)"),
    (["--preset", "tiny", "--adam-betas", "2", "2"], "--adam-betas must be in [0, 1) (each value)"),
    (["--preset", "tiny", "--adam-eps", "-1"], "--adam-eps must be > 0"),
    (["--preset", "tiny", "--init-var", "-1"], "--init-var must be > 0"),
    (["--preset", "tiny", "--logit-softcap", "0"], "--logit-softcap must be > 0"),
    (["--preset", "tiny", "--radial-brake", "nan"], "--radial-brake must be >= 0, a finite number"),
    (["--preset", "tiny", "--ref-gamma", "inf"], "--ref-gamma must be finite"),
    (["--preset", "aurora_2860+tiny", "--power-c", "nan", "1", "1", "1"], "--power-c must be > 0 (each value), a finite"),
    (["--preset", "tiny", "--gain-split", "1"], "--gain-split must be in [0, 1)"),
    (["--preset", "tiny", "--diag-tokens", "64"], "--diag-tokens must be >= --seq-len (128)"),
    (["--preset", "tiny", "--val-loss-target", "0"], "--val-loss-target must be > 0"),
])
def test_out_of_range_values_are_refused_by_the_dry_run_naming_the_flag(argv, message, capsys, tmp_path):
    assert message in refused(argv + ["--dry-run"], capsys)
    # and by a real run, before anything is written
    with pytest.raises(SystemExit):
        train_gpt.main(argv + ["--records-dir", str(tmp_path)])
    assert os.listdir(tmp_path) == []


# --- schedules over the whole run -----------------------------------------------------------------

def test_a_momentum_horizon_before_the_end_is_refused(capsys):
    """With the horizon at step 10 of 200 the cool-down would drive the momentum to 0.28, -0.44 and
    -1.85 at steps 50, 100, 199."""
    hp, _ = parse_args(["--preset", "aurora_2860+tiny"])
    bad = dataclasses.replace(hp, momentum_horizon=10)
    assert train_gpt.momentum_at(199, bad) < 0  # what the check guards against
    err = refused(["--preset", "aurora_2860+tiny", "--momentum-horizon", "10", "--dry-run"], capsys)
    assert "the momentum schedule leaves [0.85, 0.95]" in err and "--momentum-horizon 10" in err, err
    parse_args(["--preset", "aurora_2860+tiny", "--momentum-horizon", "199"])  # ends at the last step: fine


def test_the_schedule_check_catches_a_negative_lr_by_itself():
    hp, _ = parse_args(["--preset", "aurora_2860+tiny"])
    with pytest.raises(ValueError, match=r"the lr schedule gives lr_head = -"):
        harness.check_schedules(dataclasses.replace(hp, power_c=(1e-5, -1e-7, 1e-6, 1e-6)))


def test_the_schedule_marks_hold_each_schedules_extremes_over_every_step():
    """check_schedules evaluates the schedules at schedule_marks only: over random configurations,
    their smallest and largest values there are those over every step."""
    rng = random.Random(0)
    base, _ = parse_args(["--preset", "aurora_2860+tiny"])
    for _ in range(300):
        steps = rng.randint(1, 60)
        hp = dataclasses.replace(
            base, train_steps=steps, lr_schedule=rng.choice(("linear", "power")),
            cooldown_frac=rng.choice((0.0, 0.3, 0.7, 1.0, rng.random())),
            schedule_steps=rng.randint(steps, steps + 20), momentum_warmup=rng.randint(0, 70),
            momentum_cooldown=rng.randint(0, 70), momentum_horizon=rng.choice((None, rng.randint(1, 80))),
            momentum_min=rng.uniform(0.1, 0.99), lr_power=rng.uniform(0.5, 2))
        groups = [dict(initial_lr=lr, power_c=c) for lr, c in zip((0.3, 0.003, 0.01, 0.04), hp.power_c)]
        for f in [lambda s: train_gpt.momentum_at(s, hp)] + [lambda s, g=g: train_gpt.lr_at(s, g, hp)
                                                              for g in groups]:
            every = [f(s) for s in range(steps)]
            marked = [f(s) for s in harness.schedule_marks(hp)]
            assert (min(marked), max(marked)) == (min(every), max(every)), hp


# --- settings that cannot act in this run -----------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--train-steps", "4", "--ref-gamma", "-0.075"],
     "--ref-gamma -0.075 never acts in this run of 4 steps: its first interpolated validation, ref_start 2850"),
    (["--preset", "tiny", "--train-steps", "4", "--val-extra", "100"], "step(s) 100 are after the last step 4"),
    (["--preset", "aurora_2890+tiny", "--ema-nesterov-start", "5", "--ema-nesterov-stop", "2"],
     "--ema-nesterov-start must be < --ema-nesterov-stop (2)"),
    (["--preset", "tiny", "--ema-nesterov", "0.3"], "--ema-nesterov 0.3 never acts in this run of 200 steps"),
    (["--preset", "aurora_2860+tiny", "--momentum-horizon", "300"], "--momentum-cooldown 7 never acts"),
    (["--preset", "tiny", "--soap-beta2", "0.8"], "--soap-beta2 has no effect without --soap mlp_v"),
    (["--preset", "tiny", "--ref-start", "100"], "--ref-start has no effect without --ref-gamma"),
    (["--preset", "tiny", "--schedule-steps", "300"], "--schedule-steps has no effect without --lr-schedule power"),
    (["--preset", "tiny", "--no-diagnostics", "--diag-tokens", "4096"], "--diag-tokens has no effect without"),
])
def test_a_flag_that_cannot_act_in_this_run_is_refused(argv, message, capsys):
    assert message in refused(argv + ["--dry-run"], capsys)


def test_a_flag_that_restates_the_presets_value_is_not_refused():
    """A record's reproduce command lists every value that differs from the trainer's defaults: for
    an ablation of a scaled preset (EMA-Nesterov off) that includes the window the preset gives."""
    hp, _ = parse_args(["--preset", "aurora_2860+tiny", "--ema-nesterov", "0", "--ema-nesterov-start", "21",
                        "--ema-nesterov-stop", "136", "--schedule-steps", "208"])
    preset, _ = parse_args(["--preset", "aurora_2860+tiny"])
    assert (hp.ema_nesterov_start, hp.ema_nesterov_stop, hp.schedule_steps) == (
        preset.ema_nesterov_start, preset.ema_nesterov_stop, preset.schedule_steps) == (21, 136, 208)
    with pytest.raises(SystemExit):  # another window: a change that does nothing
        parse_args(["--preset", "aurora_2860+tiny", "--ema-nesterov", "0", "--ema-nesterov-start", "22"])


def test_what_a_preset_set_and_this_run_makes_inert_is_said_in_the_header(capsys):
    """Scaled to 8 steps, aurora_2890's 27 extra validations are one step (the last), and its
    100-step momentum cool-down rounds to 0: the dry run and the log's header say so."""
    hp, _ = parse_args(["--preset", "aurora_2890+tiny", "--train-steps", "8"])
    assert hp.val_extra == (8,) and hp.momentum_cooldown == 0
    assert train_gpt.main(["--preset", "aurora_2890+tiny", "--train-steps", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == [
        "no effect in this run: momentum_cooldown: the preset's 100 steps round to 0 in this run of 8 steps (off)"]
    # a step, not a count: 0 is the first step (EMA-Nesterov from the start), not off
    assert train_gpt.main(["--preset", "aurora_2890+tiny", "--train-steps", "4", "--dry-run"]) == 0
    assert "ema_nesterov_start" not in capsys.readouterr().out
    # a technique a preset switched on whose steps lie beyond the run (no flag of it given)
    never = dataclasses.replace(parse_args(["--preset", "aurora_2860+tiny"])[0], ref_start=500, ref_capture=400)
    ctx = train_gpt.Context(0, 1, torch.device("cpu"), 16, 2)
    header = harness.setup_lines(never, train_gpt.setup_line(never, ctx)).splitlines()
    assert header[1] == ("no effect in this run: ref_gamma -0.075: its first interpolated validation, "
                         "ref_start 500, is after the last step 200"), header
    plain = parse_args(["--preset", "aurora_2860+tiny"])[0]
    assert harness.setup_lines(plain, train_gpt.setup_line(plain, ctx)).count("\n") == 0



# --- the frontier's settings (frontier.py) ------------------------------------------------------------

# The frontier's fields that switch a technique on (each acts whenever set: the trust gate, RowFloor
# and CWD need --soap-muon, which frontier.FRONTIER.check requires, and --aux-beta2 sets the betas of
# torch's AdamW as of the raw Adam); every other field acts only with one of them (harness.NEEDS).
FRONTIER_SWITCHES = {"soap_muon", "soap_trust_gate", "row_floor", "cwd", "scalar_adam", "aux_beta2",
                     "final_ema_blend", "tail_ema_readout"}


def test_every_frontier_field_is_a_switch_or_needs_one():
    import frontier
    fields = {f.name for f in dataclasses.fields(frontier.FrontierHyperparameters)}
    needs = {name for names, _, _ in harness.NEEDS for name in names}
    assert fields - FRONTIER_SWITCHES <= needs, fields - FRONTIER_SWITCHES - needs
    assert FRONTIER_SWITCHES <= fields and not FRONTIER_SWITCHES & needs


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--trust-floor-end", "1000"], "--trust-floor-end has no effect without --soap-trust-gate"),
    (["--preset", "soap_2690+tiny", "--no-soap-trust-gate", "--trust-fade-end", "100"],
     "--trust-fade-end has no effect without --soap-trust-gate"),
    (["--preset", "tiny", "--gain-split-pairs", "2"], "--gain-split-pairs has no effect without --gain-split > 0"),
    (["--preset", "tiny", "--final-ema-tau", "3"], "--final-ema-tau has no effect without --final-ema-blend > 0"),
    (["--preset", "tiny", "--final-ema-start", "3"], "--final-ema-start has no effect without --final-ema-blend"),
    (["--preset", "tiny", "--final-ema-step", "3"], "--final-ema-step has no effect without --final-ema-blend"),
    (["--preset", "soap_2720+tiny", "--final-ema-blend", "0", "--final-ema-tau", "3"],
     "--final-ema-tau has no effect without --final-ema-blend"),
    (["--preset", "tiny", "--tail-ema-tau", "3"], "--tail-ema-tau has no effect without --tail-ema-readout > 0"),
    (["--preset", "tiny", "--tail-ema-start", "3"], "--tail-ema-start has no effect without --tail-ema-readout"),
    (["--preset", "soap_2690+tiny", "--tail-ema-readout", "0", "--tail-ema-stop", "180"],
     "--tail-ema-stop has no effect without --tail-ema-readout"),
    (["--preset", "soap_2690+tiny", "--pp-iterations", "2"], "--pp-iterations has no effect without --rule aurora"),
    (["--preset", "soap_2690+tiny", "--pp-beta", "0.5"], "--pp-beta has no effect without --rule aurora"),
    (["--preset", "soap_2690+tiny", "--aurora-on", "nonsquare"], "--aurora-on has no effect without --rule aurora"),
    # switched on, but never acting in this run
    (["--preset", "soap_2690+tiny", "--gain-split-pairs", "5"],
     "--gain-split-pairs 5 never acts in this model of 4 blocks: it pairs the blocks from block 5 on, and the "
     "model's are 0..3 (n_layer 4): the signs are the plain gain split's. Change --gain-split-pairs, or its depth"),
    (["--preset", "tiny", "--gain-split", "0.1", "--gain-split-pairs", "4"], "--gain-split-pairs 4 never acts"),
    (["--preset", "soap_2720+tiny", "--final-ema-start", "200"],
     "--final-ema-blend 0.6 never acts in this run of 200 steps: its EMA begins after 200 steps (final_ema_start), "
     "at the blend's step 200: a copy of the weights, blended into themselves. Change --final-ema-start"),
    (["--preset", "soap_2720+tiny", "--final-ema-start", "50", "--final-ema-step", "50"],
     "Change --final-ema-start, --final-ema-step, or the run's length"),
    (["--preset", "soap_2720+tiny", "--final-ema-tau", "1"],
     "--final-ema-blend 0.6 never acts in this run of 200 steps: an EMA of time constant 1 (final_ema_tau)"),
    (["--preset", "soap_2690+tiny", "--tail-ema-start", "200"],
     "--tail-ema-readout 0.6 never acts in this run of 200 steps: its EMA would begin after 200 steps "
     "(tail_ema_start) and the run trains 200: at most a copy of the final weights. Change --tail-ema-start"),
    (["--preset", "soap_2690+tiny", "--tail-ema-stop", "166"],
     "its EMA would begin after 166 steps (tail_ema_start) and it stops from 166 (tail_ema_stop): it never exists"),
    (["--preset", "tiny", "--tail-ema-readout", "0.5", "--train-steps", "100"],  # its default start, 2400
     "--tail-ema-readout 0.5 never acts in this run of 100 steps"),
    (["--preset", "soap_2690+tiny", "--tail-ema-tau", "1"], "an EMA of time constant 1 (tail_ema_tau) is the weights"),
])
def test_a_frontier_flag_that_cannot_act_in_this_run_is_refused(argv, message, capsys):
    assert message in refused(argv + ["--dry-run"], capsys)


def test_a_frontier_presets_values_that_cannot_act_are_noted_in_the_header(capsys):
    """soap_2690 over 2 tiny steps: 4 blocks, none to pair from block 6; the readout's EMA would
    begin after the 2 steps. soap_2720 over 1 step: the blend's EMA begins at the blend. Without a
    flag of theirs given they run, and the dry run and the header say so; as the preset gives them
    at full length and depth, nothing is said."""
    assert train_gpt.main(["--preset", "soap_2690+tiny", "--train-steps", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == [
        "no effect in this run: gain_split_pairs 6: it pairs the blocks from block 6 on, and the model's are 0..3 "
        "(n_layer 4): the signs are the plain gain split's",
        "no effect in this run: tail_ema_readout 0.6: its EMA would begin after 2 steps (tail_ema_start) and the run "
        "trains 2: at most a copy of the final weights"], out
    assert train_gpt.main(["--preset", "soap_2720+tiny", "--train-steps", "1", "--dry-run"]) == 0
    assert ("no effect in this run: final_ema_blend 0.6: its EMA begins after 1 steps (final_ema_start), at the "
            "blend's step 1: a copy of the weights, blended into themselves") in capsys.readouterr().out
    hp, _ = parse_args(["--preset", "soap_2690+tiny", "--train-steps", "2"])
    ctx = train_gpt.Context(0, 1, torch.device("cpu"), 16, 2)
    header = harness.setup_lines(hp, train_gpt.setup_line(hp, ctx)).splitlines()
    assert [line.split(":")[1] for line in header[1:3]] == [" gain_split_pairs 6", " tail_ema_readout 0.6"]
    for preset in ("soap_2750", "soap_2720", "soap_2690"):
        assert harness.inert_notes(parse_args(["--preset", preset])[0]) == [], preset
    deep, _ = parse_args(["--preset", "soap_2690+tiny", "--n-layer", "8"])
    assert harness.inert_notes(deep) == []


def test_what_the_frontiers_notes_call_inert_is_inert(one_thread):
    """The claims behind the notes and refusals: the gain split's init with --gain-split-pairs at
    or beyond the model's depth, and a soap preset's with --gain-split 0, are bit for bit those
    without pairs; --aux-beta2 acts on torch's AdamW too (--scalar-adam torch), so needs no switch."""
    base, _ = parse_args(["--preset", "soap_2750+tiny", "--n-layer", "3", "--d-model", "32", "--head-dim", "8"])

    def init(changes, seed=3):  # (past the checks: what a preset may set)
        hp = dataclasses.replace(base, **changes)
        model = train_gpt.GPT(hp, torch.float32)
        torch.manual_seed(seed)
        if not train_gpt.choice(hp, "init_weights", model, hp):
            model.init_weights(hp.init_var)
        return [p.detach().clone() for p in model.parameters()] + [torch.rand(4)]  # and the generator after
    plain = init(dict(gain_split_pairs=0))
    for pairs in (3, 6):  # 3 blocks: none from block 3 (or 6) on
        assert all(torch.equal(a, b) for a, b in zip(init(dict(gain_split_pairs=pairs)), plain, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(init(dict(gain_split_pairs=2)), plain, strict=True))
    unsplit = init(dict(gain_split=0.0, gain_split_pairs=0))
    assert all(torch.equal(a, b) for a, b in zip(init(dict(gain_split=0.0)), unsplit, strict=True))
    hp, _ = parse_args(["--preset", "soap_2750+tiny", "--scalar-adam", "torch"])
    adam, _ = train_gpt.build_optimizers(train_gpt.GPT(hp, torch.float32), hp, torch.device("cpu"))
    assert [g["betas"][1] for g in adam.torch_adam.param_groups] == [0.99, 0.99, 0.99, 0.997, 0.9965]

# --- torchrun's environment --------------------------------------------------------------------------

@pytest.mark.parametrize("env, message", [
    (dict(WORLD_SIZE="0"), "WORLD_SIZE must be a positive integer"),
    (dict(WORLD_SIZE="-1"), "WORLD_SIZE must be a positive integer"),
    (dict(WORLD_SIZE="abc"), "WORLD_SIZE must be a positive integer"),
    (dict(WORLD_SIZE="2", RANK="2"), "RANK must be an integer from 0 to WORLD_SIZE-1 = 1, got 2"),
    (dict(RANK="-1"), "RANK must be an integer from 0 to WORLD_SIZE-1 = 0, got '-1'"),
    (dict(LOCAL_RANK="x"), "LOCAL_RANK must be an integer from 0 to WORLD_SIZE-1 = 0, got 'x'"),
])
def test_torchruns_variables_must_be_whole_numbers_in_range(env, message, monkeypatch, capsys):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert train_gpt.main(["--preset", "tiny", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {message}"), captured
    assert captured.err.count("\n") == 1
    with pytest.raises(ValueError, match=re.escape(message)):
        train_gpt.setup_distributed(parse_args(["--preset", "tiny"])[0])


# --- a log that cannot be started ------------------------------------------------------------------

def failing_open(monkeypatch, err, after=0):
    """harness's open(): a new log (<uuid>.txt, mode x) whose writes fail with `err` once `after`
    bytes are written, as on a disk that fills up; or that cannot be created (after=None)."""
    real_open = open

    class Filling(io.TextIOWrapper):
        written = 0

        def write(self, s):
            self.written += len(s)
            if self.written > after:
                super().write(s[:max(0, after - (self.written - len(s)))])
                self.flush()
                raise OSError(err, os.strerror(err))
            return super().write(s)

    def fake(path, mode="r", *args, **kwargs):
        if str(path).endswith(".txt") and mode == "x":
            if after is None:
                raise OSError(err, os.strerror(err), path)
            return Filling(real_open(path, "xb"), encoding="utf-8")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(harness, "open", fake, raising=False)


TINY = ["--preset", "tiny", "--n-layer", "1", "--d-model", "64", "--head-dim", "16", "--train-steps", "2",
        "--val-tokens", "4096", "--seed", "1"]


def test_a_full_disk_while_the_log_starts_is_one_line_and_leaves_nothing(data_dir, tmp_path, monkeypatch, capsys):
    failing_open(monkeypatch, errno.ENOSPC, after=50_000)  # inside the log's code part
    args = TINY + ["--data-dir", data_dir, "--records-dir", str(tmp_path), "--run-name", "full"]
    assert train_gpt.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot start this run's log in {tmp_path}{os.sep}") and "_full: " in err, err
    assert "No space left on device (the disk is full" in err and "is removed" in err, err
    assert os.listdir(tmp_path) == [".lock"]  # no record folder, no config.json, no partial log


def test_append_into_a_read_only_record_folder_is_refused_and_touches_nothing(data_dir, tmp_path, monkeypatch,
                                                                               capsys):
    args = TINY + ["--data-dir", data_dir, "--records-dir", str(tmp_path), "--run-name", "ro"]
    first, _ = parse_args(args)
    record_dir, log_path, log, _ = harness.open_record(first, lambda f, hp: f.write("a first run's log\n"))
    log.close()
    before = {p: open(p).read() for p in glob.glob(os.path.join(record_dir, "*"))}
    for err, words in ((errno.EROFS, "Read-only file system (a read-only file system"),
                       (errno.EACCES, "Permission denied (no permission to write there")):
        failing_open(monkeypatch, err, after=None)
        assert train_gpt.main(args + ["--append", "--seed", "2"]) == 2
        out = capsys.readouterr().err
        assert out.startswith(f"error: cannot start this run's log in {record_dir}: {words}"), out
        assert out.count("\n") == 1 and "Traceback" not in out
        assert {p: open(p).read() for p in glob.glob(os.path.join(record_dir, "*"))} == before
    # a write that fails inside an existing folder removes only this run's files
    failing_open(monkeypatch, errno.ENOSPC, after=10)
    assert train_gpt.main(args + ["--append", "--seed", "2"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p: open(p).read() for p in glob.glob(os.path.join(record_dir, "*"))} == before


def test_a_record_folder_path_that_is_a_file_is_named(data_dir, tmp_path, capsys):
    args = TINY + ["--data-dir", data_dir, "--records-dir", str(tmp_path), "--run-name", "afile"]
    hp, _ = parse_args(args)
    today = harness.datetime.datetime.now(harness.datetime.timezone.utc).strftime("%Y-%m-%d")
    (tmp_path / f"{today}_afile").write_text("not a folder")
    assert train_gpt.main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"error: the record folder {tmp_path / f'{today}_afile'} is a file, not a folder: move it "
                   "away, or choose another --run-name\n"), err


# --- a checkpoint on a full disk, the exit status of a signal ---------------------------------------

def test_a_checkpoint_write_on_a_full_disk_says_so(tmp_path):
    """torch.save reports a failed write of its file as its own RuntimeError ("[enforce fail at
    inline_container.cc:…] unexpected pos …"); the OSError it was raised in says why."""
    class FillingDisk:
        written = 0

        def write(self, b):
            self.written += len(b)
            if self.written > 100:  # the disk fills after the first bytes
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(b)

        def flush(self):
            pass
    with pytest.raises(RuntimeError) as caught:
        torch.save({"w": torch.zeros(1000)}, FillingDisk())
    assert "No space left" not in str(caught.value)
    assert harness.write_failure(caught.value) == "[Errno 28] No space left on device"
    assert harness.write_failure(RuntimeError("other")) == "other"


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_exits_with_128_plus_its_number(name, status, capsys):
    ctx = train_gpt.Context(rank=0, world=1, device=torch.device("cpu"), micro=1, accum=1)
    handlers = [harness.signal.getsignal(s) for s in (harness.signal.SIGTERM, harness.signal.SIGINT)]
    h = harness.Harness(parse_args(["--preset", "tiny"])[0], ctx, train_gpt.Logger(0))
    try:
        assert h.stopped(harness.Interrupted(name), None) == status
        assert h.stopped(FloatingPointError("nan"), None) == 1
    finally:
        h.close()
    assert [harness.signal.getsignal(s) for s in (harness.signal.SIGTERM, harness.signal.SIGINT)] == handlers
    capsys.readouterr()


def test_combinations_of_the_presets_all_pass_the_checks():
    """Every preset, alone and with +tiny, at its length and a few shorter ones, passes every check
    (the refusals above never hit what a preset sets)."""
    presets = [p for p in train_gpt.PRESETS if p != "tiny"]
    for preset, steps in itertools.product(presets + [p + "+tiny" for p in presets] + ["tiny"], (None, 1, 8, 50)):
        parse_args(["--preset", preset] + ([] if steps is None else ["--train-steps", str(steps)]))


def test_a_checkpoint_on_a_full_disk_is_logged_as_such(data_dir, tmp_path, monkeypatch):
    """The whole path: a run whose checkpoint writes fill the disk logs the OSError's words, not
    torch's "[enforce fail …]", and trains on."""
    real_save = torch.save

    def save_on_a_full_disk(obj, f):
        class Filling(io.RawIOBase):
            written = 0

            def write(self, b):
                self.written += len(b)
                if self.written > 100:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return f.write(b)
        real_save(obj, Filling())
    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    args = TINY + ["--data-dir", data_dir, "--records-dir", str(tmp_path), "--save-every", "1",
                   "--no-diagnostics", "--val-every", "2", "--val-every-late", "2"]
    assert train_gpt.main(args) == 0
    text = open(glob.glob(str(tmp_path / "*" / "*.txt"))[0]).read().split("=" * 100, 1)[1]  # after the code
    assert ("\ncheckpoint not written: step 1 of trial 0: [Errno 28] No space left on device; training goes on"
            in text), text[-1500:]
    assert "enforce fail" not in text and "\nstep:2/2 val_loss:" in text
