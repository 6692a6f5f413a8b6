"""tools/records.py: parsing every log variant, the statistics, compare, plot, errors, CLI."""
import json
import math
import os
import subprocess
import sys

import pytest

from tools.records import (RecordsError, compare, load_runs, parse_log, plot_records, summarize,
                           write_summary)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "..", "shared", "reference-logs", "track3_aurora_3175_n20.txt")
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
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


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
        "trial:0 seed:7 lr:0.1", val(125, 4.0), val(250, 3.5),
        "trial:1 seed:8", val(125, 4.1), val(250, 3.6),
        val(125, 4.2), val(250, 3.7)])  # a third trial with no seed line: step went back
    trials = parse_log(path)
    assert [t["seed"] for t in trials] == [7, 8, None]
    assert [t["trial"] for t in trials] == [0, 1, 2]
    assert [t["steps"] for t in trials] == [[125, 250]] * 3
    assert [t["losses"][-1] for t in trials] == [3.5, 3.6, 3.7]


def test_seed_line_starts_a_trial_even_if_the_step_increases(tmp_path):
    # trial 0 stopped at step 100; trial 1's first val line is at 125
    path = write(tmp_path / "a.txt", ["trial:0 seed:1", val(0, 10.8), val(100, 4.0),
                                      "trial:1 seed:2", val(125, 3.9), val(250, 3.5)])
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
    write(tmp_path / "a.txt", [val(100, 3.30), val(200, 3.2765)])  # one run needs < 3.276
    s = summarize(load_runs([str(tmp_path)]))
    assert s["step"] is None and s["mean"] == 3.2765 and s["final_step"] == 200 and s["std"] == 0.0
    assert s["first_step_at_target"] == [200]
    out = cli("summary", tmp_path).stdout
    assert "record: not reached" in out and "pass" not in out.replace("does not pass", "")


def test_only_common_steps_count(tmp_path):
    write(tmp_path / "a.txt", [val(100, 3.30), val(150, 3.27), val(200, 3.26)])
    write(tmp_path / "b.txt", [val(100, 3.30), val(200, 3.26)])  # no val at 150
    s = summarize(load_runs([str(tmp_path)]))
    assert s["steps"] == [100, 200] and s["step"] == 200


@pytest.mark.skipif(not os.path.exists(REFERENCE), reason="shared reference log not present")
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
    write(tmp_path / "x.txt", [val(50, 3.5), "step:100/100 val_loss:nan train_time:1.0s step_avg:nanms"])
    write_summary(str(tmp_path))
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text
    s = json.loads(text)
    assert s["step"] is None and s["mean"] is None


# ------------------------------------------------------------------------------------------------
# Errors: RecordsError from the API, `error: ...` and status 2 from the CLI
# ------------------------------------------------------------------------------------------------

def no_common_steps(d):
    write(d / "a.txt", [val(100, 3.3)])
    write(d / "b.txt", [val(200, 3.3)])
    return str(d)


def unreadable(d):
    (d / "log.txt").mkdir()  # listed as a log, but open() fails (chmod does not stop root)
    return str(d)


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
