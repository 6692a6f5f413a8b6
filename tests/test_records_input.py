"""tools/records.py and tools/check_leaderboard.py on input that cannot be right: a summary never
prints a record the numbers do not support, nonsense is refused (status 2, one `error:` line on
stderr, nothing written) before anything is written, and a folder that cannot be walked or read
whole is skipped with a notice instead of hanging."""
import io
import json
import math
import os
import runpy
import subprocess
import threading
import contextlib

import pytest

from test_records import CLI, ROOT, cli, val, write, write_ours
from tools import check_leaderboard, parents
from tools.logs import RecordsError, parse_log, read_log
from tools.summary import summary_of

GOOD = (3.29, 3.277, 3.270)  # three trials around these pass at 3100 (margin 0.0052)


def l3(directory, last=None, lines=()):
    """A 3-trial record (one log, seeds 0..2, steps 3000/3100/3200 of 3200); `last` replaces the
    final val line of trial 2 (a line of text), `lines` are appended to the log."""
    directory.mkdir()
    path = write_ours(directory / "a.txt", {s: [m + 0.001 * (s - 1) for m in GOOD] for s in range(3)})
    text = open(path).read()
    if last is not None:
        final = val(3200, GOOD[2] + 0.001, total=3200)
        assert text.endswith(final + "\n")
        text = text[:-len(final) - 1] + last + "\n"
    open(path, "w").write(text + "".join(line + "\n" for line in lines))
    return path


def refused(proc, *words):
    """The command refused: status 2, one `error:` line naming what is wrong, no output."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert proc.stdout == "" and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# 1. A target is a finite positive number
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["inf", "nan", "-inf", "0", "-3.28"])
def test_a_target_that_is_not_a_finite_positive_number_is_refused(tmp_path, target):
    record = os.path.dirname(l3(tmp_path / "rec"))
    for command in (["summary", record], ["summary", record, "--json"],
                    ["summary", record, "--write"], ["compare", record, record],
                    ["diff", record, record], ["plot", record, "--png", tmp_path / "p.png"],
                    ["submit", record, "--name", "x", "--out", tmp_path / "out"]):
        refused(cli(*command, f"--target={target}"), "--target", "finite positive")
    assert sorted(os.listdir(tmp_path)) == ["rec"] and os.listdir(record) == ["a.txt"]  # nothing written
    with pytest.raises(RecordsError, match="finite positive"):
        summary_of(record, float(target))


@pytest.mark.parametrize("logged", ["inf", "NaN", "-3.28", "0"])
def test_a_logged_val_loss_target_that_is_not_a_finite_positive_number_is_refused(tmp_path, logged):
    record = tmp_path / "rec"
    record.mkdir()
    write_ours(record / "a.txt", {0: GOOD}, hp=dict(val_loss_target=logged))
    refused(cli("summary", record, "--write"), "val_loss_target", "finite positive")
    assert os.listdir(record) == ["a.txt"]


# ------------------------------------------------------------------------------------------------
# 2-4. A val line counts only with a finite positive loss at a step within its run
# ------------------------------------------------------------------------------------------------

BAD_FINAL = [  # trial 2's last validation, whole but unusable
    ("step:3200/3200 val_loss:-3.00000 train_time:320.000s step_avg:100.00ms", "not a finite positive loss"),
    ("step:3200/3200 val_loss:-inf train_time:320.000s step_avg:100.00ms", "not a finite positive loss"),
    ("step:3200/3200 val_loss:nan train_time:320.000s step_avg:nanms", "not a finite positive loss"),
    ("step:3200/3200 val_loss:inf train_time:320.000s step_avg:100.00ms", "not a finite positive loss"),
    ("step:3200/3200 val_loss:0 train_time:320.000s step_avg:100.00ms", "not a finite positive loss"),
    ("step:99999999999999999999999/3200 val_loss:3.20000 train_time:320.000s step_avg:100.00ms",
     "not within its run's 3200 steps"),
    ("step:-5/3200 val_loss:3.20000 train_time:320.000s step_avg:100.00ms", "step -5 is negative"),
]


@pytest.mark.parametrize("line, why", BAD_FINAL)
def test_an_unusable_val_line_is_listed_as_bad_never_pooled(tmp_path, line, why):
    path = l3(tmp_path / "rec", last=line)
    s = json.loads(cli("summary", path, "--json").stdout)
    assert s["n"] == 2 and s["seeds"] == [0, 1]  # trial 2 is left out, not pooled
    assert all(math.isfinite(v) and v > 0 for v in s["final_losses"]) and s["final_step"] == 3200
    (bad,) = s["bad_lines"]
    assert bad["text"] == line and why in bad["reason"] and bad["cut"] is False
    assert [i["seed"] for i in s["incomplete"]] == [2] and why in s["incomplete"][0]["reason"]
    out = cli("summary", path).stdout
    assert "bad line (ignored)" in out and "cut line" not in out  # whole: never called cut


@pytest.mark.parametrize("line, why", BAD_FINAL[:3])
def test_unusable_losses_never_make_a_record_or_a_better_comparison(tmp_path, line, why):
    record = tmp_path / "rec"
    record.mkdir()
    write(record / "a.txt", [text for s in range(3) for text in (
        f"trial:{s} seed:{s}", val(3000, GOOD[0], 3200), val(3100, GOOD[1], 3200), line)])
    refused(cli("summary", record), "no complete trial", why)
    refused(cli("submit", record, "--name", "x", "--out", tmp_path / "out"), "no complete trial")
    assert not (tmp_path / "out").exists()
    good = os.path.dirname(l3(tmp_path / "good"))
    refused(cli("compare", record, good), "no complete trial")
    d = json.loads(cli("diff", record, good, "--json").stdout)
    assert d["compare"] is None and d["compare_error"].startswith("no complete trial")
    assert all(math.isfinite(row["a"]) and row["a"] > 0 for row in d["side_by_side"])
    assert "z +nan" not in cli("diff", record, good).stdout
    # upstream logs (no trial lines, no end line) that all end in it: not a clean end at 3100
    write(tmp_path / "up.txt", [text for s in range(3) for text in (
        val(0, 10.8, 3200), val(3000, GOOD[0], 3200), val(3100, GOOD[1], 3200), line)])
    refused(cli("summary", tmp_path / "up.txt"), "no complete trial", why)


def test_a_step_outside_its_run_does_not_move_the_common_last_step(tmp_path):
    huge = "step:99999999999999999999999/4 val_loss:3.10000 train_time:1.000s step_avg:100.00ms"
    path = write(tmp_path / "a.txt", ["trial:0 seed:0", val(2, 3.5, 4), huge, val(4, 3.27, 4),
                                      "step:5/0 train_loss:3.0 train_time:1.0s step_avg:1.00ms"])
    (trial,) = parse_log(path)
    assert trial["steps"] == [2, 4] and trial["complete"]
    s = json.loads(cli("summary", path, "--json").stdout)
    assert s["final_step"] == 4 and s["final_losses"] == [3.27]
    assert [(b["line"], b["reason"]) for b in s["bad_lines"]] == [
        (10, "step 99999999999999999999999 is not within its run's 4 steps"),
        (12, "step 5 is not within its run's 0 steps")]


# ------------------------------------------------------------------------------------------------
# 5. --metric names a validation field; every output names the metric and the target
# ------------------------------------------------------------------------------------------------

def test_a_metric_that_is_not_a_validation_field_is_refused(tmp_path):
    path = write(tmp_path / "a.txt", ["step:1/4 train_loss:3.0 train_time:1.0s step_avg:1.00ms",
                                      val(4, 3.27, 4, extra=" val_ema_loss:3.26")])
    for command in (["summary", path], ["compare", path, path], ["diff", path, path],
                    ["plot", path, "--png", tmp_path / "p.png"]):
        for metric in ("train_loss", "", "step"):
            refused(cli(*command, "--metric", metric), f"--metric {metric!r}",
                    "not a validation field", "carry: val_ema_loss, val_loss")
    with pytest.raises(RecordsError, match="not a validation field"):
        read_log(path, "train_loss")
    assert os.listdir(tmp_path) == ["a.txt"]


def test_every_output_names_its_metric_and_target(tmp_path):
    path = write(tmp_path / "a.txt", [val(4, 3.27, 4, extra=" val_ema_loss:3.26")])
    args = ("--metric", "val_ema_loss", "--target", "3.3")
    assert "metric: val_ema_loss  target: 3.3 " in cli("summary", path, *args).stdout
    s = json.loads(cli("summary", path, *args, "--json").stdout)
    assert s["metric"] == "val_ema_loss" and s["target"] == 3.3 and s["final_losses"] == [3.26]
    assert "metric: val_ema_loss  target: 3.3\n" in cli("compare", path, path, *args).stdout
    c = json.loads(cli("compare", path, path, *args, "--json").stdout)
    assert (c["metric_a"], c["metric_b"], c["target"]) == ("val_ema_loss", "val_ema_loss", 3.3)
    assert "metric: val_ema_loss  target: 3.3\n" in cli("diff", path, path, *args).stdout


def test_submit_names_its_metric_and_target_and_links_without_spaces(tmp_path):
    record = tmp_path / "rec"
    record.mkdir()
    for f, seeds in (("a b.txt", (0, 1)), ("c.txt", (2, 3))):
        write_ours(record / f, {s: [m + 0.001 * (s - 1.5) for m in GOOD] for s in seeds})
    out = tmp_path / "sub u6"
    proc = cli("submit", record, "--name", "x", "--out", out, "--target", "3.29", "--date", "2026-11-23")
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.splitlines()[-1]
    assert "(steps to 3.29 on val_loss; also in the README)" in proc.stdout
    assert "(target 3.29) |" in row and "/sub%20u6/a%20b.txt)" in row and "sub u6" not in row
    readme = (out / "README.md").read_text()
    assert readme.startswith("# x: val_loss 3.29 in ") and "Claimed on `val_loss` (target 3.29)" in readme
    assert "[a b.txt](a%20b.txt)" in readme and row in readme


# ------------------------------------------------------------------------------------------------
# 6. A folder that cannot be walked whole: skipped parts, with a notice, never a hang
# ------------------------------------------------------------------------------------------------

def within(seconds, function):
    """function()'s result, or a test failure when it has not returned after `seconds` (a hang)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"no result after {seconds} s: it hangs"
    return result[0]


def test_links_back_fifos_and_folders_named_txt_are_skipped_with_a_notice(tmp_path):
    record = os.path.dirname(l3(tmp_path / "rec"))
    os.mkdir(os.path.join(record, "sub"))
    os.symlink("..", os.path.join(record, "sub", "up"))  # a loop
    os.symlink("/", os.path.join(record, "sub", "top"))  # the whole file system
    os.mkfifo(os.path.join(record, "x.txt"))  # open() would wait for a writer forever
    os.mkfifo(os.path.join(record, "README.md"))
    os.mkfifo(os.path.join(record, "config.json"))
    os.mkdir(os.path.join(record, "y.txt"))  # a folder named like a log: walked as a folder
    write_ours(tmp_path / "rec" / "y.txt" / "d.txt", {9: [m + 0.0005 for m in GOOD]})
    proc = within(30, lambda: cli("summary", record))
    assert proc.returncode == 0, proc.stderr
    assert "record: step 3100" in proc.stdout and "(n=4)" in proc.stdout
    assert f"note: skipped {record}/sub/up: a link to a folder already read" in proc.stderr
    assert f"note: skipped {record}/sub/top: a link to /, a folder that holds {record}" in proc.stderr
    assert f"note: skipped {record}/x.txt: not a regular file" in proc.stderr
    assert "config.json is not a regular file" in proc.stdout
    refused(within(30, lambda: cli("summary", os.path.join(record, "x.txt"))), "not a regular file")


# ------------------------------------------------------------------------------------------------
# 7. plot --png names a .png file
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("png", ["p.txt", "", "DIR", "noext", ".png", "DIR.png"])
def test_plot_refuses_a_png_path_that_is_not_a_png_file(tmp_path, monkeypatch, png):
    record = os.path.dirname(l3(tmp_path / "rec"))
    monkeypatch.chdir(tmp_path)
    os.mkdir("DIR")
    os.mkdir("DIR.png")
    refused(cli("plot", record, "--png", png), "--png")
    refused(cli("compare", record, record, "--png", png), "--png")
    assert sorted(os.listdir(tmp_path)) == ["DIR", "DIR.png", "rec"] and not os.listdir("DIR")


def test_plot_prints_the_path_it_wrote(tmp_path, monkeypatch):
    record = os.path.dirname(l3(tmp_path / "rec"))
    monkeypatch.chdir(tmp_path)
    proc = cli("plot", record, "--png", "curves.PNG")
    assert proc.returncode == 0 and proc.stdout == "wrote curves.PNG\n"
    assert open("curves.PNG", "rb").read(4) == b"\x89PNG"


# ------------------------------------------------------------------------------------------------
# 8. check_leaderboard reports a malformed row; tools/parents.py is not a command
# ------------------------------------------------------------------------------------------------

def test_check_leaderboard_reports_malformed_rows(tmp_path):
    track = tmp_path / "track"
    track.mkdir()
    l3(track / "results")
    rows = ["| 1 | 3100 | 3.2770 (n=3)✓ | ok | 2026 | [log](results/a.txt) | x |",
            "| 2 | 3100 | 5 (n=3)✓ | mean 5 | 2026 | [log](results/a.txt) | x |",
            "| 3 | 3100 | 5.4.4 (n=3)✓ | mean 5.4.4 | 2026 | [log](results/a.txt) | x |",
            "| 4 | 3100 |",
            "| 5 | 31x0 | 3.2770 (n=3)✓ | steps | 2026 | [log](results/a.txt) | x |"]
    (track / "README.md").write_text("| # | Steps to 3.28 | Evidence |\n| - | - | - |\n"
                                     + "\n".join(rows) + "\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert check_leaderboard.main([str(track)]) == 0
    text = out.getvalue()
    assert "| 1 | `a.txt` | 3100 3.2770 (n=3) | 3100 3.2770 (n=3) | yes |" in text
    assert "| 2 | `?` | not read |  | **no** | malformed leaderboard row: mean '5' is not a decimal" in text
    assert "| 3 |" in text and "mean '5.4.4' is not a decimal" in text
    assert "| 4 |" in text and "2 cells, 7 expected" in text
    assert "steps '31x0' is not a step count" in text and "1 of 5 rows match." in text


def test_a_library_module_run_as_a_script_says_so(capsys):
    for name in ("parents", "logs", "stats", "summary", "compare", "plots", "submit"):
        with pytest.raises(SystemExit, match=f"tools/{name}.py is a module .*tools/records.py --help"):
            runpy.run_path(os.path.join(ROOT, "tools", f"{name}.py"), run_name="__main__")


# ------------------------------------------------------------------------------------------------
# 9. What differs between configurations is said whole; the default parent is named as such
# ------------------------------------------------------------------------------------------------

def test_the_groups_note_names_every_differing_hyperparameter(tmp_path):
    record = tmp_path / "rec"
    record.mkdir()
    write_ours(record / "a.txt", {0: GOOD})
    changed = dict(lr_matrix="0.05", lr_head="0.004", train_steps="3300", optimizer='"muon"',
                   contra_fade="3", diagnostics="false")
    write_ours(record / "b.txt", {1: GOOD}, hp=changed)
    s = json.loads(cli("summary", record, "--json").stdout)
    (note,) = [n for n in s["notes"] if n.startswith("group ")]
    assert "b.txt differs from a.txt in: contra_fade: 3; diagnostics: false; lr_head: 0.004; " \
        "and 3 more: lr_matrix, optimizer, train_steps" in note


def test_a_missing_default_parent_is_named_as_the_default_parent(tmp_path, monkeypatch):
    record = os.path.dirname(l3(tmp_path / "rec"))
    monkeypatch.setattr(parents, "PUBLISHED_DIR", str(tmp_path / "nowhere"))
    refused(cli("diff", record), "the default parent record", "preset none", "give B, or --baseline")
    refused(cli("submit", record, "--name", "x", "--out", tmp_path / "out"),
            "the default parent record", "give --baseline")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", ["0", "-1"])
def test_new_trials_must_be_positive(tmp_path, n):
    refused(cli("summary", l3(tmp_path / "rec"), "--new-trials", n), "--new-trials must be >= 1")


def test_new_trials_must_be_an_integer(tmp_path):
    proc = cli("summary", l3(tmp_path / "rec"), "--new-trials", "nan")
    assert proc.returncode == 2 and "invalid int value: 'nan'" in proc.stderr and proc.stdout == ""


# ------------------------------------------------------------------------------------------------
# A pass on another task (the tiny preset's synthetic shards) is never a leaderboard result
# ------------------------------------------------------------------------------------------------

def synthetic_record(directory):
    """l3's record as the tiny preset would log it: a 1024-token vocabulary (synthetic shards)."""
    directory.mkdir()
    return write_ours(directory / "a.txt", {s: [m + 0.001 * (s - 1) for m in GOOD] for s in range(3)},
                      hp=dict(vocab_size="1024", data_dir='"data/synthetic"'))


def test_a_pass_on_synthetic_shards_is_said_to_be_no_leaderboard_result(tmp_path):
    record = os.path.dirname(synthetic_record(tmp_path / "syn"))
    text = cli("summary", record).stdout.splitlines()
    assert text[-1].startswith("record: step 3100 ") and text[-1].endswith(
        "[not a leaderboard result: a 1024-token vocabulary (synthetic shards), not FineWeb in "
        "GPT-2's 50257 tokens]"), text[-1]
    assert json.loads(cli("summary", record, "--json").stdout)["task"].startswith("a 1024-token")
    # the leaderboard's task: no such mark (ours with vocab_size 50304; upstream's without the line)
    for hp in (dict(vocab_size="50304"), {}):
        fineweb = tmp_path / f"fineweb{len(hp)}"
        fineweb.mkdir()
        write_ours(fineweb / "a.txt", {s: [m + 0.001 * (s - 1) for m in GOOD] for s in range(3)}, hp=hp)
        s = json.loads(cli("summary", fineweb, "--json").stdout)
        assert s["task"] is None and s["step"] == 3100
        assert "leaderboard" not in cli("summary", fineweb).stdout


def test_records_of_different_tasks_are_never_tested_against_each_other(tmp_path):
    synthetic = os.path.dirname(synthetic_record(tmp_path / "syn"))
    fineweb = os.path.dirname(l3(tmp_path / "fineweb"))
    refused(cli("compare", synthetic, fineweb), "not compared: A trained on a 1024-token vocabulary",
            "B on FineWeb (the leaderboard task)")
    d = json.loads(cli("diff", synthetic, fineweb, "--json").stdout)
    assert d["compare"] is None and "their losses are on different scales" in d["compare_error"]
    assert "significantly" not in cli("diff", synthetic, fineweb).stdout
    proc = cli("submit", synthetic, "--name", "syn", "--baseline", fineweb, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "pairwise test against the parent: not possible: A trained on a 1024-token" in proc.stdout
    assert "(not a leaderboard result) |" in proc.stdout  # the leaderboard row says so
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "**Not a leaderboard result**" in readme and "\nNot compared: A trained on" in readme
    assert "significantly" not in readme
    # one task on both sides: the test runs as before
    assert "\npairwise test: A n=3 step 3100" in cli("diff", synthetic, synthetic_record(tmp_path / "syn2")).stdout


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """`records.py summary DIR | head -1`: the reader stops early; no 'error: Broken pipe', status 0."""
    record = os.path.dirname(l3(tmp_path / "rec"))
    proc = subprocess.Popen(CLI + ["summary", record], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=0)
    proc.stdout.close()  # as `head` does once it has its line (here: before the first one)
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
