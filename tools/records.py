"""Step counts, significance, comparisons and plots from speedrun logs (ours and upstream's).

    python tools/records.py summary PATH... [--target 3.28] [--metric val_loss] [--json]
    python tools/records.py compare A B [--png FILE] [--json]
    python tools/records.py plot PATH... --png FILE [--label NAME ...]

A PATH is a log file or a directory (all its *.txt logs). A log is the training script's code,
a line of '=' characters, header lines, then output; only output after the first '=' line is
read, so `step:` text inside the code never counts. Validation lines look like
`step:{s}/{total} val_loss:{x} train_time:{t}s step_avg:{ms}ms [more key:value fields]`; other
`step:` lines (training progress) lack the metric and are skipped. A file may hold several trials
(a trial restarts when the step does not increase); `trial:{i} seed:{s}` lines name the seed of
the trial that follows. The rules (statistics.md of the benchmark): n runs pass at step S when
`(target - mean_S) * sqrt(n) >= 0.004`; the record is the earliest such validated step.

train_gpt.py calls write_summary() after every run: this module is the only implementation of
these statistics in the project.
"""
import argparse
import glob
import json
import math
import os
import re
import sys

import numpy as np

SEPARATOR = re.compile(r"^={50,}\s*$")
VAL_LINE = re.compile(r"^step:(\d+)/(\d+)\s")
SEED_LINE = re.compile(r"^trial:(\d+)\s+seed:(-?\d+)")
PASS_MARGIN = 0.004                # (target - mean) * sqrt(n) must reach this (p < 0.001, sigma 0.0013)
LOSS_PER_100_STEPS = 0.0045        # val loss gained per 100 steps near the target (pairwise test)
TOLERANCE = 1e-12                  # margins computed from 5-decimal losses: don't fail on rounding


class RecordsError(Exception):
    """A log or record that cannot be read or summarized; the message says which and why."""


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------

def parse_log(path, metric="val_loss"):
    """The trials in one log: dicts with source, trial, seed, total_steps, steps, losses, train_time."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RecordsError(f"cannot read {path}: {e.strerror or e}") from None
    start = next((i + 1 for i, line in enumerate(lines) if SEPARATOR.match(line)), 0)
    trials, seed = [], None
    for line in lines[start:]:
        m = SEED_LINE.match(line)
        if m:
            seed = int(m.group(2))
            continue
        m = VAL_LINE.match(line)
        if not m:
            continue
        fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
        if metric not in fields:
            continue  # a training-progress line, or a val line of another metric
        try:
            value = float(fields[metric])
        except ValueError:
            raise RecordsError(f"{path}: bad {metric} value in line {line!r}") from None
        step = int(m.group(1))
        if not trials or step <= trials[-1]["steps"][-1]:  # the step went back: a new trial
            trials.append(dict(source=str(path), trial=len(trials), seed=seed,
                               total_steps=int(m.group(2)), steps=[], losses=[], train_time=[]))
            seed = None
        trials[-1]["steps"].append(step)
        trials[-1]["losses"].append(value)
        t = fields.get("train_time", "nan").rstrip("s")
        trials[-1]["train_time"].append(float(t) if re.fullmatch(r"[-+.\deE]+|nan", t) else math.nan)
    if not trials:
        raise RecordsError(f"{path}: no validation lines with '{metric}:' (is it a training log? "
                           "pick another field with --metric)")
    return trials


def log_files(path):
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.txt")))
        if not files:
            raise RecordsError(f"no .txt logs found in directory {path}")
        return files
    if not os.path.exists(path):
        raise RecordsError(f"{path}: no such file or directory")
    return [path]


def load_runs(paths, metric="val_loss"):
    """All trials of all logs under `paths` (files and directories), in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = [trial for path in paths for f in log_files(str(path)) for trial in parse_log(f, metric)]
    if not runs:
        raise RecordsError("no logs given")
    return runs


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

def loss_at(run, step):
    return run["losses"][run["steps"].index(step)]


def summarize(runs, target=3.28):
    """Mean, std and margin at every validated step common to all runs, and the record step."""
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
    passing = [row for row in per_step if row["margin"] >= PASS_MARGIN - TOLERANCE]
    at = passing[0] if passing else per_step[-1]
    times = [r["train_time"][r["steps"].index(at["step"])] for r in runs]
    return dict(
        n=n, target=target, step=passing[0]["step"] if passing else None,
        mean=at["mean"], margin=at["margin"], std=at["std"],
        train_time_mean=float(np.mean(times)) if not any(map(math.isnan, times)) else None,
        final_step=common[-1], final_mean=per_step[-1]["mean"],
        final_losses=[loss_at(r, common[-1]) for r in runs],
        seeds=[r["seed"] for r in runs],
        # per run, the earliest validated step at or below the target (informative only: the
        # benchmark forbids per-run early stopping)
        first_step_at_target=[next((s for s, v in zip(r["steps"], r["losses"]) if v <= target), None)
                              for r in runs],
        steps=common, per_step=per_step)


def compare(runs_a, runs_b, target=3.28):
    """The benchmark's pairwise test of record A against record B, each at its own record step
    (its last common step if it does not pass)."""
    a, b = summarize(runs_a, target), summarize(runs_b, target)
    steps_a = a["step"] if a["step"] is not None else a["final_step"]
    steps_b = b["step"] if b["step"] is not None else b["final_step"]
    final_loss_diff = b["mean"] - a["mean"]
    step_diff = (steps_b - steps_a) / 100 * LOSS_PER_100_STEPS
    z = (final_loss_diff + step_diff) / math.sqrt(1 / a["n"] + 1 / b["n"])
    if z >= PASS_MARGIN - TOLERANCE:
        verdict = "A is significantly better than B"
    elif -z >= PASS_MARGIN - TOLERANCE:
        verdict = "B is significantly better than A"
    else:
        verdict = "no significant difference"
    means_b = {row["step"]: row["mean"] for row in b["per_step"]}
    side_by_side = [dict(step=row["step"], mean_a=row["mean"], mean_b=means_b[row["step"]])
                    for row in a["per_step"] if row["step"] in means_b]
    return dict(a=dict(n=a["n"], steps=steps_a, mean=a["mean"], passes=a["step"] is not None),
                b=dict(n=b["n"], steps=steps_b, mean=b["mean"], passes=b["step"] is not None),
                final_loss_diff=final_loss_diff, exp_stepbased_loss_diff=step_diff, z=z,
                threshold=PASS_MARGIN, verdict=verdict, side_by_side=side_by_side)


def write_summary(record_dir, target=3.28, extra=None):
    """(Re)write record_dir/summary.json from every log in it; returns what it wrote."""
    runs = load_runs([record_dir])
    summary = summarize(runs, target)
    summary["environment"] = extra or {}
    summary["runs"] = [dict(log=os.path.basename(r["source"]), trial=r["trial"], seed=r["seed"],
                            final_step=r["steps"][-1], final_loss=r["losses"][-1],
                            first_step_at_target=first)
                       for r, first in zip(runs, summary["first_step_at_target"])]
    path = os.path.join(record_dir, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)  # readers never see half a file
    return summary


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def plot_records(records, png_path, target=3.28, band="minmax"):
    """Mean val-loss curve (with a min-max or ±std band) of each record: full run, and a panel
    zoomed near the target. `records` maps a label to its runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    last = 0
    for label, runs in records.items():
        s = summarize(runs, target)
        steps = np.array(s["steps"])
        values = np.array([[loss_at(r, st) for st in steps] for r in runs])
        mean = values.mean(0)
        lo, hi = ((values.min(0), values.max(0)) if band == "minmax"
                  else (mean - values.std(0), mean + values.std(0)))
        for ax in (full, zoom):
            line, = ax.plot(steps, mean, label=f"{label} (n={s['n']})")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        last = max(last, steps[-1])
    for ax in (full, zoom):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    full.set_ylabel("val loss")
    full.set_title(f"mean val loss ({band} band)")
    zoom.set_xlim(0.7 * last, last * 1.01)
    zoom.set_ylim(target - 0.02, target + 0.08)
    zoom.set_title(f"near the target {target}")
    full.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def print_summary(s):
    print(f"runs: n={s['n']}  target: {s['target']}")
    print(f"{'step':>6} {'mean':>9} {'std':>8} {'margin':>8}")
    for row in s["per_step"]:
        mark = "  pass" if row["margin"] >= PASS_MARGIN - TOLERANCE else ""
        print(f"{row['step']:6d} {row['mean']:9.6f} {row['std']:8.5f} {row['margin']:8.5f}{mark}")
    if s["step"] is None:
        print(f"record: not reached (last common step {s['final_step']}: mean {s['mean']:.6f}, "
              f"margin {s['margin']:.5f} < {PASS_MARGIN})")
    else:
        print(f"record: step {s['step']}  mean {s['mean']:.6f}  margin {s['margin']:.5f} "
              f"(n={s['n']})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", type=float, default=3.28, help="target val loss (default 3.28)")
    common.add_argument("--metric", default="val_loss", help="field of the val lines (default val_loss)")
    p = sub.add_parser("summary", parents=[common], help="step count and statistics of one record")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p = sub.add_parser("compare", parents=[common], help="pairwise significance test of A vs B")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
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
                print(json.dumps(s))
            else:
                print_summary(s)
        elif args.command == "compare":
            runs_a, runs_b = load_runs([args.a], args.metric), load_runs([args.b], args.metric)
            c = compare(runs_a, runs_b, args.target)
            if args.png:
                plot_records({f"A: {args.a}": runs_a, f"B: {args.b}": runs_b}, args.png, args.target,
                             args.band)
            if args.json:
                print(json.dumps(c))
            else:
                print(f"{'step':>6} {'mean A':>9} {'mean B':>9}")
                for row in c["side_by_side"]:
                    print(f"{row['step']:6d} {row['mean_a']:9.5f} {row['mean_b']:9.5f}")
                for k in ("a", "b"):
                    r = c[k]
                    print(f"{k.upper()}: n={r['n']} at step {r['steps']} mean {r['mean']:.6f}"
                          f"{'' if r['passes'] else ' (does not reach the target)'}")
                print(f"final_loss_diff (B-A) {c['final_loss_diff']:+.6f}  step-based "
                      f"{c['exp_stepbased_loss_diff']:+.6f}  z {c['z']:+.5f} (threshold {PASS_MARGIN})")
                print(c["verdict"])
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
