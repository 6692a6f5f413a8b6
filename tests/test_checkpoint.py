"""Checkpoints (--save-every) and resuming (--resume): a run killed after a checkpoint and resumed
is the uninterrupted run bit for bit (every val loss, the diagnostics), with 1 process and with 2
gloo ranks (resumed with 2 ranks and with 1), on the per-matrix and the batched Aurora paths, and
for a lineage preset (SOAP, EMA-Nesterov, the reference); its log stays one trial for the records
toolkit; a bad checkpoint or another configuration or code is refused before anything is written;
Aurora's state (the lineage's and the frontier's SOAP included) does not depend on the world size,
and a state that does not fit the optimizer is refused naming the matrix."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import frontier
import harness
import train_gpt
from conftest import free_port, gloo_rank, sigterm_during
from aurora_variants import VariantAurora as Aurora
from harness import aurora_state_dict, load_aurora_state_dict, owners
from lineage import LineageAurora
from tools import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on the CPU
# The tiny preset, smaller: 2 blocks of width 64, 8 steps, a validation every 2 steps on 2
# batches of tokens; seed 7 (a resume without --seed takes the checkpoint's).
UNSEEDED = ["--preset", "tiny", "--n-layer", "2", "--d-model", "64", "--head-dim", "16", "--train-steps", "8",
            "--val-every", "2", "--val-tokens", "8192", "--run-name", "ckpt"]
FLAGS = UNSEEDED + ["--seed", "7"]
VAL_LINE = re.compile(r"^step:(\d+)/\d+ val_loss:(\S+) train_time:(\S+)s ", re.M)
PER_MATRIX = ["--no-aurora-batched", "--trials", "2"]  # diagnostics on (the default)
BATCHED = ["--aurora-batched", "--no-diagnostics"]


def command(args, nproc):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return launcher + [os.path.join(ROOT, "train_gpt.py")] + args


def train(args, data_dir, records_dir, nproc=1):
    """A whole run (or a resumed one), which must succeed: gloo ranks in subprocesses, one process
    here (a process start costs seconds)."""
    args = FLAGS + ["--data-dir", data_dir, "--records-dir", str(records_dir)] + args
    if nproc == 1:
        assert train_gpt.main(args) == 0
        return
    proc = subprocess.run(command(args, nproc), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def the_log(records_dir):
    logs = glob.glob(str(records_dir / "*_ckpt" / "*.txt"))
    assert len(logs) == 1, logs
    return logs[0]


def descendants(pid):
    """The processes below `pid` (torchrun's workers run in sessions of their own)."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def wait_for(records_dir, marker, proc):
    """Until the run's log shows `marker` (the run must still be going)."""
    deadline = time.time() + 240
    while True:
        logs = glob.glob(str(records_dir / "*_ckpt" / "*.txt"))
        if logs and marker in open(logs[0]).read():
            return
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {marker!r}"
        assert time.time() < deadline, f"no {marker!r} after 240 s"
        time.sleep(0.005)


def start(args, data_dir, records_dir, nproc=1):
    out = open(records_dir.parent / f"{records_dir.name}.out", "w")
    return subprocess.Popen(command(FLAGS + ["--data-dir", data_dir, "--records-dir", str(records_dir)]
                                    + args, nproc), env=ENV, stdout=out, stderr=subprocess.STDOUT)


def kill_9_after(args, data_dir, records_dir, marker, nproc=1):
    """Start a run and kill -9 all its processes (the launcher and every rank: a node that dies)
    as soon as its log shows `marker`. The run must not have ended by itself. Returns the log."""
    proc = start(args, data_dir, records_dir, nproc)
    try:
        wait_for(records_dir, marker, proc)
    finally:
        for pid in descendants(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return the_log(records_dir)


def output_part(text):
    return text.split("\n" + "=" * 100 + "\n")[-1]


def val_lines(text):
    """(step, val loss) of every val line that counts (not those marked `lost: `)."""
    return [(int(m.group(1)), m.group(2)) for m in VAL_LINE.finditer(output_part(text))]


def checkpoint_of(log):
    return os.path.splitext(log)[0] + ".ckpt"


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The uninterrupted one-process runs to compare with, one per set of flags, run once per module."""
    done = {}

    def get(args):
        key = tuple(args)
        if key not in done:  # in this process: a process start costs seconds
            records_dir = tmp_path_factory.mktemp("uninterrupted")
            assert train_gpt.main(FLAGS + args + ["--data-dir", data_dir, "--records-dir", str(records_dir)]) == 0
            done[key] = open(the_log(records_dir)).read()
        return done[key]
    return get


def assert_one_trial_per_seed(log, trials):
    """The records toolkit reads the resumed log as `trials` complete trials, nothing incomplete."""
    runs = records.load_runs(log)
    screened = records.screen(runs)
    assert len(runs) == trials and [r["seed"] for r in runs] == [7 + t for t in range(trials)]
    assert all(r["complete"] for r in runs) and not screened["incomplete"], runs
    summary = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "records.py"), "summary",
                              os.path.dirname(log), "--json"], capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["n"] == trials


# --- bit for bit after a kill -9 ---

@pytest.mark.parametrize("path", [PER_MATRIX, BATCHED], ids=["per-matrix-2-trials", "batched"])
def test_kill_9_after_a_checkpoint_then_resume_is_the_uninterrupted_run(data_dir, tmp_path, uninterrupted, path,
                                                                        capsys):
    expected = uninterrupted(path)
    trials = 2 if "--trials" in path else 1
    # checkpoint at step 4; killed after the val line of step 6 (which the resumed run redoes)
    log = kill_9_after(path + ["--save-every", "4"], data_dir, tmp_path / "run", "step:6/8 val_loss")
    before = open(log).read()
    assert "checkpoint: step 4 of trial 0 saved to" in before and os.path.exists(checkpoint_of(log))
    assert "\nstep:6/8 val_loss" in before
    # resumed from anywhere (the records dir is this run's, not a flag's), here in this process
    capsys.readouterr()
    assert train_gpt.main(FLAGS + path + ["--save-every", "4", "--resume", checkpoint_of(log), "--data-dir", data_dir,
                                          "--records-dir", str(tmp_path / "elsewhere")]) == 0
    assert not os.path.exists(tmp_path / "elsewhere")  # nothing opened there
    text = open(log).read()
    assert text.startswith(before.split("checkpoint: step 4")[0])  # the log up to the checkpoint: as it was
    assert val_lines(text) == val_lines(expected)  # every val loss of every trial, exactly
    assert len(val_lines(text)) == 5 * trials
    ours, theirs = output_part(text), output_part(expected)
    assert re.findall(r"^diagnostics: .*$", ours, re.M) == re.findall(r"^diagnostics: .*$", theirs, re.M)
    assert re.findall(r"^final val losses: .*$", ours, re.M) == re.findall(r"^final val losses: .*$", theirs, re.M)
    assert re.search(r"^lost: step:6/8 val_loss:\S+ ", ours, re.M)  # kept, marked, not counted
    resumed = re.findall(r"^resumed: from (\S+) at step 4, trial 0 \(seed 7\): world_size 1 "
                         r"\(checkpoint: 1\).*marked 'lost:'", ours, re.M)
    assert resumed == [checkpoint_of(log)], ours[-3000:]
    assert [m for m in re.findall(r"^trial:(\d+)", ours, re.M)] == [str(t) for t in range(trials)]
    times = [float(m.group(3)) for m in VAL_LINE.finditer(ours.split("\ntrial:1 ")[0])]
    assert times == sorted(times) and len(times) == 5  # trial 0's train_time goes on from the checkpoint's
    if "--no-diagnostics" not in path:  # the diagnostics file: each (trial, step, layer) once, as uninterrupted
        jsonl = os.path.splitext(log)[0] + ".jsonl"
        expected_jsonl = glob.glob(os.path.join(os.path.dirname(the_log_of(expected)), "*.jsonl"))[0]
        assert open(jsonl).read() == open(expected_jsonl).read()
    assert not os.path.exists(checkpoint_of(log))  # the run is complete: no checkpoint left
    assert "checkpoint: removed" in capsys.readouterr().out
    assert_one_trial_per_seed(log, trials)


def the_log_of(text):
    return re.search(r"^log: (\S+)$", text, re.M).group(1)


def test_two_ranks_killed_resume_with_two_ranks_and_with_one(data_dir, tmp_path, uninterrupted):
    args = ["--no-aurora-batched", "--no-diagnostics"]
    expected = uninterrupted(args)  # 2 ranks train as 1 process (test_train, test_distributed)
    log = kill_9_after(args + ["--save-every", "4"], data_dir, tmp_path / "run", "step:6/8 val_loss", nproc=2)
    copy = tmp_path / "copy"
    shutil.copytree(os.path.dirname(log), copy / os.path.basename(os.path.dirname(log)))
    for nproc, ckpt in ((2, checkpoint_of(log)), (1, str(copy / os.path.relpath(checkpoint_of(log), tmp_path / "run")))):
        train(args + ["--save-every", "4", "--resume", ckpt], data_dir, tmp_path / "unused", nproc)
        resumed_log = os.path.splitext(ckpt)[0] + ".txt"  # found beside the checkpoint, even copied
        text = open(resumed_log).read()
        assert val_lines(text) == val_lines(expected), nproc
        assert f"world_size {nproc} (checkpoint: 2)" in text
        assert_one_trial_per_seed(resumed_log, 1)


def test_sigterm_saves_a_checkpoint_then_exits_and_resume_finishes_the_run(data_dir, tmp_path, uninterrupted,
                                                                           monkeypatch, capsys):
    expected = uninterrupted(BATCHED)
    records_dir = tmp_path / "run"
    args = BATCHED + ["--data-dir", data_dir, "--records-dir", str(records_dir)]
    sigterm_during(monkeypatch, 3)
    assert train_gpt.main(FLAGS + args + ["--save-every", "100"]) == 143  # only SIGTERM saves; 128 + 15
    monkeypatch.undo()
    log = the_log(records_dir)
    text = open(log).read()
    assert re.search(r"^interrupted: SIGTERM at step 3, trial 0 \(seed 7\)$", text, re.M), text[-2000:]
    assert f"checkpoint: step 3 of trial 0 saved to {checkpoint_of(log)}" in text
    assert f"continue with the same flags and --resume {checkpoint_of(log)}" in capsys.readouterr().err
    # --save-every 0: no more checkpoints; no --seed: the checkpoint's
    assert train_gpt.main(UNSEEDED + args + ["--resume", checkpoint_of(log)]) == 0
    text = open(log).read()
    assert val_lines(text) == val_lines(expected)
    assert not re.search(r"^lost: ", text, re.M)  # nothing after the checkpoint to redo
    assert_one_trial_per_seed(log, 1)


def test_sigterm_to_one_rank_stops_both_at_one_step_with_a_checkpoint(data_dir, tmp_path, uninterrupted):
    args = ["--no-aurora-batched", "--no-diagnostics"]
    expected = uninterrupted(args)  # 2 ranks train as 1 process (test_train, test_distributed)
    records_dir = tmp_path / "run"
    proc = start(args + ["--save-every", "100"], data_dir, records_dir, nproc=2)
    wait_for(records_dir, "step:3/8 train_loss", proc)
    workers = {open(f"/proc/{pid}/environ").read().split("\0").count("RANK=1"): pid
               for pid in descendants(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)  # rank 1 only: rank 0 learns it at the next step boundary
    assert proc.wait(timeout=120) != 0
    log = the_log(records_dir)
    text = open(log).read()
    stopped = re.search(r"^interrupted: SIGTERM at step (\d+), trial 0 \(seed 7\)$", text, re.M)
    assert stopped and f"checkpoint: step {stopped.group(1)} of trial 0 saved to" in text, text[-2000:]
    train(args + ["--resume", checkpoint_of(log)], data_dir, records_dir)  # one rank finishes it
    assert val_lines(open(log).read()) == val_lines(expected)
    assert_one_trial_per_seed(log, 1)


# The aurora_2860 preset at the smallest sizes, 14 steps, its state all in play around step 11: SOAP
# refreshes its bases every 4 steps (at step 12, after the resume), EMA-Nesterov's look-ahead runs
# to the end, the reference is captured after step 8 and interpolated at the step-14 validation.
LINEAGE = ["--preset", "aurora_2860+tiny", "--n-layer", "1", "--d-model", "64", "--head-dim", "16",
           "--train-steps", "14", "--val-every", "2", "--val-every-late", "2", "--val-tokens", "4096",
           "--seed", "0", "--no-diagnostics", "--soap-every", "4", "--ema-nesterov-stop", "14",
           "--ref-capture", "8", "--run-name", "ckpt"]


def test_a_lineage_run_stopped_by_sigterm_resumes_as_the_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    """SOAP's statistics, EMA-Nesterov's state and the reference weights come back from the
    checkpoint: every val loss after the resume is the uninterrupted run's."""
    def run(args, name):
        return train_gpt.main(LINEAGE + args + ["--data-dir", data_dir, "--records-dir", str(tmp_path / name)])

    assert run([], "whole") == 0
    expected = open(the_log(tmp_path / "whole")).read()
    sigterm_during(monkeypatch, 11)  # the checkpoint of step 11, then the stop
    assert run(["--save-every", "100"], "run") == 143
    monkeypatch.undo()
    log = the_log(tmp_path / "run")
    assert "checkpoint: step 11 of trial 0 saved to" in open(log).read()
    assert run(["--save-every", "100", "--resume", checkpoint_of(log)], "run") == 0
    resumed = val_lines(open(log).read())
    assert [s for s, _ in resumed] == list(range(2, 15, 2)) and resumed == val_lines(expected)


# The soap presets at the smallest sizes, 8 steps, SOAP refreshed after every step, the trust
# gate's floor ending at step 4 (scaled); stopped after step 5 (soap_2690: its readout's EMA from
# step 3) or 7 (soap_2720: the blend's EMA from step 6, the blend at step 8, after the resume).
FRONTIER = ["--n-layer", "1", "--d-model", "64", "--head-dim", "16", "--train-steps", "8", "--val-every", "2",
            "--val-every-late", "2", "--val-tokens", "4096", "--seed", "0", "--no-diagnostics", "--run-name", "ckpt"]


@pytest.mark.parametrize("preset, flags, stop", [
    ("soap_2690", ["--tail-ema-start", "3", "--tail-ema-tau", "2"], 5),
    ("soap_2720", ["--final-ema-tau", "2"], 7)])
def test_a_frontier_run_stopped_by_sigterm_resumes_as_the_uninterrupted_run(data_dir, tmp_path, monkeypatch,
                                                                             preset, flags, stop):
    """The frontier's state comes back from the checkpoint (each matrix's momentum and SOAP
    statistics and bases, the raw Adam's and torch's AdamW's moments, the tail EMA): every val
    line after the resume (val_loss, and val_ema_loss) and the blend are the uninterrupted run's."""
    def run(args, name):
        return train_gpt.main(["--preset", preset + "+tiny", *FRONTIER, *flags, *args, "--data-dir", data_dir,
                               "--records-dir", str(tmp_path / name)])

    def val_and_ema_lines(text):  # (the lines marked lost: ... after the checkpoint do not count)
        return [line.split(" train_time:")[0] for line in output_part(text).splitlines()
                if re.match(r"step:\d+/\d+ val_loss:", line) or line.startswith("tail_ema ")]

    assert run([], "whole") == 0
    expected = val_and_ema_lines(open(the_log(tmp_path / "whole")).read())
    sigterm_during(monkeypatch, stop)
    assert run(["--save-every", "100"], "run") == 143
    monkeypatch.undo()
    log = the_log(tmp_path / "run")
    assert f"checkpoint: step {stop} of trial 0 saved to" in open(log).read()
    assert run(["--save-every", "100", "--resume", checkpoint_of(log)], "run") == 0
    resumed = val_and_ema_lines(open(log).read())
    assert resumed == expected and resumed[-1].startswith("step:8/8 val_loss:"), (resumed, expected)
    assert any(line.startswith("tail_ema ") for line in resumed)
    assert ("val_ema_loss:" in resumed[-1]) == (preset == "soap_2690")
    assert ("tail_ema applied step:8 tau:2 lambda:0.6" in resumed) == (preset == "soap_2720")


# --- refused before anything is written ---

@pytest.fixture(scope="module")
def killed_run(data_dir, tmp_path_factory):
    """A record folder whose run was killed right after its checkpoint of step 2."""
    records_dir = tmp_path_factory.mktemp("killed") / "records"
    log = kill_9_after(BATCHED + ["--save-every", "2"], data_dir, records_dir, "checkpoint: step 2 ")
    return os.path.dirname(log)


@pytest.fixture
def folder(killed_run, tmp_path):
    """A copy of the killed run's folder: (log, checkpoint, listing and contents before)."""
    copy = str(tmp_path / os.path.basename(killed_run))
    shutil.copytree(killed_run, copy)
    log = glob.glob(os.path.join(copy, "*.txt"))[0]
    return log, checkpoint_of(log), snapshot(copy)


def snapshot(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def resume_in_process(args, data_dir, tmp_path, ckpt):
    return train_gpt.main(FLAGS + BATCHED + ["--data-dir", data_dir, "--records-dir", str(tmp_path / "r"),
                                             "--resume", ckpt] + args)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a whole checkpoint of train_gpt.py"),
    ("zero a block", "fails its checksum"),
    ("garbage", "not a whole checkpoint of train_gpt.py"),
    ("another torch file", "it lacks config, code"),
    ("missing", "no such file"),
    ("a folder", "a folder; --resume takes a checkpoint file"),
])
def test_a_damaged_checkpoint_is_refused_and_nothing_is_written(data_dir, tmp_path, folder, capsys, damage, message):
    log, ckpt, before = folder
    raw = open(ckpt, "rb").read()
    if damage == "truncate":
        open(ckpt, "wb").write(raw[:len(raw) * 2 // 3])
    elif damage == "zero a block":  # inside the tensor data: torch.load alone would not notice
        open(ckpt, "wb").write(raw[:len(raw) // 2] + bytes(4096) + raw[len(raw) // 2 + 4096:])
    elif damage == "garbage":
        open(ckpt, "wb").write(b"not a checkpoint\n" * 100)
    elif damage == "another torch file":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    elif damage == "a folder":
        ckpt = os.path.dirname(ckpt)
    else:
        os.remove(ckpt)
    before = snapshot(os.path.dirname(log))
    assert resume_in_process([], data_dir, tmp_path, ckpt) == 2
    err = capsys.readouterr().err
    assert f"error: --resume {ckpt}: " in err and message in err, err
    if damage not in ("missing", "a folder"):
        assert "resume from an intact copy" in err
    assert snapshot(os.path.dirname(log)) == before and not os.path.exists(tmp_path / "r")


def test_another_configuration_or_code_is_refused_and_nothing_is_written(data_dir, tmp_path, folder, capsys,
                                                                        monkeypatch):
    log, ckpt, before = folder
    for args, message in ((["--lr-matrix", "0.04"], 'lr_matrix 0.0375 (checkpoint) vs 0.04'),
                          (["--trials", "2"], "trials 1 (checkpoint) vs 2"),
                          (["--seed", "5"], "seed 7 (checkpoint) vs 5"),
                          (["--no-aurora-batched"], "aurora_batched true (checkpoint) vs false")):
        assert resume_in_process(args, data_dir, tmp_path, ckpt) == 2
        err = capsys.readouterr().err
        assert "configuration differs from the checkpoint's in " + message in err, err
        assert "Resume with the flags of the run that wrote it" in err
    source = harness.code_part  # the run's code part (it depends on the run's flags), edited
    monkeypatch.setattr(harness, "code_part", lambda hp: source(hp).replace("init_var: float", "init_var:  float"))
    assert resume_in_process([], data_dir, tmp_path, ckpt) == 2
    err = capsys.readouterr().err
    assert re.search(r"the code differs .* first at line \d+ of the one-file source: '    init_var: float", err), err
    monkeypatch.undo()
    assert snapshot(os.path.dirname(log)) == before and not os.path.exists(tmp_path / "r")


def test_a_checkpoint_without_its_log_is_refused(data_dir, tmp_path, folder, capsys):
    log, ckpt, _ = folder
    with open(log, "r+") as f:  # a log that is not the one the checkpoint continues
        f.truncate(1000)
    assert resume_in_process([], data_dir, tmp_path, ckpt) == 2
    assert "fewer than the" in capsys.readouterr().err
    state = torch.load(ckpt)  # a log neither beside the checkpoint nor where the run wrote it
    state["log"] = str(tmp_path / "gone" / os.path.basename(log))
    torch.save(state, ckpt)
    os.remove(log)
    before = snapshot(os.path.dirname(log))
    assert resume_in_process([], data_dir, tmp_path, ckpt) == 2
    assert "keep the record folder together" in capsys.readouterr().err
    assert snapshot(os.path.dirname(log)) == before and not os.path.exists(tmp_path / "r")



def test_a_checkpoint_being_resumed_is_not_resumed_again(data_dir, tmp_path, folder, capsys):
    log, ckpt, _ = folder
    _, _, first, _, _ = harness.reopen_record(ckpt, harness.load_checkpoint(ckpt))  # a resume going on
    try:
        before = snapshot(os.path.dirname(log))
        assert resume_in_process([], data_dir, tmp_path, ckpt) == 2
        err = capsys.readouterr().err
        assert f"--resume {ckpt}: the checkpoint is being resumed, or its run still goes on, in another " \
               f"process (process {os.getpid()}): it holds {log}" in err, err
        assert snapshot(os.path.dirname(log)) == before
    finally:
        first.close()  # that run ends (or dies): the checkpoint can be resumed again
    assert "\nresumed: " not in open(log).read()


def test_a_copied_checkpoint_resumes_only_the_log_beside_it(data_dir, tmp_path, killed_run, folder, capsys):
    log, ckpt, _ = folder  # a copy of killed_run's folder, whose checkpoint names the original's log
    original = snapshot(killed_run)
    os.rename(log, tmp_path / "moved.txt")
    before = snapshot(os.path.dirname(log))
    assert resume_in_process([], data_dir, tmp_path, ckpt) == 2
    err = capsys.readouterr().err
    assert f"its run's {os.path.basename(log)} is not beside it in {os.path.dirname(log)}" in err, err
    assert snapshot(os.path.dirname(log)) == before and snapshot(killed_run) == original


def test_a_log_edited_before_the_checkpoint_is_refused(data_dir, tmp_path, folder, capsys):
    log, ckpt, _ = folder
    text = open(log, "rb").read()
    open(log, "wb").write(b"# a note\n" + text)  # one line more at the top: the size alone would pass
    before = snapshot(os.path.dirname(log))
    assert resume_in_process([], data_dir, tmp_path, ckpt) == 2
    err = capsys.readouterr().err
    assert f"the first {harness.load_checkpoint(ckpt)['log_bytes']:,} bytes of {log} differ from what it " \
           "held when the checkpoint was written" in err, err
    assert snapshot(os.path.dirname(log)) == before


def test_a_write_that_dies_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "run.ckpt")
    harness.write_atomic(path, lambda f: torch.save({"step": 4}, f))

    def dies(f):  # a kill or a full disk in the middle of the write
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        harness.write_atomic(path, dies)
    assert torch.load(path) == {"step": 4} and os.listdir(tmp_path) == ["run.ckpt"]
    monkeypatch.setattr(os, "replace", lambda *a: os.kill(os.getpid(), 0) or (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        harness.write_atomic(path, lambda f: torch.save({"step": 8}, f))
    assert torch.load(path) == {"step": 4} and os.listdir(tmp_path) == ["run.ckpt"]


# --- Aurora's state: one form for every world size and path ---

# The frontier's rule with every switch on: soap_2690's RowFloor and Cautious Weight Decay, the
# aurora_proj modifier; the trust gate held in [0.9, 0.95] for 3 steps, then free (its 4th step's
# gate, about 0.84, needs the step index a resume sets).
FRONTIER_RULE = dict(frontier.RULE, row_floor=True, cwd=0.025, aurora_on="wide_only", trust_floor=0.9,
                     trust_cap=0.95, trust_floor_end=2, trust_fade_end=3)


FRONTIER_KINDS = ("mlp", "attn_proj", "plain", "attn")  # what SOAP does with each matrix (frontier.SOAP_KIND)


def frontier_aurora(params, kinds, lr=0.02):
    """FrontierAurora under FRONTIER_RULE, the matrices of the given kinds (attn's with attn.v's options)."""
    matrices = {p: (kind, dict(blend=0.95, floor=0.55) if kind == "attn" else {}) for p, kind in zip(params, kinds)}
    return frontier.FrontierAurora(params, lr=lr, matrices=matrices, matrix_rule=FRONTIER_RULE, soap_every=1,
                                   soap_beta2=0.95, ns_dtype="float32", rule="aurora", aurora_on="wide_only",
                                   pp_iterations=3, pp_beta=0.25)


def optimizer(params, batched, rule, lr=0.02):
    """Aurora on the 4 matrices; rule "soap": the lineage's rule with SOAP on two of them (one with
    attn.v's options), its bases refreshed every 3rd step; rule "frontier": the frontier's matrix
    rule, SOAP refreshed every step on three of them (attn.proj's trust gate, attn.v's options),
    the third plain."""
    if rule == "frontier":
        return frontier_aurora(params, FRONTIER_KINDS, lr)
    if rule == "soap":
        soap = {params[0]: {}, params[3]: dict(blend=0.95, floor=0.55, renorm="scale")}
        return LineageAurora(params, lr=lr, ns_dtype="float32", soap=soap, soap_every=3)
    return Aurora(params, lr=lr, batched=batched, rule=rule, ns_dtype="float32")


def stepped(batched, rule, steps, state=None):
    """optimizer() after `steps` steps of seeded gradients."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((24, 8), (8, 8), (24, 8), (8, 24))]
    opt = optimizer(params, batched, rule)
    if state is not None:
        load_aurora_state_dict(opt, state)
    grads = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads)
        opt.step()
    return params, opt


COMBINATIONS = [(batched, rule) for rule in ("aurora", "normuon") for batched in (False, True)] + [(False, "soap")]
SOAP_KEYS = {"soap_exp_avg_sq", "soap_L", "soap_R", "soap_QL", "soap_QR", "soap_count"}
RANKED = COMBINATIONS + [(False, "frontier")]  # through 2 ranks: the frontier's matrix rule too


@pytest.mark.parametrize("batched, rule", COMBINATIONS)
def test_aurora_state_dict_round_trip_continues_bit_for_bit(batched, rule):
    """3 steps, then the 4th from the saved state equals the 4th of the original (for SOAP the
    4th step refreshes the bases: its count must come back too)."""
    params, opt = stepped(batched, rule, 3)
    state = aurora_state_dict(opt)
    keys = {"momentum", "row_v"} if rule == "normuon" else {"momentum"}
    assert sorted(state["state"]) == [0, 1, 2, 3]
    assert [set(s) for s in state["state"].values()] == (
        [keys | SOAP_KEYS, keys, keys, keys | SOAP_KEYS] if rule == "soap" else [keys] * 4)
    assert all(t.device.type == "cpu" and t.dtype == (torch.int64 if k == "soap_count" else torch.float32)
               for s in state["state"].values() for k, t in s.items())
    for p, s in zip(params, state["state"].values()):
        assert torch.equal(s["momentum"], opt.state[p]["momentum"])
        assert s["momentum"].untyped_storage().data_ptr() != opt.state[p]["momentum"].untyped_storage().data_ptr()
    assert state["param_groups"][0]["params"] == [0, 1, 2, 3] and state["param_groups"][0]["lr"] == 0.02
    # continue the original, and a fresh optimizer from the state, one more step on the same gradients
    ahead = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    fresh = [torch.nn.Parameter(a) for a in ahead]
    if rule == "soap":
        assert int(state["state"][0]["soap_count"]) == 3
    other = optimizer(fresh, batched, rule, lr=0.5)
    load_aurora_state_dict(other, state)
    assert other.param_groups[0]["lr"] == 0.02  # the saved hyperparameters
    for p in fresh:
        p.grad = torch.ones_like(p)
    other.step()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))


def test_aurora_state_is_the_same_for_both_paths_and_refuses_a_misfit():
    _, per_matrix = stepped(False, "aurora", 2)
    _, batched = stepped(True, "aurora", 2)
    a, b = aurora_state_dict(per_matrix), aurora_state_dict(batched)
    assert sorted(a["state"]) == sorted(b["state"]) == [0, 1, 2, 3]
    assert all(set(s) == {"momentum"} for s in b["state"].values())  # no *_stack: world-size free
    for i in a["state"]:  # momentum does not depend on the path
        assert torch.equal(a["state"][i]["momentum"], b["state"][i]["momentum"])
    torch.manual_seed(0)
    wrong = Aurora([torch.nn.Parameter(torch.randn(24, 8))], lr=0.02)
    with pytest.raises(ValueError, match="saved groups hold"):
        load_aurora_state_dict(wrong, a)
    transposed = Aurora([torch.nn.Parameter(torch.randn(*s)) for s in ((8, 24), (8, 8), (24, 8), (8, 24))], lr=0.02)
    with pytest.raises(ValueError, match=r"matrix 0 \(\(8, 24\)\) has saved 'momentum' of shape \(24, 8\)"):
        load_aurora_state_dict(transposed, a)
    soap_params, soap = stepped(False, "soap", 1)
    with pytest.raises(ValueError, match=r"matrix 0 \(\(24, 8\)\) has saved SOAP state, and this optimizer does not"):
        load_aurora_state_dict(optimizer(soap_params, False, "aurora"), aurora_state_dict(soap))
    with pytest.raises(ValueError, match=r"matrix 0 \(\(24, 8\)\) has no saved SOAP state, and this optimizer runs"):
        load_aurora_state_dict(optimizer(soap_params, False, "soap"), a)


@pytest.mark.parametrize("kinds, edits, message", [
    (("mlp", "attn_proj", "mlp", "attn"), {},
     r"matrix 2 \(\(24, 8\)\) has no saved SOAP state, and this optimizer runs SOAP on it"),
    (("plain", "attn_proj", "plain", "attn"), {},
     r"matrix 0 \(\(24, 8\)\) has saved SOAP state, and this optimizer does not run SOAP on it"),
    (FRONTIER_KINDS, {(3, "soap_L"): torch.zeros(24, 24)},
     r"matrix 3 \(\(8, 24\)\) has saved 'soap_L' of shape \(24, 24\)"),
    (FRONTIER_KINDS, {(1, "soap_QR"): None, (1, "soap_count"): None},
     r"matrix 1 \(\(8, 8\)\) has saved SOAP state without soap_QR, soap_count")],
    ids=["soap_not_saved", "soap_saved_for_a_plain_matrix", "soap_shape", "soap_incomplete"])
def test_the_frontier_refuses_a_state_whose_soap_does_not_fit(kinds, edits, message):
    """A checkpoint of the frontier's rule resumes only under the same rule matrix by matrix: SOAP's
    state, whole and in its shapes, where SOAP runs and nowhere else; else a ValueError naming the
    matrix (no KeyError later, no SOAP state silently dropped). `edits`: {(matrix, key): a saved
    tensor replaced, or None: left out}."""
    params, opt = stepped(False, "frontier", 2)
    state = aurora_state_dict(opt)
    for (i, key), value in edits.items():
        if value is None:
            del state["state"][i][key]
        else:
            state["state"][i][key] = value
    with pytest.raises(ValueError, match=message):
        load_aurora_state_dict(frontier_aurora(params, kinds), state)


def _rank(rank, port, out_dir):
    """One of 2 gloo ranks, for each (batched, rule): the state of 3 steps, gathered; then one
    step from a world-1 state. (One process group for all of them: spawning costs seconds.)"""
    with gloo_rank(rank, 2, port):
        for batched, rule in RANKED:
            _, opt = stepped(batched, rule, 3)
            gathered = aurora_state_dict(opt)  # collective: every rank gets every matrix's state
            reference = torch.load(os.path.join(out_dir, f"reference_{batched}_{rule}.pt"))
            params = [torch.nn.Parameter(w.clone()) for w in reference["weights"]]
            opt = optimizer(params, batched, rule)
            load_aurora_state_dict(opt, reference["state"])
            opt.step_index = 3  # as a resume sets it (the trust gate's bounds follow the step)
            held = sorted(i for i, p in enumerate(params) if opt.state[p])
            for p, g in zip(params, reference["grads"]):
                p.grad = g.clone()
            opt.step()
            torch.save(dict(gathered=gathered, held=held, weights=[p.detach() for p in params],
                            after=aurora_state_dict(opt)), os.path.join(out_dir, f"rank{rank}_{batched}_{rule}.pt"))


def test_aurora_state_with_two_ranks_is_the_one_rank_state(tmp_path):
    """state_dict() gathers each matrix from the rank that updates it; load_state_dict() gives each
    rank the matrices it updates (harness.owners): a world-1 state continues on 2 ranks as on 1, on both
    paths, for Aurora and NorMuon, for the lineage's rule with SOAP, and for the frontier's rule
    (FrontierAurora: SOAP with the trust gate, a plain matrix, RowFloor, CWD, aurora_proj)."""
    torch.set_num_threads(1)
    expected = {}
    for batched, rule in RANKED:
        params, opt = stepped(batched, rule, 3)
        state = aurora_state_dict(opt)
        grads = [torch.randn(p.shape) for p in params]
        torch.save(dict(state=state, weights=[p.detach().clone() for p in params], grads=grads),
                   tmp_path / f"reference_{batched}_{rule}.pt")
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        expected[batched, rule] = params, opt, state, aurora_state_dict(opt)
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for (batched, rule), (params, opt, state, after) in expected.items():
        ranks = [torch.load(tmp_path / f"rank{r}_{batched}_{rule}.pt") for r in range(2)]
        owned = owners(opt, opt.param_groups[0], 2)
        if rule == "frontier":  # SOAP's state where SOAP runs (not on the plain matrix 2)
            assert [set(s) for s in state["state"].values()] == [{"momentum"} | SOAP_KEYS] * 2 + [
                {"momentum"}, {"momentum"} | SOAP_KEYS]
        for r, got in enumerate(ranks):
            for which, want in (("gathered", state), ("after", after)):
                assert sorted(got[which]["state"]) == sorted(want["state"])
                for i, keys in want["state"].items():
                    for key, value in keys.items():
                        assert torch.equal(got[which]["state"][i][key], value), (batched, rule, which, i, key)
            assert got["held"] == [i for i, o in enumerate(owned) if o == r]  # its share only
            for w, p in zip(got["weights"], params):  # per matrix: the same computation; batched:
                assert torch.equal(w, p) if not batched else torch.allclose(w, p, rtol=0, atol=1e-6)
