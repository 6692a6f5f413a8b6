"""Two records side by side. The `compare` command is the pairwise test (tools/stats.py's
compare()); print_compare() is its text. The `diff` command (diff_records(), print_diff()) shows
what differs between two logs or records (B by default: A's parent record, tools/parents.py):
hyperparameters (run-specific ones apart, see tools/configs.py), a unified diff of the code parts,
the mean val loss at common steps (mean_curve(): over the complete trials, else the incomplete
ones, so that a killed run can still be compared) and the same pairwise test when either side has
more than one trial.
"""

if __name__ == "__main__":  # a module of the toolkit, not a command
    raise SystemExit("tools/compare.py is a module of the records toolkit, not a command: "
                     "python tools/records.py --help lists the commands")

import difflib
import os

import numpy as np

from tools.configs import config_difference, inconsistencies, run_specific
from tools.logs import RecordsError, read_record
from tools.parents import default_parent, parent_note, published_label
from tools.stats import PASS_MARGIN, compare, pair_targets, unlike_tasks
from tools.trials import loss_at, screen


def print_compare(c, name_a, name_b):
    print(f"A: {name_a}\nB: {name_b}")
    metric = c["metric_a"] if c["metric_a"] == c["metric_b"] else f"A {c['metric_a']}, B {c['metric_b']}"
    print(f"metric: {metric}  target: {c['target']:g}")
    print(f"{'step':>6} {'mean A':>9} {'mean B':>9}")
    for row in c["side_by_side"]:
        print(f"{row['step']:6d} {row['mean_a']:9.5f} {row['mean_b']:9.5f}")
    for k in ("a", "b"):
        left = c["left_out_" + k]
        print(f"{k.upper()}: n={c['n_' + k]}  step {c['steps_' + k]}  mean {c['mean_' + k]:.6f}"
              f"{'' if c['passes_' + k] else '  (does not pass: last common step)'}"
              f"{f'  ({left} incomplete or duplicate trial(s) left out)' if left else ''}")
    print(f"final_loss_diff (B-A) {c['final_loss_diff']:+.6f}  exp_stepbased_loss_diff "
          f"{c['exp_stepbased_loss_diff']:+.6f}  z {c['z']:+.5f}  (threshold {PASS_MARGIN})")
    print(c["verdict"])


def mean_curve(runs):
    """(steps, means, n, note) over the counted runs at their common steps; when none is complete,
    over the incomplete ones (a killed run can still be compared), with a note saying so."""
    counted, note = screen(runs)["counted"], ""
    if not counted:
        counted = [r for r in runs if r["steps"]]
        note = "no complete trial: its incomplete trials are shown"
    steps = sorted(set.intersection(*(set(r["steps"]) for r in counted))) if counted else []
    means = [float(np.mean([loss_at(r, s) for r in counted])) for s in steps]
    return steps, means, len(counted), note


def diff_records(a, b=None, target=None, metric="val_loss"):
    """What differs between A and B (log files or record folders; B None: A's parent record, the
    published record of A's preset): hyperparameters (header `name: value` lines of each side's
    first log; seed, trials and data_dir apart as run-specific), a unified diff of the code parts,
    the mean val loss at common steps side by side, and the pairwise test (compare()) when either
    side has more than one trial. b_label says what B is when it is a published record. metric
    None: val_loss."""
    metric = "val_loss" if metric is None else metric
    logs_a = read_record(a, metric)
    by_preset = b is None
    if by_preset:
        b, preset = default_parent(logs_a, "give B, or --baseline")
    logs_b = read_record(b, metric)
    b_label = published_label(b)
    if b_label and by_preset:
        b_label = (f"A's parent record ({f'preset {preset}' if preset else 'no preset line'}): "
                   f"{b_label}{parent_note(preset)}")
    target, target_warning = pair_targets(logs_a, logs_b, target)
    runs_a = [t for log in logs_a for t in log["trials"]]
    runs_b = [t for log in logs_b for t in log["trials"]]
    hp_a, hp_b = logs_a[0]["hyperparameters"], logs_b[0]["hyperparameters"]
    skip = run_specific(logs_a[0], logs_b[0])
    config = [k for k in sorted(set(hp_a) | set(hp_b)) if k not in skip]
    code_a, code_b = logs_a[0]["code"], logs_b[0]["code"]
    result = dict(a=os.fspath(a), b=os.fspath(b), b_label=b_label, metric=metric, target=target,
                  target_warning=target_warning,
                  logs_a=len(logs_a), logs_b=len(logs_b),
                  has_hyperparameters_a=bool(hp_a), has_hyperparameters_b=bool(hp_b),
                  hyperparameters=[dict(name=k, a=x, b=y)
                                   for k, x, y in config_difference(hp_a, hp_b, config)],
                  run_specific=[dict(name=k, a=x, b=y) for k, x, y in  # seeds of two of ours
                                config_difference(hp_a, hp_b, [k for k in skip
                                                               if k in hp_a and k in hp_b])],
                  inconsistent_a=inconsistencies(logs_a), inconsistent_b=inconsistencies(logs_b),
                  has_code_a=bool(code_a.strip()), has_code_b=bool(code_b.strip()),
                  code_identical=code_a == code_b)
    result["code_diff"] = ([] if result["code_identical"] or not (code_a.strip() and code_b.strip())
                           else list(difflib.unified_diff(code_a.splitlines(), code_b.splitlines(),
                                                          f"A: {a}", f"B: {b}", lineterm="")))
    steps_a, means_a, n_a, note_a = mean_curve(runs_a)
    steps_b, means_b, n_b, note_b = mean_curve(runs_b)
    by_b = dict(zip(steps_b, means_b))
    result.update(n_a=n_a, n_b=n_b, note_a=note_a, note_b=note_b,
                  side_by_side=[dict(step=s, a=m, b=by_b[s], diff=by_b[s] - m)
                                for s, m in zip(steps_a, means_a) if s in by_b])
    result["compare"] = result["compare_error"] = None
    result["unlike_tasks"] = unlike_tasks(logs_a, logs_b)
    if result["unlike_tasks"]:
        result["compare_error"] = result["unlike_tasks"]
    elif max(len(runs_a), len(runs_b)) > 1:  # a folder or a multi-trial log: the benchmark's test
        try:
            result["compare"] = compare(runs_a, runs_b, target)
        except RecordsError as e:
            result["compare_error"] = str(e)
    return result


def print_diff(d):
    if d.get("target_warning"):
        print(f"warning: {d['target_warning']}")
    if d.get("unlike_tasks"):
        print(f"warning: {d['unlike_tasks']}; no pairwise test")
    for side in ("a", "b"):
        note = f"  ({d['note_' + side]})" if d["note_" + side] else ""
        print(f"{side.upper()}: {d[side]}  ({d['logs_' + side]} log(s), n={d['n_' + side]}){note}")
        if side == "b" and d["b_label"]:
            print(f"  {d['b_label']}")
        for problem in d["inconsistent_" + side]:
            print(f"  warning: {side.upper()}'s logs do not share one configuration: {problem}")
    print(f"metric: {d['metric']}  target: {d['target']:g}")
    print("\nhyperparameters (first log of each side):")
    if not d["has_hyperparameters_a"] and not d["has_hyperparameters_b"]:
        print("  neither has hyperparameter lines (upstream logs keep them in the code): "
              "see the code diff")
    elif not (d["has_hyperparameters_a"] and d["has_hyperparameters_b"]):
        missing = "A" if not d["has_hyperparameters_a"] else "B"
        print(f"  {missing} has no hyperparameter lines (an upstream log): not compared")
    elif not d["hyperparameters"]:
        print("  configuration identical")
    both = d["has_hyperparameters_a"] and d["has_hyperparameters_b"]
    for row in d["hyperparameters"] if both else []:
        print(f"  {row['name']}: {row['a'] if row['a'] is not None else '(absent)'} -> "
              f"{row['b'] if row['b'] is not None else '(absent)'}")
    for row in d["run_specific"]:
        print(f"  (run-specific) {row['name']}: {row['a']} -> {row['b']}")
    print("\ncode:")
    if not d["has_code_a"] or not d["has_code_b"]:
        missing = " and ".join(s.upper() for s in "ab" if not d["has_code_" + s])
        print(f"  not compared: {missing} {'has' if len(missing) == 1 else 'have'} no code part "
              "(output only)")
    elif d["code_identical"]:
        print("  code parts identical")
    else:
        print("\n".join(d["code_diff"]))
    print(f"\n{d['metric']} at common validated steps (mean over trials):")
    if not d["side_by_side"]:
        print("  no validated step in common")
    else:
        print(f"{'step':>6} {'A':>9} {'B':>9} {'B-A':>9}")
        for row in d["side_by_side"]:
            print(f"{row['step']:6d} {row['a']:9.5f} {row['b']:9.5f} {row['diff']:+9.5f}")
    if d["compare"]:
        c = d["compare"]
        print(f"\npairwise test: A n={c['n_a']} step {c['steps_a']} mean {c['mean_a']:.6f}; "
              f"B n={c['n_b']} step {c['steps_b']} mean {c['mean_b']:.6f}; z {c['z']:+.5f} "
              f"(threshold {PASS_MARGIN})\n{c['verdict']}")
    elif d["compare_error"]:
        print(f"\npairwise test not possible: {d['compare_error']}")
