"""Step counts, significance tests, comparisons and plots from speedrun logs (ours and upstream's).

Usage (from the repository root or anywhere else):

    python tools/records.py summary PATH... [--target 3.28] [--metric val_loss] [--json]
    python tools/records.py compare A B [--png FILE] [--band minmax|std] [--target] [--metric] [--json]
    python tools/records.py plot PATH... --png FILE [--label NAME ...] [--band minmax|std]

A PATH is a log file or a directory (all its *.txt files, sorted, not recursive); `summary` pools
all its PATHs into one record, `compare` and `plot` take one record per PATH.

Log format. A log is the training script's source, a line of '=' characters (>= 50; ours have 100),
header lines, then output. Only lines after the FIRST '=' line are read, so `step:` text inside the
code never counts (a file without any '=' line is read whole). Validation lines look like
`step:{s}/{total} val_loss:{x} train_time:{t}s step_avg:{ms}ms [more key:value fields]`;
`step:` lines without the chosen metric (training progress) are skipped. A file may hold several
trials: a trial starts when the step does not increase, or after a `trial:{i} seed:{s}` line, whose
seed goes to that trial.

Rules (statistics.md of the benchmark): n runs pass at step S when
`(target - mean_S) * sqrt(n) >= 0.004`; the record is the earliest validated step, common to all
runs, that passes. Pairwise test: see compare().

In Python: parse_log, load_runs, summarize, compare, write_summary, plot_records. train_gpt.py
calls write_summary() after every run: this module is the only implementation of these statistics.
Errors (missing path, no logs, unreadable file, no val lines, no common step) raise RecordsError;
the command line prints `error: ...` on stderr and exits with status 2.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
import tempfile

import numpy as np

SEPARATOR = re.compile(r"^={50,}\s*$")
VAL_LINE = re.compile(r"^step:(\d+)/(\d+)\s")
SEED_LINE = re.compile(r"^trial:(\d+)\s+seed:(-?\d+)")
PASS_MARGIN = 0.004          # (target - mean) * sqrt(n) must reach this (sigma 0.0013, p < 0.001)
LOSS_PER_100_STEPS = 0.0045  # val loss gained per 100 steps near the target (pairwise test)
# Losses are logged with 5 decimals, so a margin that is exactly 0.004 on paper (e.g. n=4, mean
# 3.278) comes out as 0.00399999999999... in floating point. Accept it: compare with this slack.
TOLERANCE = 1e-12


class RecordsError(Exception):
    """A log or record that cannot be read or summarized; the message says which and why."""


def passes(margin):
    return margin >= PASS_MARGIN - TOLERANCE  # False for NaN (a diverged run never passes)


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------

def to_float(text):
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_log(path, metric="val_loss"):
    """The trials of one log file, in order: a list of dicts with source, trial (index in the
    file), seed (int or None), total_steps, steps, losses (the metric) and train_time (s)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RecordsError(f"cannot read {path}: {e.strerror or e}") from None
    start = next((i + 1 for i, line in enumerate(lines) if SEPARATOR.match(line)), 0)
    trials, seed, new_trial = [], None, False
    for line in lines[start:]:
        m = SEED_LINE.match(line)
        if m:  # our trainer announces each trial: its seed belongs to the next val lines
            seed, new_trial = int(m.group(2)), True
            continue
        m = VAL_LINE.match(line)
        if not m:
            continue
        fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
        if metric not in fields:
            continue  # a training-progress line, or a val line of another metric
        value = to_float(fields[metric])
        if math.isnan(value) and fields[metric].lower() != "nan":
            raise RecordsError(f"{path}: bad {metric} value in line {line!r}")
        step = int(m.group(1))
        # The first val line of a trial is not always step 0, so a restart is seen as a step that
        # does not increase (or an explicit trial line).
        if new_trial or not trials or step <= trials[-1]["steps"][-1]:
            trials.append(dict(source=str(path), trial=len(trials), seed=seed,
                               total_steps=int(m.group(2)), steps=[], losses=[], train_time=[]))
            seed, new_trial = None, False
        trials[-1]["steps"].append(step)
        trials[-1]["losses"].append(value)
        trials[-1]["train_time"].append(to_float(fields.get("train_time", "nan").rstrip("s")))
    if not trials:
        raise RecordsError(f"{path}: no validation lines with '{metric}:' (is it a training log? "
                           "another field can be chosen with --metric)")
    return trials


def log_files(path):
    """The log files a path stands for: itself, or a directory's *.txt files (sorted)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*.txt")))
        if not files:
            raise RecordsError(f"no .txt logs found in directory {path}")
        return files
    if not os.path.exists(path):
        raise RecordsError(f"{path}: no such file or directory")
    return [path]


def load_runs(paths, metric="val_loss"):
    """All trials of all logs under `paths` (files and directories, or a single path), in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = [trial for path in paths for f in log_files(os.fspath(path))
            for trial in parse_log(f, metric)]
    if not runs:
        raise RecordsError("no logs given")
    return runs


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

def loss_at(run, step):
    return run["losses"][run["steps"].index(step)]


def summarize(runs, target=3.28):
    """Mean, std and margin at every validated step common to all runs, and the record step:
    the earliest of them with (target - mean) * sqrt(n) >= 0.004 (None when none passes; mean,
    margin, std and train_time_mean are then those of the last common step)."""
    if not runs:
        raise RecordsError("no runs to summarize")
    n = len(runs)
    common = sorted(set.intersection(*(set(r["steps"]) for r in runs)))
    if not common:
        raise RecordsError(f"the {n} runs have no validated step in common "
                           f"({', '.join(sorted({os.path.basename(r['source']) for r in runs}))})")
    per_step = []
    for step in common:
        values = np.array([loss_at(r, step) for r in runs])
        mean = float(values.mean())
        per_step.append(dict(step=step, mean=mean, std=float(values.std(ddof=1)) if n > 1 else 0.0,
                             margin=(target - mean) * math.sqrt(n)))
    record = next((row for row in per_step if passes(row["margin"])), None)
    at = record or per_step[-1]
    times = [r["train_time"][r["steps"].index(at["step"])] for r in runs]
    return dict(
        n=n, target=target, step=record["step"] if record else None,
        mean=at["mean"], margin=at["margin"], std=at["std"],
        train_time_mean=None if any(map(math.isnan, times)) else float(np.mean(times)),
        final_step=common[-1], final_mean=per_step[-1]["mean"],
        final_losses=[loss_at(r, common[-1]) for r in runs],
        seeds=[r["seed"] for r in runs],
        # runs of different schedules (total steps) should not be pooled: shown, not enforced
        total_steps=sorted({r["total_steps"] for r in runs}),
        # per run, the earliest validated step at or below the target (informative only: the
        # benchmark forbids per-run early stopping)
        first_step_at_target=[next((s for s, v in zip(r["steps"], r["losses"]) if v <= target), None)
                              for r in runs],
        steps=common, per_step=per_step)


def compare(runs_a, runs_b, target=3.28):
    """The benchmark's pairwise test of record A against record B. Each is taken at its own record
    step (its last common step if it never passes):
        z = ((mean_B - mean_A) + (steps_B - steps_A) / 100 * 0.0045) / sqrt(1/n_A + 1/n_B)
    A is significantly better when z >= 0.004, B when -z >= 0.004 (the same test, A and B swapped)."""
    a, b = summarize(runs_a, target), summarize(runs_b, target)
    steps_a = a["step"] if a["step"] is not None else a["final_step"]
    steps_b = b["step"] if b["step"] is not None else b["final_step"]
    final_loss_diff = b["mean"] - a["mean"]
    step_diff = (steps_b - steps_a) / 100 * LOSS_PER_100_STEPS
    z = (final_loss_diff + step_diff) / math.sqrt(1 / a["n"] + 1 / b["n"])
    if passes(z):
        verdict = "A is significantly better than B"
    elif passes(-z):
        verdict = "B is significantly better than A"
    else:
        verdict = "no significant difference"
    means_b = {row["step"]: row["mean"] for row in b["per_step"]}
    side_by_side = [dict(step=row["step"], mean_a=row["mean"], mean_b=means_b[row["step"]])
                    for row in a["per_step"] if row["step"] in means_b]
    return dict(target=target, n_a=a["n"], n_b=b["n"], steps_a=steps_a, steps_b=steps_b,
                mean_a=a["mean"], mean_b=b["mean"],
                passes_a=a["step"] is not None, passes_b=b["step"] is not None,
                final_loss_diff=final_loss_diff, exp_stepbased_loss_diff=step_diff, z=z,
                threshold=PASS_MARGIN, verdict=verdict, side_by_side=side_by_side)


def json_safe(value):
    """NaN/inf (a diverged run) become null, so that the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_summary(record_dir, target=3.28, extra=None):
    """(Re)write record_dir/summary.json from every *.txt log in it; returns what it wrote:
    summarize()'s keys, plus `environment` (= extra) and `runs` (per run: source file name,
    trial, seed, final_step, final_loss, first_step_at_target), and `skipped_logs`: logs with no
    validation line yet (a run that stopped before its first validation must not block the
    record's later summaries)."""
    runs, skipped = [], []
    for f in log_files(record_dir):
        try:
            runs += parse_log(f)
        except RecordsError as e:
            skipped.append(str(e))
    if not runs:
        raise RecordsError(f"no log in {record_dir} has validation lines: " + "; ".join(skipped))
    summary = summarize(runs, target)
    summary["skipped_logs"] = skipped
    summary["environment"] = dict(extra or {})
    summary["runs"] = [dict(source=os.path.basename(r["source"]), trial=r["trial"], seed=r["seed"],
                            final_step=r["steps"][-1], final_loss=r["losses"][-1],
                            first_step_at_target=first)
                       for r, first in zip(runs, summary["first_step_at_target"])]
    summary = json_safe(summary)
    path = os.path.join(record_dir, "summary.json")
    # A unique temporary file in the same directory, then an atomic rename: a reader never sees
    # half a file, and two runs finishing together cannot interleave their writes.
    fd, tmp = tempfile.mkstemp(dir=record_dir, prefix=".summary-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(summary, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return summary


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def plot_records(records, png_path, target=3.28, band="minmax"):
    """Mean val-loss curve of each record with a min-max or mean ± std band: the whole run (y axis
    cut at 4.5), and a panel zoomed near the target (target - 0.02 .. target + 0.06, from the first
    step where a mean curve enters that range). `records` maps a label to its runs."""
    if band not in ("minmax", "std"):
        raise RecordsError(f"band must be 'minmax' or 'std', not {band!r}")
    if not records:
        raise RecordsError("nothing to plot")
    import matplotlib
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    last, near, bottom, top = 0, [], target - 0.05, target + 0.5
    for label, runs in records.items():
        s = summarize(runs, target)
        steps = np.array(s["steps"])
        values = np.array([[loss_at(r, st) for st in steps] for r in runs])
        mean = values.mean(0)
        if band == "minmax":
            lo, hi = values.min(0), values.max(0)
        else:
            std = values.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
            lo, hi = mean - std, mean + std
        record = f"step {s['step']}" if s["step"] is not None else "no record"
        for ax in (full, zoom):
            line, = ax.plot(steps, mean, label=f"{label} (n={s['n']}, {record})")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        if s["step"] is not None:
            zoom.axvline(s["step"], color=line.get_color(), linestyle=":", linewidth=1)
        last = max(last, int(steps[-1]))
        # the zoom starts where the first record comes within the panel's y range of the target
        near += [int(st) for st, m in zip(steps, mean) if m <= target + 0.06][:1]
        top = max(top, min(4.5, float(np.nanmax(mean))))
        bottom = min(bottom, float(np.nanmin(mean)) - 0.01)
    for ax in (full, zoom):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    full.set_ylabel("val loss")
    full.set_title(f"mean val loss ({'min-max' if band == 'minmax' else '± std'} band)")
    full.set_ylim(bottom, top)  # the first steps (loss ~11) would flatten everything else
    start = min(near) if near else 0.7 * last
    zoom.set_xlim(start - 0.02 * (last - start), last + 0.02 * (last - start) + 1)
    zoom.set_ylim(target - 0.02, target + 0.06)
    zoom.set_title(f"near the target {target} (dotted: record step)")
    full.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(png_path, dpi=120)
    except OSError as e:
        raise RecordsError(f"cannot write {png_path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def print_summary(s):
    totals = "/".join(map(str, s["total_steps"]))
    print(f"runs: n={s['n']}  target: {s['target']}  total steps: {totals}"
          f"{'  (WARNING: runs of different lengths pooled)' if len(s['total_steps']) > 1 else ''}")
    print(f"{'step':>6} {'mean':>9} {'std':>8} {'margin':>8}")
    for row in s["per_step"]:
        mark = "  pass" if passes(row["margin"]) else ""
        print(f"{row['step']:6d} {row['mean']:9.6f} {row['std']:8.5f} {row['margin']:8.5f}{mark}")
    if s["step"] is None:
        print(f"record: not reached (last common step {s['final_step']}: mean {s['mean']:.6f}, "
              f"margin {s['margin']:.5f} < {PASS_MARGIN})")
    else:
        print(f"record: step {s['step']}  mean {s['mean']:.6f}  margin {s['margin']:.5f} "
              f">= {PASS_MARGIN}  (n={s['n']})")


def print_compare(c, name_a, name_b):
    print(f"A: {name_a}\nB: {name_b}")
    print(f"{'step':>6} {'mean A':>9} {'mean B':>9}")
    for row in c["side_by_side"]:
        print(f"{row['step']:6d} {row['mean_a']:9.5f} {row['mean_b']:9.5f}")
    for k in ("a", "b"):
        print(f"{k.upper()}: n={c['n_' + k]}  step {c['steps_' + k]}  mean {c['mean_' + k]:.6f}"
              f"{'' if c['passes_' + k] else '  (does not pass: last common step)'}")
    print(f"final_loss_diff (B-A) {c['final_loss_diff']:+.6f}  exp_stepbased_loss_diff "
          f"{c['exp_stepbased_loss_diff']:+.6f}  z {c['z']:+.5f}  (threshold {PASS_MARGIN})")
    print(c["verdict"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", type=float, default=3.28, help="target val loss (default 3.28)")
    common.add_argument("--metric", default="val_loss", help="field of the val lines (default val_loss)")
    p = sub.add_parser("summary", parents=[common], help="step count and statistics of one record")
    p.add_argument("paths", nargs="+", metavar="PATH", help="log files and directories, pooled")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p = sub.add_parser("compare", parents=[common], help="pairwise significance test of A vs B")
    p.add_argument("a", metavar="A", help="record A: a log file or a directory of logs")
    p.add_argument("b", metavar="B", help="record B: a log file or a directory of logs")
    p.add_argument("--png", help="also plot both records' curves to this PNG")
    p.add_argument("--band", choices=["minmax", "std"], default="minmax")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p = sub.add_parser("plot", parents=[common], help="val loss curves of one or more records")
    p.add_argument("paths", nargs="+", metavar="PATH", help="each PATH is one record")
    p.add_argument("--png", required=True)
    p.add_argument("--label", action="append", help="one label per PATH (default: the path)")
    p.add_argument("--band", choices=["minmax", "std"], default="minmax")
    args = ap.parse_args(argv)
    try:
        if args.command == "summary":
            s = summarize(load_runs(args.paths, args.metric), args.target)
            if args.json:
                print(json.dumps(json_safe(s)))
            else:
                print_summary(s)
        elif args.command == "compare":
            runs_a, runs_b = load_runs([args.a], args.metric), load_runs([args.b], args.metric)
            c = compare(runs_a, runs_b, args.target)
            if args.png:
                plot_records({f"A: {args.a}": runs_a, f"B: {args.b}": runs_b}, args.png,
                             args.target, args.band)
            if args.json:
                print(json.dumps(json_safe(c)))
            else:
                print_compare(c, args.a, args.b)
        else:
            labels = args.label or args.paths
            if len(labels) != len(args.paths):
                raise RecordsError(f"{len(labels)} --label for {len(args.paths)} paths")
            plot_records({lab: load_runs([p], args.metric) for lab, p in zip(labels, args.paths)},
                         args.png, args.target, args.band)
            print(f"wrote {args.png}")
    except RecordsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
