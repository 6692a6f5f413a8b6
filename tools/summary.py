"""The `summary` command: summary_of() reads a record (tools/logs.py), applies the target and the
statistics (tools/stats.py) and adds the notes; write_summary() writes it as the record folder's
summary.json (train_gpt.py runs `summary RECORD_DIR --write` after every run); print_summary()
is its text, whose last line is the record line that scripts read with `tail -1`.

Also the small helpers other outputs share: json_safe() (strict JSON: NaN becomes null),
write_public() (atomic, world-readable files), relative_sources() (names relative to the record
folder), seed_text(), percent() and needed() (the pass-chance table's cells).
"""

if __name__ == "__main__":  # a module of the toolkit, not a command
    raise SystemExit("tools/summary.py is a module of the records toolkit, not a command: "
                     "python tools/records.py --help lists the commands")

import json
import math
import os
import tempfile
import textwrap

from tools.campaign import stop_notes
from tools.logs import RecordsError, load_record
from tools.stats import (NOT_LEADERBOARD, PASS_MARGIN, PLAN_MAX_TRIALS, claimed, passes, resolve_target, summarize,
                         task_of)
from tools.trials import screen


def json_safe(value):
    """NaN/inf (a diverged run) become null, so that the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_public(path, text):
    """Write a text file atomically (temporary file in the same directory, then rename: a reader
    never sees half a file, and two writers cannot interleave), readable by everyone (0644:
    mkstemp makes 0600 files, which another user, e.g. a web server or CI, could not read)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def summary_of(paths, target=None, metric=None, new_trials=None, pool=False):
    """summarize() of everything under `paths` (see load_record), with `metric` (the one read) and
    `notes` (the metric chosen, files read once, copies, files skipped, groups, the target) added;
    also returns the claim's runs. target None: the logs' val_loss_target, else 3.28. pool: one
    summary of every configuration together."""
    record = load_record(paths, metric)
    target, note = resolve_target(record["logs"], target)
    notes = record["notes"] + ([note] if note else []) + stop_notes(record["logs"])
    if pool:
        for r in record["runs"]:
            r["group"] = None
        notes = [n for n in notes if not n.startswith(("the logs hold", "group "))]
    task = task_of(record["logs"])
    if task:
        notes.append(f"{NOT_LEADERBOARD}: these logs trained on {task}; the claim below is "
                     f"judged against {target:g} on that task")
    summary = summarize(record["runs"], target, new_trials)
    summary.update(metric=record["metric"], notes=notes, task=task)
    return summary, claimed(record["runs"], target), record


def write_summary(record_dir, target=None, extra=None, metric=None, new_trials=None):
    """(Re)write record_dir/summary.json from every *.txt log in it; returns what it wrote:
    summary_of()'s keys (incomplete, duplicates and bad_lines name files relative to it), plus
    `environment` (= extra), `runs` (per counted run: source file name, trial, seed, final_step,
    final_loss, first_step_at_target), and `skipped_logs`: logs with no validation line at all (a
    run that stopped before its first validation must not block the record's later summaries)."""
    summary, runs, record = summary_of(record_dir, target, metric, new_trials)
    summary["skipped_logs"] = [f"{f}: no validation lines with '{record['metric']}:'"
                               for f in record["skipped"]]
    summary["environment"] = dict(extra or {})
    summary["runs"] = [dict(source=relative(r["source"], record_dir), trial=r["trial"], seed=r["seed"],
                            final_step=r["steps"][-1], final_loss=r["losses"][-1],
                            first_step_at_target=first)
                       for r, first in zip(screen(runs)["counted"], summary["first_step_at_target"])]
    relative_sources(summary, record_dir)
    summary = json_safe(summary)
    try:
        write_public(os.path.join(record_dir, "summary.json"),
                     json.dumps(summary, indent=2, allow_nan=False) + "\n")
    except OSError as e:
        raise RecordsError(f"cannot write {os.path.join(record_dir, 'summary.json')}: "
                           f"{e.strerror or e}") from None
    return summary


def relative(path, root):
    """A log's name relative to its record folder (a path outside it stays as given)."""
    root = root if os.path.isdir(root) else os.path.dirname(root)
    rel = os.path.relpath(path, root or os.curdir)
    return path if rel.startswith(os.pardir) else rel


def relative_sources(summary, root):
    """Name the files of what a summary left out relative to the record folder `root`."""
    for key in ("incomplete", "duplicates", "bad_lines"):
        for item in summary[key]:
            item["source"] = relative(item["source"], root)
            if "duplicate_of" in item:
                source, _, trial = item["duplicate_of"].rpartition(" trial ")
                item["duplicate_of"] = f"{relative(source, root)} trial {trial}"


def seed_text(seed):
    return "(no seed line)" if seed is None else f"seed {seed}"


def print_left_out(s):
    for x in s["incomplete"]:
        print(f"incomplete (not counted): {x['source']} trial {x['trial']} {seed_text(x['seed'])}: "
              f"last step {x['last_step']}/{x['total_steps']} ({x['reason']})")
    for x in s["duplicates"]:
        if x.get("copy"):
            print(f"copy (counted once): {x['source']} trial {x['trial']} repeats the validation "
                  f"lines of {x['duplicate_of']}")
        else:
            print(f"duplicate seed (counted once): {x['source']} trial {x['trial']} seed {x['seed']} "
                  f"repeats {x['duplicate_of']}")
    for x in s["bad_lines"]:
        print(f"{bad_line_kind(x)} (ignored): {x['source']} line {x['line']}: {x['text']!r} "
              f"({x['reason']})")


def bad_line_kind(x):
    """A line of bad_lines: 'cut line' (cut mid-write or garbled) or 'bad line' (whole, but its
    step or value cannot be a validation of its run)."""
    return "cut line" if x["cut"] else "bad line"


def num(value, spec):
    """A number for the text output; summary.json's null (a diverged run's NaN) prints as nan."""
    return format(math.nan if value is None else value, spec)


def percent(p):
    if p is None:
        return "n/a"
    # 100.0% would claim a certainty that the model cannot give
    return ">99.9%" if p > 0.999 else "<0.1%" if p < 0.001 else f"{100 * p:.1f}%"


def needed(n, reachable, short=False):
    if n is not None:
        return str(n)
    if reachable:
        return f">{PLAN_MAX_TRIALS}"
    return "never" if short else "never (mean >= target)"


def print_pass_chance(pc):
    rows = pc["rows"]
    if not rows or rows[0]["p_exact"] is None:
        print(f"how many seeds to pay for: {pc['note']}")
        return
    print(f"how many seeds to pay for: chance that a new set of {rows[0]['n']} trials passes, and "
          f"trials needed for a {100 * pc['probability']:.0f}% chance")
    print(f"{'step':>6} {'mean':>9} {'std':>8} {'P(pass)':>9} {'P(pass)':>9} {'n(90%)':>9} {'n(90%)':>9}")
    print(f"{'':>6} {'':>9} {'':>8} {'mu exact':>9} {'mu est.':>9} {'mu exact':>9} {'mu est.':>9}")
    for row in rows:
        print(f"{row['step']:6d} {num(row['mean'], '9.6f')} {num(row['std'], '8.5f')} "
              f"{percent(row['p_exact']):>9} "
              f"{percent(row['p_estimated']):>9} {needed(row['n90_exact'], row['reachable'], True):>9} "
              f"{needed(row['n90_estimated'], row['reachable'], True):>9}")
    note = f"({pc['note']}; never: the mean is not below the target)"
    print("\n".join(textwrap.wrap(note, 100)))


def print_summary(s):
    for note in s.get("notes", ()):
        print(f"note: {note}")
    for g in s.get("groups", ()):
        result = (g["error"] if "error" in g else f"n={g['n']}  " + (
            f"step {g['step']}  mean {g['mean']:.6f}  margin {g['margin']:.5f}" if g["step"] is not None
            else f"no pass (last common step {g['final_step']}: mean {num(g['mean'], '.6f')})"))
        print(f"group {g['group']}: {result}")
    if s.get("group"):
        print(f"the claim below is for group {s['group']} (the earliest passing step, else the "
              "larger margin); give its files alone, or --pool to pool every group")
    totals = "/".join(map(str, s["total_steps"]))
    left = len(s["incomplete"]) + len(s["duplicates"])
    print(f"runs: n={s['n']}  metric: {s['metric']}  target: {s['target']}  total steps: {totals}"
          f"{'  (WARNING: runs of different lengths pooled)' if len(s['total_steps']) > 1 else ''}"
          f"{f'  ({left} trial(s) left out: see below)' if left else ''}")
    print(f"{'step':>6} {'mean':>9} {'std':>8} {'margin':>8}")
    for row in s["per_step"]:
        mark = "  pass" if row["margin"] is not None and passes(row["margin"]) else ""
        print(f"{row['step']:6d} {num(row['mean'], '9.6f')} {num(row['std'], '8.5f')} "
              f"{num(row['margin'], '8.5f')}{mark}")
    print_left_out(s)
    print_pass_chance(s["pass_chance"])
    # the record line stays last: scripts read it with `tail -1`
    if s["step"] is None:
        print(f"record: not reached (last common step {s['final_step']}: mean {num(s['mean'], '.6f')}, "
              f"margin {num(s['margin'], '.5f')} < {PASS_MARGIN})")
    else:
        print(f"record: step {s['step']}  mean {s['mean']:.6f}  margin {s['margin']:.5f} "
              f">= {PASS_MARGIN}  (n={s['n']}){task_mark(s)}")


def task_mark(s):
    """What a record line adds when its logs are not the leaderboard's task (see stats.task_of)."""
    return f"  [{NOT_LEADERBOARD}: {s['task']}]" if s.get("task") else ""
