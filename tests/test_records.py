"""tools/records.py: parsing every log variant, the statistics, compare, plot, diff, submit,
errors, CLI."""
import contextlib
import io
import json
import math
import os
import random
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from tools import records
from tools.compare import diff_records
from tools.logs import RecordsError, load_runs, parse_log, read_log
from tools.parents import PUBLISHED
from tools.plots import plot_records
from tools.stats import compare, pass_probability, summarize, trials_needed
from tools.submit import submit
from tools.summary import summary_of, write_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The published record's output: the in-repo copy (always there), and the shared file it was
# copied from (only where the workspace has it).
REFERENCE = os.path.join(ROOT, "records", "published_aurora_3175", "track3_aurora_3175_n20.txt")
SHARED_REFERENCE = os.path.join(ROOT, "..", "shared", "reference-logs", "track3_aurora_3175_n20.txt")
CLI = [sys.executable, os.path.join(ROOT, "tools", "records.py")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CODE = '''import os
print(f"step:{step}/{total} val_loss:{val_loss:.5f} train_time:{t:.3f}s")
step:1/2 val_loss:9.9 train_time:0.0s step_avg:0ms
trial:0 seed:999
'''  # decoys inside the code: a val line at line start and a seed line


def val(step, loss, total=100, extra=""):
    return f"step:{step}/{total} val_loss:{loss:.5f} train_time:{step * 0.1:.3f}s step_avg:100.00ms{extra}"


def write(path, lines, code=CODE):
    """A log like ours: code, '=' line, header, '=' line, output."""
    path.write_text(code + "=" * 100 + "\nheader: torch 2.x\n" + "=" * 100 + "\n" + "\n".join(lines) + "\n")
    return str(path)


def cli(*args, cwd=None):
    """The command line: in this process (fast), or as its own process when `cwd` is given."""
    argv = [str(a) for a in args]
    if cwd is not None:
        return subprocess.run(CLI + argv, capture_output=True, text=True, cwd=cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = records.main(argv)
        except SystemExit as e:  # argparse's usage errors
            rc = e.code
    return subprocess.CompletedProcess(CLI + argv, rc, out.getvalue(), err.getvalue())


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------

def test_code_prefix_decoys_progress_lines_extra_fields_and_nan_step_avg(tmp_path):
    path = write(tmp_path / "a.txt", [
        "step:0/100 val_loss:10.82584 train_time:0.000s step_avg:nanms",
        "step:1/100 train_loss:10.8 train_time:1.0s step_avg:1000.00ms",  # progress: ignored
        val(50, 4.0, extra=" ema_beta:0 ref_gamma:-0.075"),
        val(100, 3.5)])
    (trial,) = parse_log(path)
    assert trial["steps"] == [0, 50, 100] and trial["losses"] == [10.82584, 4.0, 3.5]
    assert trial["total_steps"] == 100 and trial["seed"] is None and trial["trial"] == 0
    assert trial["source"] == path and math.isclose(trial["train_time"][1], 5.0)


def test_file_without_separator_is_read_whole(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("some header\n" + val(0, 10.8) + "\n" + val(100, 3.5) + "\n")
    assert parse_log(str(path))[0]["losses"] == [10.8, 3.5]


def test_file_starting_with_separator(tmp_path):  # the reference log's layout
    path = tmp_path / "upstream.txt"
    path.write_text("=" * 100 + "\nRunning PyTorch\n" + "=" * 100 + "\n" + val(0, 10.8) + "\n")
    assert parse_log(str(path))[0]["steps"] == [0]


def test_multi_trial_file_without_step_zero_and_seed_lines(tmp_path):
    path = write(tmp_path / "a.txt", [
        "trial:0 seed:7 lr:0.1", val(125, 4.0, total=250), val(250, 3.5, total=250),
        "trial:1 seed:8", val(125, 4.1, total=250), val(250, 3.6, total=250),
        val(125, 4.2, total=250), val(250, 3.7, total=250)])  # a third trial with no seed line: step went back
    trials = parse_log(path)
    assert [t["seed"] for t in trials] == [7, 8, None]
    assert [t["trial"] for t in trials] == [0, 1, 2]
    assert [t["steps"] for t in trials] == [[125, 250]] * 3
    assert [t["losses"][-1] for t in trials] == [3.5, 3.6, 3.7]
    assert all(t["complete"] for t in trials)


def test_seed_line_starts_a_trial_even_if_the_step_increases(tmp_path):
    # trial 0 stopped at step 100; trial 1's first val line is at 125
    path = write(tmp_path / "a.txt", ["trial:0 seed:1", val(0, 10.8, 250), val(100, 4.0, 250),
                                      "trial:1 seed:2", val(125, 3.9, 250), val(250, 3.5, 250)])
    assert [(t["seed"], t["steps"]) for t in parse_log(path)] == [(1, [0, 100]), (2, [125, 250])]


def test_one_file_per_seed_directory_and_other_metric(tmp_path):
    for i, loss in enumerate([3.2, 3.3]):
        write(tmp_path / f"seed{i}.txt", [val(100, loss + 1, extra=f" val_ema_loss:{loss:.5f}")])
    (tmp_path / "notes.md").write_text("not a log")
    runs = load_runs([str(tmp_path)])
    assert [r["losses"] for r in runs] == [[4.2], [4.3]]
    assert [os.path.basename(r["source"]) for r in runs] == ["seed0.txt", "seed1.txt"]
    runs = load_runs(str(tmp_path), metric="val_ema_loss")  # a single path works too
    assert [r["losses"] for r in runs] == [[3.2], [3.3]]
    data = json.loads(cli("summary", tmp_path, "--metric", "val_ema_loss", "--json").stdout)
    assert data["n"] == 2 and math.isclose(data["mean"], 3.25)


def test_files_and_directories_mixed(tmp_path):
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "1.txt", [val(100, 3.3)])
    write(tmp_path / "d" / "2.txt", [val(100, 3.3), val(100, 3.2)])  # two trials
    single = write(tmp_path / "x.txt", [val(100, 3.1)])
    assert [r["losses"][0] for r in load_runs([str(tmp_path / "d"), single])] == [3.3, 3.3, 3.2, 3.1]


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

def test_statistics_by_hand(tmp_path):
    losses = {100: [3.30, 3.31, 3.29, 3.30], 200: [3.279, 3.275, 3.277, 3.273]}
    for i in range(4):
        write(tmp_path / f"{i}.txt", [f"trial:0 seed:{i}"] + [val(s, losses[s][i], total=200) for s in (100, 200)])
    s = summarize(load_runs([str(tmp_path)]))
    assert s["n"] == 4 and s["steps"] == [100, 200] and s["seeds"] == [0, 1, 2, 3]
    row = s["per_step"][1]
    assert math.isclose(row["mean"], 3.276)  # (3.279 + 3.275 + 3.277 + 3.273) / 4
    assert math.isclose(row["std"], math.sqrt((9 + 1 + 1 + 9) * 1e-6 / 3))  # ddof=1: 0.002582
    assert math.isclose(row["margin"], (3.28 - 3.276) * 2)  # sqrt(4) = 2: 0.008
    assert math.isclose(s["per_step"][0]["margin"], (3.28 - 3.30) * 2)  # -0.04: fails
    assert s["step"] == 200 and math.isclose(s["mean"], 3.276) and math.isclose(s["margin"], 0.008)
    assert math.isclose(s["train_time_mean"], 20.0) and s["total_steps"] == [200]
    assert s["final_step"] == 200 and s["final_losses"] == [3.279, 3.275, 3.277, 3.273]
    assert s["first_step_at_target"] == [200, 200, 200, 200]


def test_margin_exactly_at_the_threshold_passes(tmp_path):
    # four runs with mean 3.278: (3.28 - 3.278) * 2 = 0.004 on paper, 0.00399999... in floats
    for i, loss in enumerate([3.277, 3.279, 3.278, 3.278]):
        write(tmp_path / f"{i}.txt", [val(100, loss)])
    s = summarize(load_runs([str(tmp_path)]))
    assert s["step"] == 100 and s["margin"] < 0.004


def test_no_passing_step_reports_the_last_common_step(tmp_path):
    write(tmp_path / "a.txt", [val(100, 3.30, total=200), val(200, 3.2765, total=200)])  # one run needs < 3.276
    s = summarize(load_runs([str(tmp_path)]))
    assert s["step"] is None and s["mean"] == 3.2765 and s["final_step"] == 200 and s["std"] == 0.0
    assert s["first_step_at_target"] == [200]
    out = cli("summary", tmp_path).stdout
    table = [line for line in out.splitlines() if line[:6].strip().isdigit()]
    assert len(table) == 2 and not any("pass" in line for line in table)
    assert out.splitlines()[-1].startswith("record: not reached")


def test_only_common_steps_count(tmp_path):
    write(tmp_path / "a.txt", [val(100, 3.30, total=200), val(150, 3.27, total=200), val(200, 3.26, total=200)])
    write(tmp_path / "b.txt", [val(100, 3.31, total=200), val(200, 3.25, total=200)])  # no val at 150
    s = summarize(load_runs([str(tmp_path)]))
    assert s["steps"] == [100, 200] and s["step"] == 200


def test_reference_log_gives_the_published_record():
    runs = load_runs([REFERENCE])
    s = summarize(runs)
    assert s["n"] == 20 and s["step"] == 3175 and round(s["mean"], 6) == 3.278845
    assert round(s["margin"], 5) == 0.00517
    by_step = {row["step"]: row["mean"] for row in s["per_step"]}
    assert round(by_step[3150], 5) == 3.28039 and round(by_step[3200], 5) == 3.27811
    proc = cli("summary", REFERENCE, "--json")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert (data["n"], data["step"], round(data["mean"], 6)) == (20, 3175, 3.278845)
    proc = cli("summary", REFERENCE, cwd="/")  # the script works from any directory
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1].startswith("record: step 3175")
    assert s["incomplete"] == [] and s["duplicates"] == [] and s["bad_lines"] == []


# ------------------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------------------

def make_record(directory, means, n, steps=(3000, 3100, 3200), spread=0.001):
    """n one-file-per-seed logs whose losses are symmetric around `means` (one per step)."""
    directory.mkdir()
    for i in range(n):
        offset = spread * (i - (n - 1) / 2)
        write(directory / f"{i}.txt", [val(s, m + offset, total=3200) for s, m in zip(steps, means)])
    return load_runs([str(directory)])


def test_compare_clearly_better_at_the_same_step(tmp_path):
    a = make_record(tmp_path / "a", [3.29, 3.270, 3.265], 4)  # passes at 3100
    b = make_record(tmp_path / "b", [3.29, 3.276, 3.270], 4)  # passes at 3100 (margin 0.008)
    c = compare(a, b)
    assert (c["steps_a"], c["steps_b"], c["n_a"], c["n_b"]) == (3100, 3100, 4, 4)
    # by hand: (3.276 - 3.270 + 0) / sqrt(1/4 + 1/4) = 0.006 / 0.70711 = 0.008485
    assert math.isclose(c["z"], 0.006 / math.sqrt(0.5))
    assert c["verdict"] == "A is significantly better than B"
    assert compare(b, a)["verdict"] == "B is significantly better than A"


def test_compare_target_reached_100_steps_later(tmp_path):
    good = make_record(tmp_path / "good", [3.29, 3.277, 3.270], 4)   # passes at 3100
    late = make_record(tmp_path / "late", [3.30, 3.290, 3.2775], 4)  # passes at 3200 (0.005)
    c = compare(good, late)
    assert (c["steps_a"], c["steps_b"]) == (3100, 3200) and c["passes_a"] and c["passes_b"]
    # by hand: final_loss_diff = 3.2775 - 3.277 = 0.0005; exp_stepbased = 100/100 * 0.0045
    # z = (0.0005 + 0.0045) / sqrt(1/4 + 1/4) = 0.005 / 0.70711 = 0.0070711 >= 0.004
    assert math.isclose(c["final_loss_diff"], 0.0005, abs_tol=1e-12)
    assert math.isclose(c["exp_stepbased_loss_diff"], 0.0045)
    assert math.isclose(c["z"], 0.005 / math.sqrt(0.5))
    assert c["verdict"] == "A is significantly better than B"
    assert [row["step"] for row in c["side_by_side"]] == [3000, 3100, 3200]
    assert math.isclose(c["side_by_side"][2]["mean_b"], 3.2775)


def test_compare_nearly_equal_and_never_passing(tmp_path):
    a = make_record(tmp_path / "a", [3.29, 3.277, 3.270], 4)
    same = make_record(tmp_path / "same", [3.29, 3.2771, 3.270], 4)
    c = compare(a, same)
    assert c["verdict"] == "no significant difference" and abs(c["z"]) < 0.004
    bad = make_record(tmp_path / "bad", [3.30, 3.290, 3.279], 2)  # never passes: last step 3200
    c = compare(a, bad)
    assert c["steps_b"] == 3200 and not c["passes_b"]
    # (3.279 - 3.277 + 0.0045) / sqrt(1/4 + 1/2) = 0.0065 / 0.86603 = 0.0075056
    assert math.isclose(c["z"], 0.0065 / math.sqrt(0.75))


def test_compare_and_plot_cli_write_png(tmp_path):
    make_record(tmp_path / "a", [3.29, 3.277, 3.270], 2)
    make_record(tmp_path / "b", [3.30, 3.285, 3.279], 3)
    png = tmp_path / "cmp.png"
    proc = cli("compare", tmp_path / "a", tmp_path / "b", "--png", png)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] in (
        "A is significantly better than B", "B is significantly better than A", "no significant difference")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    data = json.loads(cli("compare", tmp_path / "a", tmp_path / "b", "--json").stdout)
    assert {"z", "verdict", "steps_a", "steps_b", "mean_a", "mean_b"} <= set(data)
    png2 = tmp_path / "plot.png"
    proc = cli("plot", tmp_path / "a", tmp_path / "b", "--png", png2, "--band", "std",
               "--label", "A", "--label", "B")
    assert proc.returncode == 0, proc.stderr
    assert png2.read_bytes()[:8] == PNG_MAGIC


def test_plot_records_single_run_std_band(tmp_path):
    runs = make_record(tmp_path / "one", [3.29, 3.277, 3.270], 1)
    png = tmp_path / "one.png"
    plot_records({"one": runs}, str(png), band="std")
    assert png.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------------
# write_summary
# ------------------------------------------------------------------------------------------------

def test_write_summary(tmp_path):
    write(tmp_path / "x.txt", ["trial:0 seed:3", val(50, 3.5), val(100, 3.27)])
    s = write_summary(str(tmp_path), extra={"torch": "2.13", "world_size": 8})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == s
    assert on_disk["n"] == 1 and on_disk["step"] == 100 and on_disk["seeds"] == [3]
    assert on_disk["environment"] == {"torch": "2.13", "world_size": 8}
    assert on_disk["runs"] == [dict(source="x.txt", trial=0, seed=3, final_step=100, final_loss=3.27,
                                    first_step_at_target=100)]
    assert sorted(os.listdir(tmp_path)) == ["summary.json", "x.txt"]  # no temporary file left
    write(tmp_path / "y.txt", ["trial:0 seed:4", val(50, 3.6), val(100, 3.2800)])
    assert write_summary(str(tmp_path))["n"] == 2  # rewritten with the new log


def test_write_summary_diverged_run_is_strict_json(tmp_path):
    # a diverged trial's nan is a bad line: the trial is left out, never pooled as mean nan
    write(tmp_path / "x.txt", [val(50, 3.5), "step:100/100 val_loss:nan train_time:1.0s step_avg:nanms"])
    write(tmp_path / "y.txt", [val(50, 3.4), val(100, 3.27)])
    write_summary(str(tmp_path))
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text
    s = json.loads(text)
    assert s["n"] == 1 and s["mean"] == 3.27 and [i["source"] for i in s["incomplete"]] == ["x.txt"]
    assert "val_loss nan is not a finite positive loss" in s["incomplete"][0]["reason"]
    assert [(b["source"], b["cut"]) for b in s["bad_lines"]] == [("x.txt", False)]


# ------------------------------------------------------------------------------------------------
# Errors: RecordsError from the API, `error: ...` and status 2 from the CLI
# ------------------------------------------------------------------------------------------------

def no_common_steps(d):
    write(d / "a.txt", [val(100, 3.3, total=100)])
    write(d / "b.txt", [val(200, 3.3, total=200)])  # both complete, different schedules
    return str(d)


def unreadable(d):
    # a regular file that open()s but cannot be read (EIO; chmod does not stop root)
    (d / "log.txt").symlink_to("/proc/self/mem")
    return str(d / "log.txt")


@pytest.mark.parametrize("setup, message", [
    (lambda d: str(d / "missing.txt"), "no such file"),
    (lambda d: str(d), "no .txt logs found"),
    (lambda d: write(d / "a.txt", ["step:1/10 train_loss:3.0 train_time:1s"]), "no validation lines with 'val_loss:'"),
    (unreadable, "cannot read"),
    (no_common_steps, "no validated step in common"),
])
def test_errors(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(RecordsError, match=message):
        summarize(load_runs([path]))
    proc = cli("summary", path)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and message in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


def test_error_names_file_and_metric(tmp_path):
    path = write(tmp_path / "a.txt", [val(100, 3.3)])
    with pytest.raises(RecordsError, match=r"a\.txt.*'val_ema_loss:'"):
        load_runs([path], metric="val_ema_loss")
    proc = cli("compare", path, tmp_path / "nope", "--json")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "nope" in proc.stderr


def test_write_summary_skips_a_log_without_validation_lines(tmp_path):
    write(tmp_path / "good.txt", [val(100, 3.27)])
    write(tmp_path / "crashed.txt", ["step:1/100 train_loss:10.8 train_time:1.0s step_avg:1000.00ms"])
    s = write_summary(str(tmp_path))
    assert s["n"] == 1 and len(s["skipped_logs"]) == 1 and "crashed.txt" in s["skipped_logs"][0]
    (tmp_path / "good.txt").unlink()
    with pytest.raises(RecordsError, match="no log in .* has validation lines"):
        write_summary(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# What counts: complete trials, whole lines, each seed once
# ------------------------------------------------------------------------------------------------

def test_incomplete_trials_are_listed_not_pooled_ours(tmp_path):
    write(tmp_path / "a.txt", [
        "trial:0 seed:0", val(50, 3.5), val(100, 3.27),
        "trial:1 seed:1", val(50, 3.0),  # a much lower loss that must not leak into the mean
        "step:51/100 train_loss:3.1 train_time:5.1s step_avg:100.00ms",
        "interrupted: SIGTERM at step 51",
        "trial:2 seed:2", val(50, 3.4), val(100, 3.28)])
    write(tmp_path / "b.txt", ["trial:0 seed:3", val(50, 3.6),  # killed: the log just ends
                               "step:73/100 train_loss:3.1 train_time:7.3s step_avg:100.00ms"])
    runs = load_runs([str(tmp_path)])
    assert [(r["seed"], r["complete"]) for r in runs] == [(0, True), (1, False), (2, True), (3, False)]
    s = summarize(runs)
    assert s["n"] == 2 and s["seeds"] == [0, 2] and math.isclose(s["per_step"][0]["mean"], 3.45)
    assert [(os.path.basename(i["source"]), i["trial"], i["seed"], i["last_step"], i["total_steps"])
            for i in s["incomplete"]] == [("a.txt", 1, 1, 51, 100), ("b.txt", 0, 3, 73, 100)]
    assert s["incomplete"][0]["reason"] == "interrupted: SIGTERM at step 51"
    assert "log ends" in s["incomplete"][1]["reason"]
    on_disk = json.loads(json.dumps(write_summary(str(tmp_path))))
    assert [(i["source"], i["trial"]) for i in on_disk["incomplete"]] == [("a.txt", 1), ("b.txt", 0)]
    assert [r["seed"] for r in on_disk["runs"]] == [0, 2]
    out = cli("summary", tmp_path).stdout
    assert "incomplete (not counted)" in out and "b.txt trial 0 seed 3: last step 73/100" in out
    assert "(2 trial(s) left out" in out


def test_incomplete_trials_upstream_format(tmp_path):
    path = tmp_path / "up.txt"  # no trial lines: each trial restarts at step 0
    path.write_text("code\n" + "=" * 100 + "\nRunning PyTorch\n" + "=" * 100 + "\n" + "\n".join([
        val(0, 10.8), val(50, 3.6), val(100, 3.27),
        val(0, 10.8), val(50, 3.1),  # killed (crashed) half way
        val(0, 10.8), val(50, 3.5), val(100, 3.29)]) + "\n")
    runs = parse_log(str(path))
    assert [r["complete"] for r in runs] == [True, False, True] and runs[1]["seed"] is None
    s = summarize(runs)
    assert s["n"] == 2 and math.isclose(s["final_mean"], 3.28)
    assert [(i["trial"], i["last_step"]) for i in s["incomplete"]] == [(1, 50)]
    assert "next trial started" in s["incomplete"][0]["reason"]


def test_a_run_that_only_started_is_listed_not_an_error(tmp_path):
    write(tmp_path / "done.txt", ["trial:0 seed:0", val(100, 3.27)])
    write(tmp_path / "running.txt", ["trial:0 seed:1",  # compiling: no validation yet
                                     "step:1/100 train_loss:10.8 train_time:1.0s step_avg:1000.00ms"])
    s = summarize(load_runs([str(tmp_path)]))
    assert s["n"] == 1 and [i["seed"] for i in s["incomplete"]] == [1]
    with pytest.raises(RecordsError, match="no complete trial.*running.txt trial 0 stopped at step 1/100"):
        summarize(load_runs([str(tmp_path / "running.txt")]))


CUT = [
    "step:100/100 val_loss:3.27",                                        # cut after the loss
    "step:100/100 val_lo",                                               # cut in the key
    "step:100/100 val_loss:3.27011 train_time:10.0",                     # no unit
    "step:100/100 val_loss:3.27011 train_time:10.000s step_avg:100.0",  # no unit
    "step:100/100 val_loss:3.27011 train_time:10.000s step_avg:100.00m",
    "step:100/100 val_loss:3.2x7 train_time:10.000s step_avg:100.00ms",  # garbled number
    "step:100/100 val_loss: train_time:10.000s step_avg:100.00ms",       # empty value
    "step:100/100 val_loss:3.27011 train_time:10.000s step_avg:100.00ms ema_be",
    "step:10",
    "ste",
]


@pytest.mark.parametrize("cut", CUT)
def test_a_cut_final_line_is_ignored_and_reported(tmp_path, cut):
    # the last line of a killed log: never read as a loss, and the trial is not complete
    path = write(tmp_path / "a.txt", ["trial:0 seed:0", val(50, 3.5), cut])
    number = open(path).read().splitlines().index(cut) + 1
    (trial,) = parse_log(path)
    assert trial["steps"] == [50] and not trial["complete"]
    write(tmp_path / "b.txt", ["trial:0 seed:1", val(50, 3.5), val(100, 3.29)])
    s = summarize(load_runs([str(tmp_path)]))
    assert s["n"] == 1 and s["final_losses"] == [3.29]
    assert [dict(b, reason=None) for b in s["bad_lines"]] == [
        dict(source=path, line=number, text=cut, reason=None, cut=True)]
    assert s["bad_lines"][0]["reason"].startswith(("cut or garbled", "garbled"))
    assert [i["seed"] for i in s["incomplete"]] == [0]


def test_a_cut_line_mid_trial_drops_that_step_only(tmp_path):
    path = write(tmp_path / "a.txt", [
        val(0, 10.8), "step:50/100 val_loss:3.4 train_ti", val(100, 3.27), "step:10"])
    (trial,) = parse_log(path)
    assert trial["steps"] == [0, 100] and trial["complete"]
    s = write_summary(str(tmp_path))
    assert s["n"] == 1 and s["steps"] == [0, 100]
    lines = open(path).read().splitlines()  # 4 code lines, '=', header, '=': output from line 8
    assert lines.index("step:50/100 val_loss:3.4 train_ti") + 1 == 9 and lines.index("step:10") + 1 == 11
    assert [(b["source"], b["line"]) for b in s["bad_lines"]] == [("a.txt", 9), ("a.txt", 11)]
    out = cli("summary", path).stdout
    assert "cut line (ignored):" in out and "line 9: 'step:50/100 val_loss:3.4 train_ti'" in out


def test_only_cut_lines_is_an_error_that_says_so(tmp_path):
    path = write(tmp_path / "a.txt", ["step:100/100 val_loss:3.27"])
    with pytest.raises(RecordsError, match="no validation lines.*1 cut line.*line 8"):
        parse_log(path)


def test_ms_train_time_of_upstream_logs(tmp_path):
    path = tmp_path / "up.txt"
    path.write_text("=" * 100 + "\n" + "step:125/125 val_loss:4.2 train_time:30851ms step_avg:246.81ms\n")
    (trial,) = parse_log(str(path))
    assert trial["losses"] == [4.2] and math.isclose(trial["train_time"][0], 30.851)


def test_duplicate_seeds_are_flagged_and_counted_once(tmp_path):
    write(tmp_path / "a.txt", ["trial:0 seed:0", val(100, 3.270), "trial:1 seed:record0", val(100, 3.272)])
    write(tmp_path / "b.txt", ["trial:0 seed:0", val(100, 3.290)])         # same int seed, other file
    write(tmp_path / "c.txt", ["trial:0 seed:record0", val(100, 3.290),    # two unseeded processes
                               "trial:1 seed:record1", val(100, 3.274)])
    write(tmp_path / "d.txt", ["trial:0 seed:5", val(50, 3.3)])            # incomplete: not a dup
    write(tmp_path / "e.txt", ["trial:0 seed:5", val(100, 3.276)])         # its complete rerun
    s = summarize(load_runs([str(tmp_path)]))
    assert s["seeds"] == [0, "record0", "record1", 5] and s["n"] == 4
    assert math.isclose(s["mean"], (3.270 + 3.272 + 3.274 + 3.276) / 4)
    assert [(os.path.basename(d["source"]), d["seed"], d["duplicate_of"].split("/")[-1])
            for d in s["duplicates"]] == [("b.txt", 0, "a.txt trial 0"), ("c.txt", "record0", "a.txt trial 1")]
    assert [i["seed"] for i in s["incomplete"]] == [5]
    data = json.loads(cli("summary", tmp_path, "--json").stdout)
    assert data["seeds"] == [0, "record0", "record1", 5] and len(data["duplicates"]) == 2
    assert "duplicate seed (counted once)" in cli("summary", tmp_path).stdout


def test_trials_without_seed_are_never_duplicates(tmp_path):
    for name in ("a.txt", "b.txt"):  # upstream logs: no trial lines, seed None
        write(tmp_path / name, [val(100, 3.27), val(100, 3.28)])
    s = summarize(load_runs([str(tmp_path)]))
    assert s["n"] == 4 and s["duplicates"] == [] and s["seeds"] == [None] * 4


def test_summary_json_is_world_readable(tmp_path):
    write(tmp_path / "x.txt", [val(100, 3.27)])
    old = os.umask(0o077)  # even under a strict umask: the summary is meant to be read by others
    try:
        write_summary(str(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode) == 0o644


# ------------------------------------------------------------------------------------------------
# How many seeds to pay for
# ------------------------------------------------------------------------------------------------

def test_pass_probability_by_hand():
    # mean 3.277, std 0.002, n 4: ((3.28 - 3.277) * 2 - 0.004) / 0.002 = 1 -> Phi(1) = 0.841345
    assert math.isclose(pass_probability(3.277, 0.002, 4), 0.8413447, rel_tol=1e-6)
    # mu estimated from 4 trials: scale 0.002 * sqrt(1 + 4/4) -> Phi(1/sqrt(2)) = 0.760250
    assert math.isclose(pass_probability(3.277, 0.002, 4, n_obs=4), 0.7602499, rel_tol=1e-6)
    # a mean exactly at the edge of passing: Phi(0) = 1/2 either way
    assert math.isclose(pass_probability(3.278, 0.002, 4), 0.5)
    assert math.isclose(pass_probability(3.278, 0.002, 4, n_obs=4), 0.5)
    # n for 90%: mu exact, n=4 gives 0.841, n=5 gives Phi((0.003 sqrt5 - 0.004)/0.002) = Phi(1.354) = 0.912
    assert trials_needed(3.277, 0.002) == 5
    # mu estimated: n=7 gives Phi(1.187) = 0.882, n=8 gives Phi(1.295) = 0.902
    assert trials_needed(3.277, 0.002, n_obs=4) == 8
    assert trials_needed(3.2805, 0.001) is None and pass_probability(3.2805, 0.001, 100) < 1e-9
    # mu estimated from few noisy trials: the limit Phi((3.28 - mean) sqrt(n_obs) / std) < 90%
    assert trials_needed(3.2795, 0.002, n_obs=2) is None  # limit Phi(0.354) = 0.64
    assert pass_probability(3.277, 0.0, 4) == 1.0 and pass_probability(3.279, 0.0, 4) == 0.0


def test_pass_chance_in_summary(tmp_path):
    losses = [3.275, 3.279, 3.277, 3.277]  # mean 3.277, std sqrt(8/3) * 1e-3
    for i, loss in enumerate(losses):
        write(tmp_path / f"{i}.txt", [f"trial:0 seed:{i}", val(50, 3.5), val(100, loss)])
    s = summarize(load_runs([str(tmp_path)]))
    (row,) = [r for r in s["pass_chance"]["rows"] if r["step"] == 100]
    std = math.sqrt(8 / 3) * 1e-3
    assert math.isclose(row["std"], std) and row["n"] == 4 and row["n_obs"] == 4
    # by hand: ((3.28 - 3.277) * 2 - 0.004) / std = 0.002 / 0.0016330 = 1.2247 -> Phi = 0.8897
    assert math.isclose(row["p_exact"], 0.5 * (1 + math.erf(0.002 / std / math.sqrt(2))))
    assert round(row["p_exact"], 4) == 0.8897
    assert math.isclose(row["p_exact"], pass_probability(3.277, std, 4))
    assert math.isclose(row["p_estimated"], pass_probability(3.277, std, 4, n_obs=4))
    assert row["p_estimated"] < row["p_exact"]
    assert "estimate" in s["pass_chance"]["note"] and "normal" in s["pass_chance"]["note"]
    bigger = summarize(load_runs([str(tmp_path)]), new_trials=10)["pass_chance"]["rows"][-1]
    assert bigger["n"] == 10 and bigger["p_exact"] > row["p_exact"]
    one = summarize(load_runs([str(tmp_path / "0.txt")]))["pass_chance"]
    assert one["rows"][-1]["p_exact"] is None and "at least 2" in one["note"]


def test_pass_chance_on_the_published_record():
    s = summarize(load_runs([REFERENCE]))
    rows = {r["step"]: r for r in s["pass_chance"]["rows"]}
    assert sorted(rows) == [3150, 3175, 3200]  # the record step and its neighbours
    r = rows[3175]
    assert round(r["mean"], 6) == 3.278845 and round(r["std"], 5) == 0.00111 and r["n"] == 20
    # a fresh 20-trial reproduction passes at 3175 about 75-85% of the time: the variants bracket it
    assert 0.75 <= r["p_estimated"] < r["p_exact"] <= 0.86
    assert r["n90_exact"] == 23 and r["n90_estimated"] > r["n90_exact"]
    assert rows[3150]["p_exact"] < 1e-3 and rows[3150]["n90_exact"] is None  # mean above target
    out = cli("summary", REFERENCE).stdout
    assert "how many seeds to pay for" in out and "an estimate" in out and "85.3%" in out


# ------------------------------------------------------------------------------------------------
# The published record's in-repo copy
# ------------------------------------------------------------------------------------------------

def test_published_copy_is_in_the_repo_and_the_default_baseline():
    assert PUBLISHED == REFERENCE and os.path.isfile(REFERENCE)
    with open(REFERENCE, "rb") as f:
        assert f.readline() == b"=" * 100 + b"\n"  # the output part only: no code before it
    readme = open(os.path.join(os.path.dirname(REFERENCE), "README.md")).read()
    for fact in ("#17", "Tilde Research", "Aurora", "May 2026", "20 seeds", "8xH100", "3175",
                 "3.27885", "code part"):
        assert fact in readme, fact


@pytest.mark.skipif(not os.path.exists(SHARED_REFERENCE), reason="shared reference log not present")
def test_published_copy_is_byte_identical_to_the_shared_reference_log():
    with open(REFERENCE, "rb") as ours, open(SHARED_REFERENCE, "rb") as shared:
        assert ours.read() == shared.read()


# ------------------------------------------------------------------------------------------------
# diff
# ------------------------------------------------------------------------------------------------

TRAINER = '''#### train_gpt.py ####
import dataclasses
import os


@dataclasses.dataclass
class Hyperparameters:
    train_steps: int = 3200
    lr_matrix: float = 0.0375
    lr_head: float = 1 / 320
    optimizer: str = "aurora"
    seed: int = 0
    trials: int = 1


PRESETS = {"record": {}, "tiny": dict(train_steps=200, data_dir=os.path.join("data", "synthetic"))}
FLAGS = ["--preset", "--train-steps", "--trials", "--seed", "--run-name"]
print(f"step:{step}/{total} val_loss:{val_loss:.5f}")
#### aurora.py ####
step:1/2 val_loss:9.9 train_time:0.0s step_avg:0ms
trial:0 seed:999
def polar(x):
    return x
'''  # a trainer-like code part (decoys in the second file, which is never parsed as Python)

HP = dict(data_dir="/data/fineweb10B", train_steps="3200", lr_matrix="0.0375", lr_head="0.003125",
          optimizer="aurora", seed="0", trials="2")


def write_ours(path, trials, hp=None, code=TRAINER, steps=(3000, 3100, 3200), total=3200):
    """A log like our trainer's: environment and hyperparameter header lines; trials maps each
    seed to its losses at `steps`."""
    hp = dict(HP, **(hp or {}))
    header = ["python 3.12.3  torch 2.11.0+cu130  cuda 13.0  platform Linux-x86_64",
              "device NVIDIA H100 80GB HBM3  world_size 8", "git_commit abc123",
              f"seeds {list(trials)}"] + [f"{k}: {v}" for k, v in hp.items()] + [
              "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0 |"]
    out = []
    for i, (seed, losses) in enumerate(trials.items()):
        out += [f"trial:{i} seed:{seed}"] + [val(s, v, total=total) for s, v in zip(steps, losses)]
    path.write_text(code + "=" * 100 + "\n" + "\n".join(header) + "\n" + "=" * 100 + "\n"
                    + "\n".join(out) + "\n")
    return str(path)


def test_read_log_header_and_code(tmp_path):
    log = read_log(write_ours(tmp_path / "a.txt", {0: [3.3, 3.29, 3.28]}))
    assert log["code"] == TRAINER  # everything before the first '=' line, byte for byte
    assert log["hyperparameters"] == HP  # `name: value` header lines only (not nvidia-smi's)
    assert log["environment"][1] == "device NVIDIA H100 80GB HBM3  world_size 8"
    assert [t["seed"] for t in log["trials"]] == [0] and log["bad_lines"] == []


def test_diff_two_logs(tmp_path):
    a = write_ours(tmp_path / "a.txt", {0: [3.30, 3.285, 3.275]})
    b = write_ours(tmp_path / "b.txt", {1: [3.29, 3.280, 3.272]}, hp=dict(lr_matrix="0.04", seed="1", trials="1"),
                   code=TRAINER.replace("lr_matrix: float = 0.0375", "lr_matrix: float = 0.04"))
    d = diff_records(a, b)
    assert d["hyperparameters"] == [dict(name="lr_matrix", a="0.0375", b="0.04")]
    assert {r["name"] for r in d["run_specific"]} == {"seed", "trials"}
    assert not d["code_identical"] and "-    lr_matrix: float = 0.0375" in d["code_diff"]
    assert "+    lr_matrix: float = 0.04" in d["code_diff"]
    assert [(r["step"], round(r["diff"], 6)) for r in d["side_by_side"]] == [
        (3000, -0.01), (3100, -0.005), (3200, -0.003)]
    assert d["compare"] is None  # one trial each: no pairwise test
    proc = cli("diff", a, b)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "lr_matrix: 0.0375 -> 0.04" in out and "(run-specific) seed: 0 -> 1" in out
    assert "+++ B: " in out and "+    lr_matrix: float = 0.04" in out
    assert " 3000   3.30000   3.29000  -0.01000" in out
    data = json.loads(cli("diff", a, a, "--json").stdout)
    assert data["code_identical"] and data["hyperparameters"] == [] and data["code_diff"] == []
    assert all(r["diff"] == 0 for r in data["side_by_side"])


def test_diff_folders_and_upstream_logs(tmp_path):
    (tmp_path / "up").mkdir()
    for i, name in enumerate(("1.txt", "2.txt")):  # upstream: code part, '=' lines, val lines only
        (tmp_path / "up" / name).write_text("import torch\nlr = 0.05\n" + "=" * 100 + "\nRunning PyTorch\n"
                                            + "=" * 100 + "\n" + "\n".join(
                                                val(s, v + i * 0.001, total=3200) for s, v in
                                                zip((3000, 3100, 3200), (3.29, 3.277, 3.270))) + "\n")
    other = tmp_path / "other.txt"
    other.write_text("import torch\nlr = 0.06\n" + "=" * 100 + "\n" + "\n".join(
        val(s, v, total=3200) for s, v in zip((3000, 3100, 3200), (3.30, 3.29, 3.279))) + "\n")
    d = diff_records(str(tmp_path / "up"), str(other))
    assert not d["has_hyperparameters_a"] and not d["has_hyperparameters_b"]
    assert "-lr = 0.05" in d["code_diff"] and "+lr = 0.06" in d["code_diff"]
    assert d["n_a"] == 2 and math.isclose(d["side_by_side"][1]["a"], 3.2775)
    assert d["compare"]["verdict"] == "A is significantly better than B"
    out = cli("diff", tmp_path / "up", REFERENCE).stdout
    assert "neither has hyperparameter lines" in out and "not compared: B has no code part" in out
    # A passes at 3200 only: (3.28 - 3.2775) * sqrt(2) = 0.0035 < 0.004 at 3100
    assert "pairwise test: A n=2 step 3200 mean 3.270500" in out and "B n=20 step 3175" in out
    table = out.split("at common validated steps")[1].split("pairwise")[0]
    assert " 3175 " not in table  # only common steps: ours validate 3000/3100/3200


# ------------------------------------------------------------------------------------------------
# submit
# ------------------------------------------------------------------------------------------------

def make_submission(directory, hp=None, code=TRAINER, means=(3.29, 3.277, 3.270)):
    """Two logs of two trials each (seeds 0..3), passing at step 3100 (mean 3.277, margin 0.006)."""
    directory.mkdir()
    for f, seeds in (("a.txt", (0, 1)), ("b.txt", (2, 3))):
        write_ours(directory / f, {s: [m + 0.001 * (s - 1.5) for m in means] for s in seeds},
                   hp=hp, code=code)
    return str(directory)


def test_submit_end_to_end(tmp_path):
    record = make_submission(tmp_path / "rec", hp=dict(lr_matrix="0.04"))
    parent = make_submission(tmp_path / "parent", means=(3.30, 3.285, 3.2775))  # passes at 3200
    out = tmp_path / "results" / "20261123_lr04"
    proc = cli("submit", record, "--name", "lr04", "--baseline", parent, "--out", out,
               "--date", "2026-11-23", "--contributors", "A. Person")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["README.md", "a.txt", "b.txt", "figure.png",
                                       "train_gpt_simple_lr04.py", "zoomed_figure.png"]
    assert sorted(os.listdir(out.parent)) == ["20261123_lr04"]  # no temporary folder left
    for f in os.listdir(out):
        assert stat.S_IMODE(os.stat(out / f).st_mode) == 0o644, f
    assert (out / "a.txt").read_text() == open(os.path.join(record, "a.txt")).read()
    assert (out / "train_gpt_simple_lr04.py").read_text() == TRAINER  # the code part, exactly
    for png in ("figure.png", "zoomed_figure.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("| ?")]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert len(cells) == 7 and cells[:3] == ["?", "3100", "3.2770 (n=4)✓"]
    # the link as the row will read in upstream's leaderboard: the folder the result will have there
    assert cells[4:] == ["2026-11-23", "[log](/records/track_3_optimization/results/20261123_lr04/a.txt)",
                         "A. Person"]
    assert cells[3] == "Differs from the parent in lr_matrix=0.04"
    readme = (out / "README.md").read_text()
    assert row in readme
    for part in ("## Method and difference from the parent record",
                 "`lr_matrix`: 0.0375 (parent) -> 0.04",
                 "- Code: identical to the parent's code part.",
                 "| **3100** (claimed) | 3.277000 |", "| 3000 | 3.290000 |", "| fail |", "| PASS |",
                 "| 0 | [a.txt](a.txt) trial 0 | 3.28850 | 3.27550 | 3.26850 |",
                 "| 3 | [b.txt](b.txt) trial 1 |", "| **mean** | |", "| **std** | |",
                 "## How many seeds to pay for", "an estimate", "## Comparison with the parent record",
                 "this record is significantly better than the parent",
                 "| parent | 4 | 3200 | 3.277500 |", "| lr_matrix | 0.04 |", "| train_steps | 3200 |",
                 "`device NVIDIA H100 80GB HBM3  world_size 8`", "`python 3.12.3  torch 2.11.0+cu130",
                 "./run.sh --seed 0 --trials 4 --run-name lr04",
                 "The benchmark's rule: n runs pass at step S when (target - mean_S) * sqrt(n) >= 0.004",
                 "lr_matrix: 0.04: not the script's default and no command-line flag",
                 "Left out: none"):
        assert part in readme, part
    assert "| data_dir |" not in readme and "| seed | 0 |" not in readme and "| trials |" not in readme


def test_submit_default_baseline_is_the_published_record(tmp_path):
    record = make_submission(tmp_path / "rec", code=TRAINER.replace("lr_head: float = 1 / 320",
                                                                      "lr_head: float = 1 / 300"),
                             hp=dict(train_steps="3200"))
    r = submit(record, "same", out=str(tmp_path / "o"), date="2026-11-23")
    readme = open(os.path.join(r["out"], "README.md")).read()
    assert "the published record" in readme and "records/published_aurora_3175" in readme
    assert "the parent's log has no hyperparameter lines" in readme
    assert "not compared (the parent's log holds no code part)" in readme
    assert "lr_head: 0.003125" in readme  # 1/300 is the script's default: logged 1/320 needs setting
    assert r["comparison"]["n_b"] == 20 and r["comparison"]["steps_b"] == 3175
    assert r["comparison"]["verdict"] == "A is significantly better than B"  # 3100 vs 3175 steps
    assert r["row"].startswith("| ? | 3100 | 3.2770 (n=4)✓ | same (optimizer aurora) |")


def test_submit_reports_left_out_trials_and_unseeded_commands(tmp_path):
    record = tmp_path / "rec"
    record.mkdir()
    write_ours(record / "a.txt", {f"record{k}": [3.29, 3.277 + 0.001 * k, 3.270] for k in range(4)})
    with open(record / "a.txt", "a") as f:
        f.write("trial:4 seed:record4\n" + val(3000, 3.29, total=3200) + "\ninterrupted: SIGINT at step 3050\n")
    r = submit(str(record), "unseeded", out=str(tmp_path / "o"), date="2026-11-23",
               baseline=REFERENCE)
    readme = open(os.path.join(r["out"], "README.md")).read()
    assert r["summary"]["n"] == 4
    assert "incomplete (not counted): a.txt trial 4 seed record4, last step 3050/3200: interrupted" in readme
    assert "./run.sh --trials 4 --run-name unseeded" in readme
    assert "record0, record1, record2, ... ran without --seed: they are not reproducible by seed" in readme
    assert "random stream" not in readme and "statistics.md" not in readme


def test_submit_refusals(tmp_path):
    record = make_submission(tmp_path / "rec")
    # a log of another configuration
    bad = make_submission(tmp_path / "cfg")
    write_ours(tmp_path / "cfg" / "b.txt", {2: [3.29, 3.277, 3.270]}, hp=dict(lr_matrix="0.04"))
    with pytest.raises(RecordsError, match=r"do not share one configuration.*b\.txt differs from a\.txt "
                                           r"in lr_matrix \(0\.0375 vs 0\.04\)"):
        submit(bad, "x", out=str(tmp_path / "o1"))
    # the same hyperparameters, other code
    code = make_submission(tmp_path / "code")
    write_ours(tmp_path / "code" / "b.txt", {2: [3.29, 3.277, 3.270]}, code=TRAINER + "# changed\n")
    with pytest.raises(RecordsError, match=r"code part of b\.txt differs from a\.txt's"):
        submit(code, "x", out=str(tmp_path / "o2"))
    # no step passes
    slow = make_submission(tmp_path / "slow", means=(3.30, 3.29, 3.279))
    with pytest.raises(RecordsError, match="no validated step passes"):
        submit(slow, "x", out=str(tmp_path / "o3"))
    # an output-only log (no code part)
    with pytest.raises(RecordsError, match="holds no code part"):
        submit(REFERENCE, "x", out=str(tmp_path / "o4"))
    with pytest.raises(RecordsError, match="plain name"):
        submit(record, "../x", out=str(tmp_path / "o5"))
    assert not any(os.path.exists(tmp_path / f"o{i}") for i in range(1, 6))
    # an existing, non-empty folder is never overwritten; an empty one is used
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    proc = cli("submit", record, "--name", "x", "--out", tmp_path / "full")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "not empty" in proc.stderr
    assert os.listdir(tmp_path / "full") == ["keep.txt"] and proc.stdout == ""
    (tmp_path / "empty").mkdir()
    assert "README.md" in submit(record, "x", out=str(tmp_path / "empty"))["files"]
    assert sorted(os.listdir(tmp_path)) == sorted(["rec", "cfg", "code", "slow", "full", "empty"])


def test_summary_write_rewrites_summary_json(tmp_path):
    # train_gpt.py runs `tools/records.py summary RECORD_DIR --write` after each run and logs the
    # last line of stdout: the record line
    write(tmp_path / "x.txt", ["trial:0 seed:0", val(50, 3.5), val(100, 3.27)])
    write(tmp_path / "y.txt", ["trial:0 seed:1", val(50, 3.6)])  # killed
    proc = cli("summary", tmp_path, "--write")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "record: step 100  mean 3.270000  margin 0.01000 >= 0.004  (n=1)"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["n"] == 1 and [i["source"] for i in on_disk["incomplete"]] == ["y.txt"]
    assert stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode) == 0o644
    # a diverged run: its nan is a bad line, the trial is left out, and no crash
    write(tmp_path / "z.txt", ["trial:0 seed:2", val(50, 3.5),
                               "step:100/100 val_loss:nan train_time:1.0s step_avg:nanms"])
    proc = cli("summary", tmp_path, "--write")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "record: step 100  mean 3.270000  margin 0.01000 >= 0.004  (n=1)"
    assert "bad line (ignored): z.txt line 10: " in proc.stdout and "not a finite positive loss" in proc.stdout
    proc = cli("summary", tmp_path, tmp_path / "x.txt", "--write")
    assert proc.returncode == 2 and "exactly one PATH" in proc.stderr


NEW_TRAINER = '''#### train_gpt.py ####
import argparse
import dataclasses


def hparam(default, help):
    return dataclasses.field(default=default, metadata=dict(help=help))


@dataclasses.dataclass
class Hyperparameters:
    train_steps: int = hparam(3200, "optimizer steps")
    lr_matrix: float = hparam(0.0375, "Aurora lr")
    adam_betas: tuple = hparam((0.8, 0.95), "Adam betas")
    diagnostics: bool = hparam(True, "neuron diagnostics")
    preset: str = hparam("record", "record or tiny")
    seed: int = hparam(None, "seed of trial 0")
    trials: int = hparam(1, "trials")
    append: bool = hparam(False, "add to an existing record folder")


PER_RUN = ("seed", "trials", "data_dir", "append")
PRESETS = {"record": {}, "tiny": dict(train_steps=200)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    for f in dataclasses.fields(Hyperparameters):  # one flag per field, bools as --x/--no-x
        ap.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction)
#### aurora.py ####
'''  # the trainer's newer style: hparam() defaults, generated flags, PER_RUN, a preset line


def test_submit_with_a_trainer_that_generates_its_flags(tmp_path):
    record = tmp_path / "rec"
    record.mkdir()
    hp = dict(preset="tiny", train_steps="200", lr_matrix="0.04", adam_betas="(0.9, 0.95)",
              diagnostics="False")
    for f, seeds, append in (("a.txt", (0, 1), "False"), ("b.txt", (2, 3), "True")):
        write_ours(record / f, {s: [3.29, 3.277 + 0.001 * (s - 1.5), 3.270] for s in seeds},
                   hp=dict(hp, append=append), code=NEW_TRAINER, steps=(150, 175, 200), total=200)
    r = submit(str(record), "newstyle", out=str(tmp_path / "o"), date="2026-11-23")  # append: per run
    readme = open(os.path.join(r["out"], "README.md")).read()
    # flags in the order of the log's lines; train_steps 200 comes with the preset: no flag
    assert ("./run.sh --seed 0 --trials 4 --lr-matrix 0.04 --preset tiny --adam-betas 0.9 0.95 "
            "--no-diagnostics --run-name newstyle") in readme
    assert "| append |" not in readme and "| preset | tiny |" in readme
    assert "seed, trials, data_dir, append" in readme


# ------------------------------------------------------------------------------------------------
# Upstream results folders, read as the leaderboard did (real log fragments: tests/fixtures/upstream)
# ------------------------------------------------------------------------------------------------

UPSTREAM = os.path.join(ROOT, "tests", "fixtures", "upstream")


def test_upstream_runs_that_stop_before_their_horizon(tmp_path):
    # a 2860-step claim trained on a 2900-step schedule: every log ends at step:2860/2900
    folder = os.path.join(UPSTREAM, "stop_before_horizon")
    s = summary_of(folder)[0]
    assert s["n"] == 3 and s["final_step"] == 2860 and s["total_steps"] == [2900] and not s["incomplete"]
    assert math.isclose(s["final_mean"], (3.27837 + 3.27746 + 3.27961) / 3)
    # a log truly cut mid-line after its last validation is reported, not pooled
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    name = sorted(os.listdir(cut))[0]
    with open(cut / name, "a") as f:
        f.write("step:2861/2900 train_lo")
    s = summary_of(str(cut))[0]
    assert s["n"] == 2 and [os.path.basename(i["source"]) for i in s["incomplete"]] == [name]
    assert "cut mid-line" in s["incomplete"][0]["reason"] and s["bad_lines"]


def test_our_trials_end_at_their_final_validation_or_the_trainers_end_line(tmp_path):
    write(tmp_path / "a.txt", ["trial:0 seed:record0", val(50, 3.5), val(80, 3.27),  # old label
                               "trial:1 seed:7", val(50, 3.4), val(80, 3.29), "final val losses: 3.27 3.29"])
    write(tmp_path / "b.txt", ["trial:0 seed:8", val(50, 3.3), val(80, 3.2), "interrupted: SIGTERM at step 81"])
    s = summarize(load_runs(str(tmp_path)))
    assert s["seeds"] == ["record0", 7] and s["final_step"] == 80
    assert [(i["seed"], i["reason"]) for i in s["incomplete"]] == [(8, "interrupted: SIGTERM at step 81")]


def test_upstream_files_that_are_not_logs_are_skipped_with_one_notice():
    # trustlight: metadata and stderr beside each seed's stdout; seed 0 logged three times
    folder = os.path.join(UPSTREAM, "not_logs")
    s = summary_of(folder)[0]
    assert s["n"] == 2 and s["steps"] == [3124, 3125, 3126, 3175]
    assert [n for n in s["notes"] if n.startswith("skipped 4 file(s)")] and len(s["notes"]) == 1
    copies = sorted(os.path.relpath(d["source"], folder) for d in s["duplicates"] if d["copy"])
    assert copies == [os.path.join("idea_10e_attnproj_bounded_trust_floor_soapish", f"seed_{k}", f)
                      for k, f in ((0, "final_val_loss.txt"), (0, "stdout.txt"), (1, "final_val_loss.txt"))]
    out = cli("summary", folder).stdout
    assert out.count("skipped 4 file(s) without 'val_loss:' validation lines") == 1
    with pytest.raises(RecordsError, match="metadata.txt: no validation lines"):  # named alone: an error
        load_runs(os.path.join(folder, "idea_10e_attnproj_bounded_trust_floor_soapish", "seed_0", "metadata.txt"))


def test_upstream_claim_on_another_metric_and_a_sibling_that_stops_early():
    folder = os.path.join(UPSTREAM, "metric")
    s = summary_of(folder)[0]  # the folder's README names val_ema: the claim's metric
    assert s["metric"] == "val_ema_loss" and s["n"] == 2
    assert math.isclose({r["step"]: r["mean"] for r in s["per_step"]}[2690], (3.27795 + 3.27791) / 2)
    (left,) = s["incomplete"]  # seed 7 stops at 2765 while its siblings run to 2900
    assert "A40_seed7" in left["source"] and "before the last validation its siblings share (2900)" in left["reason"]
    plain = summary_of(folder, metric="val_loss")[0]
    assert plain["metric"] == "val_loss" and "val_ema_loss" in plain["notes"][0]
    assert math.isclose({r["step"]: r["mean"] for r in plain["per_step"]}[2690], (3.28208 + 3.28201) / 2)


def test_upstream_folder_with_two_configurations_is_grouped():
    folder = os.path.join(UPSTREAM, "groups")
    s = summary_of(folder, target=3.2805)[0]
    assert s["group"] == "b1095_sh090/" and s["n"] == 3 and s["step"] == 3125
    assert [(g["group"], g["n"], g["step"]) for g in s["groups"]] == [("b1090_sh090/", 3, None),
                                                                      ("b1095_sh090/", 3, 3125)]
    assert any("differs from b1090_sh090/ in: beta1 = 0.95" in n for n in s["notes"])
    out = cli("summary", folder, "--pool").stdout.splitlines()
    assert out[-1].startswith("record: not reached") and "(n=6)" not in out[-1]
    assert "runs: n=6" in "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Our own logs as the trainer writes them (JSON header values, val_loss_target): the committed
# 3-trial CPU example
# ------------------------------------------------------------------------------------------------

EXAMPLE_DIR = os.path.join(ROOT, "records", "2026-11-23_tiny_example")
EXAMPLE_LOG = os.path.join(EXAMPLE_DIR, "ee34d945-e40f-4783-ad43-f3069fe51a37.txt")
EXAMPLE_RESULT = os.path.join(ROOT, "records", "track_3_optimization", "results", "20261123_tiny_example")
EXAMPLE_DESCRIPTION = "Aurora, tiny preset on synthetic data (CPU smoke example)"


def example_copy(path, **changes):
    """The example log with header lines changed (name -> JSON text), and its log line renamed
    (so that it is not a byte copy)."""
    text = open(EXAMPLE_LOG).read()
    head, sep, rest = text.partition("=" * 100 + "\n")
    for name, value in changes.items():
        assert f"\n{name}: " in rest
        rest = "\n".join(f"{name}: {value}" if line.startswith(f"{name}: ") else line
                         for line in rest.split("\n"))
    path.write_text(head + sep + rest.replace("log: ", f"log: {path.name} ", 1))
    return str(path)


@pytest.fixture(scope="module")
def example_submission(tmp_path_factory):
    """The example result folder as submit writes it now (one submit for every test that reads it)."""
    out = tmp_path_factory.mktemp("results") / "20261123_tiny_example"
    proc = cli("submit", EXAMPLE_DIR, "--name", "tiny_example", "--target", "3.3", "--date",
               "2026-11-23", "--description", EXAMPLE_DESCRIPTION, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_the_committed_example_result_is_what_submit_writes(example_submission):
    out, proc = example_submission
    for name in ("README.md", "train_gpt_simple_tiny_example.py", os.path.basename(EXAMPLE_LOG)):
        assert (out / name).read_text() == open(os.path.join(EXAMPLE_RESULT, name)).read(), name
    assert "record: step 175  mean 3.291777" in proc.stdout


def test_the_reproduce_command_passes_the_trainers_dry_run(example_submission, monkeypatch, capsys):
    readme = (example_submission[0] / "README.md").read_text()
    (command,) = [line for line in readme.split("## Reproduce")[1].splitlines() if line.startswith("./run.sh")]
    argv = shlex.split(command)
    assert argv[0] == "./run.sh" and "--preset" in argv and '"' not in command
    assert argv[argv.index("--preset") + 1] == "tiny"  # a plain value, not the header's JSON '"tiny"'
    # the command is for the user's machine; its flags must be the trainer's, with plain values
    import train_gpt
    monkeypatch.setenv("WORLD_SIZE", "1")
    capsys.readouterr()
    assert train_gpt.main([*argv[1:], "--dry-run"]) == 0, capsys.readouterr().err[-2000:]
    assert "dry run: configuration ok (preset tiny" in capsys.readouterr().out


def test_json_header_values_become_plain_flags(tmp_path):
    facts = dict(boolean_optional=True)
    assert records.flag_arguments("rule", '"aurora"', facts) == ["--rule", "aurora"]
    assert records.flag_arguments("adam_betas", "[0.8, 0.95]", facts) == ["--adam-betas", "0.8", "0.95"]
    assert records.flag_arguments("adam_betas", "(0.9, 0.95)", facts) == ["--adam-betas", "0.9", "0.95"]
    assert records.flag_arguments("nesterov", "false", facts) == ["--no-nesterov"]
    assert records.flag_arguments("nesterov", "True", facts) == ["--nesterov"]
    assert records.flag_arguments("adam_eps", "1e-10", facts) == ["--adam-eps", "1e-10"]
    assert records.flag_arguments("run_name", "tiny", facts) == ["--run-name", "tiny"]
    assert records.flag_arguments("seed", "null", facts) is None


def test_target_from_the_logs_headers(tmp_path):
    record = tmp_path / "rec"
    record.mkdir()
    example_copy(record / "a.txt", val_loss_target="3.3")
    s = summary_of(str(record))[0]
    assert s["target"] == 3.3 and s["step"] == 175 and any("val_loss_target" in n for n in s["notes"])
    assert summary_of(str(record), target=3.28)[0]["step"] is None  # --target wins
    # the summary the trainer writes after each run: `summary RECORD_DIR --write`
    proc = cli("summary", record, "--write")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("record: step 175")
    assert json.loads((record / "summary.json").read_text())["target"] == 3.3
    # logs of one record run for different targets: refused, naming them
    example_copy(record / "b.txt", val_loss_target="3.28")
    proc = cli("summary", record)
    assert proc.returncode == 2 and "different targets" in proc.stderr
    assert "3.3 in " in proc.stderr and "a.txt" in proc.stderr and "b.txt" in proc.stderr
    assert cli("summary", record, "--target", "3.3").returncode == 0
    # compare warns when A and B were run for different targets
    proc = cli("compare", record / "a.txt", EXAMPLE_LOG, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "A and B were run for different targets: A for 3.3" in proc.stderr
    data = json.loads(proc.stdout)
    assert data["target"] == 3.3 and "B for 3.28" in data["target_warning"]
    assert "warning" not in cli("compare", EXAMPLE_LOG, EXAMPLE_LOG).stderr
    example_copy(record / "b.txt", val_loss_target='"high"')
    with pytest.raises(RecordsError, match="val_loss_target '\"high\"' is not a finite positive"):
        summary_of(str(record / "b.txt"))


def test_each_file_is_counted_once(tmp_path):
    record = tmp_path / "rec"
    shutil.copytree(EXAMPLE_DIR, record)
    log = record / os.path.basename(EXAMPLE_LOG)
    for paths in ([record, record], [record, log], [log, log]):  # the same file given twice
        s = summary_of([str(p) for p in paths], target=3.3)[0]
        assert s["n"] == 3 and s["duplicates"] == [], paths
        assert any(n.startswith("read once: 1 file(s) given more than once") for n in s["notes"])
    shutil.copy(log, record / "z-copy.txt")  # a copy of the log: its trials are the same trials
    s = write_summary(str(record), target=3.3)
    assert s["n"] == 3 and len(s["duplicates"]) == 3 and all(d["copy"] for d in s["duplicates"])
    assert s["duplicates"][0]["duplicate_of"] == f"{log.name} trial 0"  # relative to the folder
    assert {d["source"] for d in s["duplicates"]} == {"z-copy.txt"}
    assert any("z-copy.txt has the same content as" in n and "counted once" in n for n in s["notes"])
    out = cli("summary", record, "--target", "3.3").stdout
    assert "copy (counted once):" in out and "runs: n=3" in out


def test_groups_cover_our_header_hyperparameters(tmp_path):
    record = tmp_path / "rec"
    record.mkdir()
    example_copy(record / "a.txt")
    # lines that differ between runs of one record (the trainer's PER_RUN): one configuration
    example_copy(record / "b.txt", data_dir='"/elsewhere"', records_dir='"/r"', trials="5", seed="null")
    s = summary_of(str(record), target=3.3)[0]
    assert s.get("group") is None and s["n"] == 3 and len(s["duplicates"]) == 3  # same seeds
    example_copy(record / "b.txt", lr_matrix="0.05")  # another configuration
    s = summary_of(str(record), target=3.3)[0]
    assert s["group"] in ("a.txt", "b.txt") and len(s["groups"]) == 2 and s["n"] == 3
    assert any("differs from a.txt in: lr_matrix: 0.05" in n for n in s["notes"])
    out = cli("summary", record, "--target", "3.3").stdout
    assert f"the claim below is for group {s['group']}" in out and "group b.txt: n=3" in out
    pooled = cli("summary", record, "--target", "3.3", "--pool").stdout  # --pool: one summary
    assert "claim below is for group" not in pooled and "duplicate seed (counted once)" in pooled


MALFORMED = [
    "step:1/2 val_loss:3.1 train_time:1.0s step_avg:1.0ms step:1/2",  # a repeated step field
    "step:1/2 val_loss:3.1 val_loss:3.0 train_time:1.0s step_avg:1.0ms",  # two values of the metric
    "step:1/2 val_loss:3.1 train_time:1.0s step_avg:1.0ms total:7",  # a field of the parser's own
    "step:1/2 val_loss:3.1 train_time:1.0s step_avg:1.0ms seconds:x",
    "step:1/2 val_loss:3.1 :x train_time:1.0s step_avg:1.0ms",  # no key
    "step:1/2 val_loss:3.1 train-time:1.0s train_time:1.0s step_avg:1.0ms",  # not a field name
]


@pytest.mark.parametrize("line", MALFORMED)
def test_a_malformed_val_line_is_listed_and_skipped(tmp_path, line):
    write(tmp_path / "a.txt", ["trial:0 seed:0", val(1, 3.2, total=2), line, val(2, 3.1, total=2)])
    s = summary_of(str(tmp_path))[0]
    assert s["n"] == 1 and s["steps"] == [1, 2] and s["final_losses"] == [3.1]
    assert [b["text"] for b in s["bad_lines"]] == [line]
    proc = cli("summary", tmp_path, "--write")  # the trainer's summary after each run is written
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["bad_lines"][0]["line"] == 10


def test_fuzzed_val_lines_raise_only_records_error(tmp_path):
    lines = open(EXAMPLE_LOG).read().split("=" * 100 + "\n")[2].splitlines()
    vals = [line for line in lines if line.startswith("step:") and "val_loss" in line]
    rng, path = random.Random(0), tmp_path / "f.txt"
    for _ in range(300):
        line = rng.choice(vals)
        tokens = line.split()
        how = rng.randrange(4)
        if how == 0:  # cut
            line = line[:rng.randrange(len(line))]
        elif how == 1:  # a token repeated somewhere
            tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(tokens))
            line = " ".join(tokens)
        elif how == 2:  # a stretch repeated (a write replayed)
            a = rng.randrange(len(line))
            b = rng.randrange(a, len(line) + 1)
            line = line[:b] + line[a:]
        else:  # a character dropped in or replaced
            i = rng.randrange(len(line))
            line = line[:i] + rng.choice(":/ x9\x00٣") + line[i + rng.randrange(2):]
        path.write_text("trial:0 seed:1\n" + "\n".join([vals[0], line, vals[3], line]) + "\n")
        try:
            log = read_log(str(path))
            summarize(log["trials"])
        except RecordsError:
            pass


@pytest.mark.parametrize("content, why", [
    ("{not json", "not valid JSON"), ("", "empty"), ("[1, 2]", "not a JSON object (a list)"),
    (None, "a directory, not a file"),
])
def test_a_broken_config_json_is_named_not_a_crash(tmp_path, content, why):
    write(tmp_path / "a.txt", ["trial:0 seed:0", val(100, 3.27)])
    if content is None:
        (tmp_path / "config.json").mkdir()
    else:
        (tmp_path / "config.json").write_text(content)
    proc = cli("summary", tmp_path, "--write")
    assert proc.returncode == 0, proc.stderr
    assert f"config.json is {why}" in proc.stdout and "--append" in proc.stdout
    (tmp_path / "ok").mkdir()
    write(tmp_path / "ok" / "a.txt", ["trial:0 seed:0", val(100, 3.27)])
    (tmp_path / "ok" / "config.json").write_text('{"lr_matrix": 0.04}')
    assert "config.json" not in cli("summary", tmp_path / "ok").stdout


def test_paths_that_cannot_be_written_are_named(tmp_path, monkeypatch):
    write(tmp_path / "a.txt", ["trial:0 seed:0", val(100, 3.27)])
    proc = cli("summary", tmp_path / "a.txt" / "sub", "--write")  # a path under a file
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr

    def read_only(*args, **kwargs):  # root ignores chmod: the error a read-only folder gives
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    proc = cli("summary", tmp_path, "--write")
    assert proc.returncode == 2
    assert proc.stderr == f"error: cannot write {tmp_path / 'summary.json'}: Permission denied\n"
    monkeypatch.undo()
    proc = cli("submit", tmp_path, "--name", "x", "--out", tmp_path / "a.txt")
    assert proc.returncode == 2 and "exists and is not a directory" in proc.stderr


def test_submit_names_left_out_trials_relative_to_the_folder(tmp_path):
    record = make_submission(tmp_path / "rec")
    shutil.copy(os.path.join(record, "a.txt"), os.path.join(record, "copy.txt"))
    r = submit(record, "copies", out=str(tmp_path / "o"), date="2026-11-23", baseline=REFERENCE)
    readme = open(os.path.join(r["out"], "README.md")).read()
    assert r["summary"]["n"] == 4
    assert "- copy (counted once): copy.txt trial 0 repeats a.txt trial 0" in readme
    assert str(tmp_path) not in readme


# ------------------------------------------------------------------------------------------------
# The newer published Aurora records' in-repo copies, and the parent record by preset
# ------------------------------------------------------------------------------------------------

PUBLISHED_DIRS = {steps: os.path.join(ROOT, "records", f"published_aurora_{steps}")
                  for steps in (2930, 2890, 2860)}
# What upstream publishes (its result READMEs and leaderboard rows): n, the claimed step, the mean
# at it as published (digits: how many it gives), the margin where stated, the leaderboard's mean.
UPSTREAM_CLAIMS = {2930: dict(n=16, mean=3.27844375, digits=8, margin=0.006225, board=3.2784),
                   2890: dict(n=16, mean=3.2788, digits=4, margin=None, board=3.2788),
                   2860: dict(n=16, mean=3.278939375, digits=9, margin=0.0042425, board=3.2789)}
# Their READMEs' per-seed tables at the claimed step: the first 8 characters of each log's name
UPSTREAM_SEEDS = {
    2930: "d198124d 3.27695 cc3e4c68 3.27852 91c76856 3.27789 2e1a56d8 3.27749 6a9b2d1c 3.27853 "
          "6fea25b2 3.27804 d1cfc000 3.27869 f2dd09b2 3.27817 da49a1cb 3.27936 b5e875f3 3.27852 "
          "e9cb5656 3.27885 d47d8868 3.27948 e8e9f023 3.28112 667a2045 3.27732 4f52349c 3.27631 "
          "e45a078c 3.27986",
    2860: "c4b5e2ad 3.27765 d715cb87 3.27965 7b578310 3.27675 6f0d30bb 3.27978 58808330 3.27961 "
          "bb2723d5 3.27999 cb2d26ac 3.27696 242f921c 3.27746 5c30823b 3.27929 e782d1d7 3.27910 "
          "a5ad12b6 3.28025 73926855 3.28060 de02a52e 3.27822 15223178 3.27837 9df54a64 3.27969 "
          "8b1ae377 3.27966"}
UPSTREAM_FOLDERS = {2930: "20260514_aurora_proj_pruned_extended_contra",
                    2890: "20260522_ema_nesterov_aurora_proj", 2860: "20260525_aurora_ema_ref"}


@pytest.mark.parametrize("steps", sorted(PUBLISHED_DIRS))
def test_newer_published_copies_give_the_published_figures(steps):
    claim, folder = UPSTREAM_CLAIMS[steps], PUBLISHED_DIRS[steps]
    logs = records.load_record(folder)["logs"]
    assert len(logs) == 16 and all(log["code"] == "" for log in logs)  # output parts only
    seeds = []
    for log in logs:
        with open(log["path"], "rb") as f:
            assert f.readline() == b"=" * 100 + b"\n"
        (seed,) = [int(line.split("=")[1]) for line in log["environment"]
                   if line.startswith("Using seed=")]
        seeds.append(seed)
    assert sorted(seeds) == list(range(16))  # one log per seed, 0..15
    s = summarize([t for log in logs for t in log["trials"]])
    assert (s["n"], s["step"]) == (claim["n"], steps)
    assert round(s["mean"], claim["digits"]) == claim["mean"] and round(s["mean"], 4) == claim["board"]
    if claim["margin"] is not None:
        assert round(s["margin"], 7) == claim["margin"]
    assert s["incomplete"] == s["duplicates"] == s["bad_lines"] == []
    before = s["steps"][s["steps"].index(steps) - 1]  # the step before the claim fails
    assert [row["margin"] < 0.004 for row in s["per_step"] if row["step"] == before] == [True]
    if steps in UPSTREAM_SEEDS:
        words = UPSTREAM_SEEDS[steps].split()
        published = dict(zip(words[::2], map(float, words[1::2])))
        counted = records.screen([t for log in logs for t in log["trials"]])["counted"]
        assert {os.path.basename(r["source"])[:8]: r["losses"][r["steps"].index(steps)]
                for r in counted} == published
    if steps == 2930:  # its README also states z and p with sigma 0.0013
        z = s["margin"] / 0.0013
        assert round(z, 4) == 4.7885 and f"{0.5 * math.erfc(z / math.sqrt(2)):.2e}" == "8.40e-07"


@pytest.mark.skipif(not os.environ.get("MODDED_NANOGPT"), reason="MODDED_NANOGPT (a modded-nanogpt "
                    "checkout or git mirror) not set")
def test_newer_published_copies_are_the_output_parts_of_upstreams_logs():
    upstream = os.environ["MODDED_NANOGPT"]
    copies = [(PUBLISHED_DIRS[s], f) for s, f in UPSTREAM_FOLDERS.items()] + [
        (SOAP_DIRS[s], f) for s, f in SOAP_FOLDERS.items()]
    for copy, folder in copies:
        names = sorted(f for f in os.listdir(copy) if f.endswith(".txt"))
        listed = subprocess.run(["git", "-C", upstream, "ls-tree", "--name-only", "HEAD",
                                 f"records/track_3_optimization/results/{folder}/"],
                                capture_output=True, text=True, check=True).stdout.split()
        assert names == sorted(os.path.basename(p) for p in listed if p.endswith(".txt"))
        for name in names:
            log = subprocess.run(["git", "-C", upstream, "show",
                                  f"HEAD:records/track_3_optimization/results/{folder}/{name}"],
                                 capture_output=True, check=True).stdout
            start = log.index(b"\n" + b"=" * 100 + b"\n") + 1
            with open(os.path.join(copy, name), "rb") as f:
                assert f.read() == log[start:], name


def test_parent_table():
    from tools.parents import PARENTS, parent_path
    # each parent is there and claims its step: the record a lineage preset reproduces; for the
    # SOAP-Muon presets the record their published result built on (#44's is #41, no preset here:
    # #40's, its nearest preset ancestor)
    claims = dict(record=3175, aurora_2930=2930, aurora_2890=2890, aurora_2860=2860, soap_2750=2890,
                  soap_2720=2750, soap_2690=2720)
    assert sorted(PARENTS) == sorted(claims)
    for preset, step in claims.items():
        assert summary_of(parent_path(preset))[0]["step"] == step
    assert parent_path("record") == parent_path("tiny") == parent_path(None) == PUBLISHED == REFERENCE
    # a preset list (train_gpt.py applies them in order): its first preset that has a parent
    assert parent_path("aurora_2860+small") == parent_path("tiny+aurora_2860") == parent_path("aurora_2860")
    assert parent_path("small+tiny") == PUBLISHED


PRESET_PARENTS = [  # the preset's header value, the parent expected (under records/), its step
    ('"aurora_2860"', "published_aurora_2860", 2860), ('"aurora_2890"', "published_aurora_2890", 2890),
    ("aurora_2930", "published_aurora_2930", 2930),  # an older log's plain text
    ('"record"', "published_aurora_3175/track3_aurora_3175_n20.txt", 3175),
    ('"tiny"', "published_aurora_3175/track3_aurora_3175_n20.txt", 3175),
    (None, "published_aurora_3175/track3_aurora_3175_n20.txt", 3175)]  # no preset line


@pytest.mark.parametrize("preset, parent, steps", PRESET_PARENTS)
def test_diff_compares_with_the_parent_of_the_runs_preset(tmp_path, preset, parent, steps):
    run = write_ours(tmp_path / "a.txt", {0: [3.30, 3.285, 3.275], 1: [3.30, 3.284, 3.276]},
                     hp=dict(preset=preset) if preset else {})
    d = diff_records(run)
    assert d["b"] == os.path.join(ROOT, "records", parent) and d["compare"]["steps_b"] == steps
    assert f"records/{parent.split('/')[0]}/" in d["b_label"]
    proc = cli("diff", run)
    assert proc.returncode == 0, proc.stderr
    named = f"preset {preset.strip(chr(34))}" if preset else "no preset line"
    assert f"A's parent record ({named}): the published record" in proc.stdout
    assert f"B n={20 if steps == 3175 else 16} step {steps}" in proc.stdout


@pytest.mark.parametrize("preset, parent, n, steps", [
    ("soap_2690", "published_soap_2720", 10, 2720), ("soap_2720", "published_soap_2750", 20, 2750),
    ("soap_2750+tiny", "published_aurora_2890", 16, 2890)])
def test_the_soap_presets_parents(tmp_path, preset, parent, n, steps):
    """diff and submit default to the record the preset's published result built on; soap_2750's
    (#41) is no preset here, and both say that theirs is the nearest preset ancestor."""
    run = write_ours(tmp_path / "a.txt", {0: [3.30, 3.285, 3.275], 1: [3.30, 3.284, 3.276]},
                     hp=dict(preset=f'"{preset}"'))
    d = diff_records(run)
    assert d["b"] == os.path.join(ROOT, "records", parent)
    assert (d["compare"]["n_b"], d["compare"]["steps_b"]) == (n, steps)
    assert d["b_label"].startswith(f"A's parent record (preset {preset}): the published record, ")
    note = "(the nearest preset ancestor of #41, soap_2750's published parent, which is not a preset here)"
    assert d["b_label"].endswith(f"records/{parent}/){' ' + note if parent.endswith('2890') else ''}")
    if preset == "soap_2750+tiny":
        return
    r = submit(make_submission(tmp_path / "rec", hp=dict(preset=f'"{preset}"')), "p", out=str(tmp_path / "o"),
               date="2026-12-02")
    assert (r["comparison"]["n_b"], r["comparison"]["steps_b"]) == (n, steps)
    readme = open(os.path.join(r["out"], "README.md")).read()
    assert f"records/{parent}/), the default parent of preset {preset}." in readme


def test_the_soap_presets_note_in_submit(tmp_path):
    r = submit(make_submission(tmp_path / "rec", hp=dict(preset='"soap_2750"')), "p", out=str(tmp_path / "o"),
               date="2026-12-02")
    assert ("records/published_aurora_2890/), the default parent of preset soap_2750 (the nearest preset "
            "ancestor of #41, soap_2750's published parent, which is not a preset here).") in open(
        os.path.join(r["out"], "README.md")).read()


SOAP_DIRS = {steps: os.path.join(ROOT, "records", f"published_soap_{steps}") for steps in (2750, 2720, 2690)}
SOAP_FOLDERS = {2750: "20260609_soap_f1_auxb2_clean", 2720: "20260611_tailema_2720_submission",
                2690: "20260619_cwd_rowfloor_tailema"}
# the summary of each folder: logs, metric, n, step, mean (6 digits), margin (5 digits)
SOAP_SUMMARIES = {2750: (28, "val_loss", 20, 2750, 3.278857, 0.00511),
                  2720: (10, "val_loss", 10, 2720, 3.278565, 0.00454),
                  2690: (8, "val_ema_loss", 7, 2690, 3.278326, 0.00443)}


@pytest.mark.parametrize("steps", sorted(SOAP_DIRS))
def test_the_soap_frontiers_published_copies_give_the_published_figures(steps):
    """What summary prints for each folder (its README's table), and upstream's figures where
    they differ by what is counted: #44's A40 logs apart, #46 with its cut seed-7 log."""
    files, metric, n, step, mean, margin = SOAP_SUMMARIES[steps]
    s, _, record = summary_of(SOAP_DIRS[steps])
    assert len(record["logs"]) == files and all(log["code"] == "" for log in record["logs"])
    assert record["metric"] == metric
    assert any(note.startswith("metric val_ema_loss: ") for note in s["notes"]) == (steps == 2690)
    assert (s["n"], s["step"], round(s["mean"], 6), round(s["margin"], 5)) == (n, step, mean, margin)
    if steps == 2750:  # the 8 A40 logs stop at 2850: left out; alone they pass at 2755
        assert len(s["incomplete"]) == 8
        a40 = summary_of([log["path"] for log in record["logs"] if "/A40_" in log["path"]])[0]
        assert (a40["n"], a40["step"], round(a40["mean"], 6)) == (8, 2755, 3.278565)
    if steps == 2690:  # upstream counts seed 7 (its log ends at 2765): 3.278329, margin 0.00473
        (cut,) = s["incomplete"]
        assert "seed7" in cut["source"] and cut["last_step"] == 2765
        at = [r["losses"][r["steps"].index(2690)] for r in record["runs"]]
        assert len(at) == 8 and round(sum(at) / 8, 6) == 3.278329
        assert round((3.28 - sum(at) / 8) * math.sqrt(8), 5) == 0.00473


def test_diff_baseline_overrides_the_preset(tmp_path):
    run = write_ours(tmp_path / "a.txt", {0: [3.30, 3.285, 3.275], 1: [3.30, 3.284, 3.276]},
                     hp=dict(preset='"aurora_2860"'))
    for args in ([PUBLISHED_DIRS[2930]], ["--baseline", PUBLISHED_DIRS[2930]]):
        out = cli("diff", run, *args, "--json").stdout
        data = json.loads(out)
        assert data["b"] == PUBLISHED_DIRS[2930] and data["compare"]["steps_b"] == 2930
        assert "parent record" not in data["b_label"] and "#30" in data["b_label"]
    other = write_ours(tmp_path / "b.txt", {2: [3.30, 3.285, 3.275]})
    assert json.loads(cli("diff", run, other, "--json").stdout)["b_label"] is None
    proc = cli("diff", run, other, "--baseline", other)
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_submit_default_parent_by_preset_and_baseline_override(tmp_path):
    record = make_submission(tmp_path / "rec", hp=dict(preset='"aurora_2860"'))
    r = submit(record, "p2860", out=str(tmp_path / "o1"), date="2026-12-01")
    assert (r["comparison"]["n_b"], r["comparison"]["steps_b"]) == (16, 2860)
    readme = open(os.path.join(r["out"], "README.md")).read()
    assert ("- Parent record: the published record, modded-nanoGPT optimization track #42 (" in readme
            and "records/published_aurora_2860/), the default parent of preset aurora_2860." in readme)
    assert "| parent | 16 | 2860 | 3.278939 |" in readme
    proc = cli("submit", record, "--name", "p2930", "--out", tmp_path / "o2", "--baseline",
               PUBLISHED_DIRS[2930], "--date", "2026-12-01")
    assert proc.returncode == 0, proc.stderr
    readme = (tmp_path / "o2" / "README.md").read_text()
    assert "track #30 (" in readme and "default parent" not in readme
    assert "| parent | 16 | 2930 | 3.278444 |" in readme
