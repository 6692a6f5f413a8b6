"""tools/records.py: parsing every log variant, the statistics, compare, plot, errors, CLI."""
import json
import math
import os
import subprocess
import sys

import pytest

from tools.records import RecordsError, compare, load_runs, parse_log, summarize, write_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "..", "shared", "reference-logs", "track3_aurora_3175_n20.txt")
CLI = [sys.executable, os.path.join(ROOT, "tools", "records.py")]

CODE = '''import os
print(f"step:{step}/{total} val_loss:{val_loss:.5f} train_time:{t:.3f}s")
# step:1/2 val_loss:9.9 train_time:0.0s step_avg:0ms   <- decoy inside the code
'''


def val(step, loss, total=100, extra=""):
    return f"step:{step}/{total} val_loss:{loss:.5f} train_time:{step * 0.1:.3f}s step_avg:100.00ms{extra}"


def write(path, lines, code=CODE):
    path.write_text(code + "=" * 100 + "\nheader: torch 2.x\n" + "=" * 100 + "\n" + "\n".join(lines) + "\n")
    return str(path)


def test_code_prefix_decoys_progress_lines_and_extra_fields(tmp_path):
    path = write(tmp_path / "a.txt", [
        "step:0/100 val_loss:10.82584 train_time:0.000s step_avg:nanms",
        "step:1/100 train_loss:10.8 train_time:1.0s step_avg:1000.00ms",  # progress: ignored
        val(50, 4.0, extra=" ema_beta:0 ref_gamma:-0.075"),
        val(100, 3.5)])
    (trial,) = parse_log(path)
    assert trial["steps"] == [0, 50, 100] and trial["losses"] == [10.82584, 4.0, 3.5]
    assert trial["total_steps"] == 100 and trial["seed"] is None
    assert math.isclose(trial["train_time"][1], 5.0)


def test_multi_trial_file_without_step_zero_and_seed_lines(tmp_path):
    path = write(tmp_path / "a.txt", [
        "trial:0 seed:7", val(125, 4.0), val(250, 3.5),
        "trial:1 seed:8", val(125, 4.1), val(250, 3.6),
        val(125, 4.2), val(250, 3.7)])  # a third trial with no seed line
    trials = parse_log(path)
    assert [t["seed"] for t in trials] == [7, 8, None]
    assert [t["steps"] for t in trials] == [[125, 250]] * 3
    assert [t["losses"][-1] for t in trials] == [3.5, 3.6, 3.7]


def test_one_file_per_seed_directory_and_other_metric(tmp_path):
    for i, loss in enumerate([3.2, 3.3]):
        write(tmp_path / f"seed{i}.txt", [val(100, loss + 1, extra=f" val_ema_loss:{loss:.5f}")])
    (tmp_path / "notes.md").write_text("not a log")
    runs = load_runs([str(tmp_path)])
    assert [r["losses"] for r in runs] == [[4.2], [4.3]]
    runs = load_runs([str(tmp_path)], metric="val_ema_loss")
    assert [r["losses"] for r in runs] == [[3.2], [3.3]]


def test_statistics_by_hand(tmp_path):
    losses = {100: [3.30, 3.31, 3.29, 3.30], 200: [3.279, 3.275, 3.277, 3.273]}
    for i in range(4):
        write(tmp_path / f"{i}.txt", [val(s, losses[s][i], total=200) for s in (100, 200)])
    s = summarize(load_runs([str(tmp_path)]))
    assert s["n"] == 4 and s["steps"] == [100, 200]
    row = s["per_step"][1]
    assert math.isclose(row["mean"], 3.276)  # (3.279 + 3.275 + 3.277 + 3.273) / 4
    assert math.isclose(row["std"], math.sqrt((9 + 1 + 1 + 9) * 1e-6 / 3))  # ddof=1
    assert math.isclose(row["margin"], (3.28 - 3.276) * 2)  # sqrt(4) = 2: 0.008
    assert s["step"] == 200 and math.isclose(s["mean"], 3.276)
    assert math.isclose(s["per_step"][0]["margin"], (3.28 - 3.30) * 2)
    assert s["first_step_at_target"] == [200, 200, 200, 200]
    assert s["final_losses"] == [3.279, 3.275, 3.277, 3.273]


def test_no_passing_step_reports_the_last_common_step(tmp_path):
    write(tmp_path / "a.txt", [val(100, 3.30), val(200, 3.279)])  # one run needs < 3.276
    s = summarize(load_runs([str(tmp_path)]))
    assert s["step"] is None and s["mean"] == 3.279 and s["final_step"] == 200
    assert s["first_step_at_target"] == [200]


@pytest.mark.skipif(not os.path.exists(REFERENCE), reason="shared reference log not present")
def test_reference_log_gives_the_published_record():
    runs = load_runs([REFERENCE])
    s = summarize(runs)
    assert s["n"] == 20 and s["step"] == 3175 and round(s["mean"], 6) == 3.278845
    assert round(s["margin"], 5) == 0.00517
    by_step = {row["step"]: row["mean"] for row in s["per_step"]}
    assert round(by_step[3150], 5) == 3.28039 and round(by_step[3200], 5) == 3.27811
    proc = subprocess.run(CLI + ["summary", REFERENCE, "--json"], capture_output=True, text=True)
    assert proc.returncode == 0
    data = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert (data["n"], data["step"], round(data["mean"], 6)) == (20, 3175, 3.278845)


def make_record(directory, means, n, steps=(3000, 3100, 3200), spread=0.001):
    directory.mkdir()
    for i in range(n):
        offset = spread * (i - (n - 1) / 2)  # symmetric around the mean
        write(directory / f"{i}.txt", [val(s, m + offset, total=3200) for s, m in zip(steps, means)])
    return load_runs([str(directory)])


def test_compare_known_answers(tmp_path):
    good = make_record(tmp_path / "good", [3.29, 3.277, 3.270], 4)   # passes at 3100
    bad = make_record(tmp_path / "bad", [3.30, 3.290, 3.279], 4)     # never passes: final 3200
    c = compare(good, bad)
    assert c["a"]["steps"] == 3100 and c["b"]["steps"] == 3200 and not c["b"]["passes"]
    # by hand: (3.279 - 3.277) + (3200 - 3100) / 100 * 0.0045 = 0.0065; / sqrt(1/4 + 1/4)
    assert math.isclose(c["final_loss_diff"], 0.002, abs_tol=1e-12)
    assert math.isclose(c["exp_stepbased_loss_diff"], 0.0045)
    assert math.isclose(c["z"], 0.0065 / math.sqrt(0.5))
    assert c["verdict"] == "A is significantly better than B"
    assert compare(bad, good)["verdict"] == "B is significantly better than A"
    same = make_record(tmp_path / "same", [3.29, 3.2771, 3.270], 4)
    assert compare(good, same)["verdict"] == "no significant difference"
    assert [row["step"] for row in c["side_by_side"]] == [3000, 3100, 3200]


def test_compare_and_plot_cli_write_png(tmp_path):
    make_record(tmp_path / "a", [3.29, 3.277, 3.270], 2)
    make_record(tmp_path / "b", [3.30, 3.285, 3.279], 3)
    png = tmp_path / "cmp.png"
    proc = subprocess.run(CLI + ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--png", str(png)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "significantly better" in proc.stdout or "no significant difference" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    png2 = tmp_path / "plot.png"
    proc = subprocess.run(CLI + ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--png", str(png2),
                                 "--band", "std"], capture_output=True, text=True)
    assert proc.returncode == 0 and png2.read_bytes()[:4] == b"\x89PNG"


def test_write_summary(tmp_path):
    write(tmp_path / "x.txt", ["trial:0 seed:3", val(50, 3.5), val(100, 3.27)])
    s = write_summary(str(tmp_path), extra={"torch": "2.13"})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["n"] == 1 and on_disk["step"] == 100 and on_disk["environment"] == {"torch": "2.13"}
    assert on_disk["runs"] == [dict(log="x.txt", trial=0, seed=3, final_step=100, final_loss=3.27,
                                    first_step_at_target=100)]
    assert s["mean"] == on_disk["mean"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: str(d / "missing.txt"), "no such file"),
    (lambda d: str(d), "no .txt logs found"),
    (lambda d: write(d / "a.txt", ["step:1/10 train_loss:3.0 train_time:1s"]), "no validation lines"),
])
def test_errors(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(RecordsError, match=message):
        load_runs([path])
    proc = subprocess.run(CLI + ["summary", path], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and message in proc.stderr


def test_runs_without_common_steps(tmp_path):
    write(tmp_path / "a.txt", [val(100, 3.3)])
    write(tmp_path / "b.txt", [val(200, 3.3)])
    with pytest.raises(RecordsError, match="no validated step in common"):
        summarize(load_runs([str(tmp_path)]))


def test_unreadable_file(tmp_path):
    path = tmp_path / "dir.txt"
    path.mkdir()  # a directory named like a log: open() fails
    with pytest.raises(RecordsError, match="cannot read"):
        parse_log(str(path))
