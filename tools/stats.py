"""The benchmark's rules, and the only implementation of its statistics.

- The target (resolve_target, pair_targets): --target, else the logs' `val_loss_target:` line,
  else 3.28 (DEFAULT_TARGET).
- The pass rule (passes): n runs pass at step S when (target - mean_S) * sqrt(n) >= 0.004
  (PASS_MARGIN, with TOLERANCE for losses logged with 5 decimals). summarize() applies it to the
  counted trials (tools/trials.py's screen) at every validated step they share; the record is the
  earliest step that passes. Logs of several configurations are summarized per group
  (summarize_groups), and the claim is the group that passes earliest (claimed).
- The pairwise test (compare): each record at its own record step, z = ((mean_B - mean_A) +
  (steps_B - steps_A) / 100 * 0.0045) / sqrt(1/n_A + 1/n_B); significant when |z| >= 0.004.
- The task (task_of, unlike_tasks): 3.28 is a val loss on FineWeb in GPT-2's tokens. Logs of a
  smaller vocabulary (the tiny preset on synthetic shards) are judged on their own terms and said
  to be no leaderboard result; two records of different tasks are never tested against each other.
- The pass-chance estimate (pass_chance, from pass_probability and trials_needed): how many seeds to
  pay for, the chance that a new set of n trials passes near the record step.
Everything else (summary.json, compare, diff, plots, submit) calls these; none recomputes them.
"""

if __name__ == "__main__":  # a module of the toolkit, not a command
    raise SystemExit("tools/stats.py is a module of the records toolkit, not a command: "
                     "python tools/records.py --help lists the commands")

import math
import os

import numpy as np

from tools.logs import RecordsError, header_value
from tools.trials import loss_at, screen

DEFAULT_TARGET = 3.28  # the benchmark's target, when neither --target nor the logs give one
PASS_MARGIN = 0.004          # (target - mean) * sqrt(n) must reach this (sigma 0.0013, p < 0.001)
LOSS_PER_100_STEPS = 0.0045  # val loss gained per 100 steps near the target (pairwise test)
# Losses are logged with 5 decimals, so a margin that is exactly 0.004 on paper (e.g. n=4, mean
# 3.278) comes out as 0.00399999999999... in floating point. Accept it: compare with this slack.
TOLERANCE = 1e-12
PLAN_PROBABILITY, PLAN_MAX_TRIALS = 0.9, 200  # "how many seeds": n for a 90% chance, up to 200
PLAN_NOTE = ("an estimate, not a guarantee: it assumes that per-trial val losses are normal, that "
             "new trials have the observed mean and spread, and that trials are independent; 'mu "
             "exact' takes the observed mean as the true one, 'mu estimated' adds the uncertainty "
             "of that mean (more cautious, and more honest when few trials were run)")


GPT2_VOCAB = 50257  # the leaderboard's task: FineWeb in GPT-2's tokens
NOT_LEADERBOARD = "not a leaderboard result"


def task_of(logs):
    """None for the leaderboard's task, else what the logs trained on instead, in words. A log's
    vocab_size line below GPT-2's 50257 tokens means another task (the tiny preset's 1024 tokens
    on synthetic shards): its losses are on another scale, so passing 3.28 says nothing about the
    leaderboard. Logs without the line (upstream's; they keep the model in the code) are FineWeb runs."""
    vocabs = set()
    for log in logs:
        try:
            vocab = int(header_value(log["hyperparameters"].get("vocab_size", str(GPT2_VOCAB))))
        except (TypeError, ValueError):
            continue  # not a number: inconsistencies() and the configuration checks report it
        if vocab < GPT2_VOCAB:
            vocabs.add(vocab)
    if not vocabs:
        return None
    return (f"a {'/'.join(map(str, sorted(vocabs)))}-token vocabulary (synthetic shards), not "
            f"FineWeb in GPT-2's {GPT2_VOCAB} tokens")


def unlike_tasks(logs_a, logs_b):
    """Why A and B cannot be compared (they trained on different tasks), or None."""
    task_a, task_b = task_of(logs_a), task_of(logs_b)
    if task_a == task_b:
        return None
    return (f"A trained on {task_a or 'FineWeb (the leaderboard task)'}, B on "
            f"{task_b or 'FineWeb (the leaderboard task)'}: their losses are on different scales")


def passes(margin):
    return margin >= PASS_MARGIN - TOLERANCE  # False for NaN (a diverged run never passes)


def checked_target(value, what="--target"):
    """A target as a float: a finite positive number (a val loss), else RecordsError naming `what`
    (inf would make every step pass with margin inf, nan none, and a negative one means nothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise RecordsError(f"{what} is not a finite positive val loss (e.g. 3.28): got {value!r}")
    return float(value)


def logged_target(logs):
    """The val_loss_target the logs' headers state (our trainer logs it), or None when none does.
    RecordsError when logs of one record state different targets, or one is not a number."""
    found = {}
    for log in logs:
        text = log["hyperparameters"].get("val_loss_target")
        if text is None:
            continue
        value = checked_target(header_value(text), f"{log['path']}: val_loss_target {text!r}")
        found.setdefault(value, []).append(log["path"])
    if len(found) > 1:
        raise RecordsError("the logs were run for different targets (their val_loss_target lines): "
                           + "; ".join(f"{t:g} in {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
                                       for t, files in found.items())
                           + ": give each record apart, or choose one with --target")
    return next(iter(found), None)


def resolve_target(logs, target=None):
    """(target, note): `target` when given, else the logs' val_loss_target, else 3.28."""
    if target is not None:
        return checked_target(target), None
    logged = logged_target(logs)
    if logged is None:
        return DEFAULT_TARGET, None
    return logged, f"target {logged:g}: the logs' val_loss_target (--target chooses another)"


def target_text(target, logged):
    return (f"{target:g} (its logs' val_loss_target)" if logged is not None
            else f"{target:g} (not stated in its logs: the benchmark's)")


def pair_targets(logs_a, logs_b, target=None):
    """(target for both, warning or None) for a comparison of A and B: --target, else A's own
    (its logs' val_loss_target, else 3.28); a warning when A and B were run for different targets."""
    logged_a, logged_b = logged_target(logs_a), logged_target(logs_b)
    own_a = DEFAULT_TARGET if logged_a is None else logged_a
    own_b = DEFAULT_TARGET if logged_b is None else logged_b
    used = own_a if target is None else checked_target(target)
    if own_a == own_b:
        return used, None
    return used, (f"A and B were run for different targets: A for {target_text(own_a, logged_a)}, "
                  f"B for {target_text(own_b, logged_b)}; both are taken at {used:g} "
                  f"({'--target' if target is not None else 'A' + chr(39) + 's'}; --target chooses)")


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def pass_probability(mean, std, n, n_obs=None, target=3.28):
    """Chance that a new set of n trials passes at a step where n_obs trials gave `mean` and
    per-trial std `std`. The new set's mean is taken as Normal(mu, std^2/n); it passes when
    (target - mean_new) * sqrt(n) >= 0.004. n_obs None: mu = mean exactly,
    P = Phi(((target - mean) * sqrt(n) - 0.004) / std). Otherwise mu is only estimated, and
    mean_new - mean has variance std^2/n + std^2/n_obs: the same with std * sqrt(1 + n/n_obs)."""
    gap = (target - mean) * math.sqrt(n) - PASS_MARGIN
    scale = std * math.sqrt(1 + n / n_obs) if n_obs else std
    if not scale > 0:  # no spread seen: the new set repeats the observed mean
        return 1.0 if gap >= -TOLERANCE else 0.0
    return phi(gap / scale)


def trials_needed(mean, std, n_obs=None, target=3.28, probability=PLAN_PROBABILITY,
                  n_max=PLAN_MAX_TRIALS):
    """Smallest n <= n_max whose pass_probability reaches `probability`; None when none does
    (always None when mean >= target: no number of seeds makes that pass)."""
    if not mean < target:
        return None
    return next((n for n in range(1, n_max + 1)
                 if pass_probability(mean, std, n, n_obs, target) >= probability), None)


def plan_steps(per_step, record_step, target):
    """Where to estimate: the record step and its two neighbours; without a record, the steps
    whose mean is within 0.01 of the target (else the last common step)."""
    steps = [row["step"] for row in per_step]
    if record_step is not None:
        i = steps.index(record_step)
        return steps[max(0, i - 1):i + 2]
    near = [row["step"] for row in per_step if abs(row["mean"] - target) <= 0.01]
    return near or steps[-1:]


def pass_chance(per_step, n_obs, record_step, target=3.28, new_trials=None):
    """How many seeds to pay for: at each plan step, the chance that a NEW set of `new_trials`
    trials (default: as many as observed) passes there, and the trials needed for a 90% chance,
    both with mu exact and mu estimated (see pass_probability). Needs >= 2 trials for a spread."""
    n = new_trials or n_obs
    rows = []
    for row in per_step:
        if row["step"] not in plan_steps(per_step, record_step, target):
            continue
        out = dict(step=row["step"], mean=row["mean"], std=row["std"], n_obs=n_obs, n=n,
                   p_exact=None, p_estimated=None, n90_exact=None, n90_estimated=None,
                   reachable=bool(row["mean"] < target))
        if n_obs >= 2 and math.isfinite(row["mean"]) and math.isfinite(row["std"]):
            out.update(p_exact=pass_probability(row["mean"], row["std"], n, None, target),
                       p_estimated=pass_probability(row["mean"], row["std"], n, n_obs, target),
                       n90_exact=trials_needed(row["mean"], row["std"], None, target),
                       n90_estimated=trials_needed(row["mean"], row["std"], n_obs, target))
        rows.append(out)
    note = PLAN_NOTE if n_obs >= 2 else "needs at least 2 complete trials (a spread) to estimate"
    return dict(note=note, probability=PLAN_PROBABILITY, n_max=PLAN_MAX_TRIALS, rows=rows)


def groups_of(runs):
    """{group label: its runs}, in order (one entry, None, when the logs share a configuration)."""
    out = {}
    for r in runs:
        out.setdefault(r.get("group"), []).append(r)
    return out


def summarize(runs, target=DEFAULT_TARGET, new_trials=None):
    """Mean, std and margin at every validated step common to all counted runs (see screen()),
    and the record step: the earliest of them with (target - mean) * sqrt(n) >= 0.004 (None when
    none passes; mean, margin, std and train_time_mean are then those of the last common step).
    Also: incomplete, duplicates and bad_lines (what was left out, and why) and pass_chance.
    Runs of several configurations (see assign_groups) are summarized per group: the result is
    the claim's group (the earliest passing step, then the larger margin), `group` names it and
    `groups` lists every group's n, step, mean and margin (or why it has none)."""
    if not runs:
        raise RecordsError("no runs to summarize")
    target = DEFAULT_TARGET if target is None else checked_target(target)
    groups = groups_of(runs)
    if len(groups) > 1:
        return summarize_groups(groups, target, new_trials)
    sc = screen(runs)
    if not sc["counted"]:
        hint = ("" if any(r["steps"] for r in runs) else
                "; if the logs hold another metric, choose it with --metric")
        raise RecordsError("no complete trial (one that ends cleanly at its last validation) to "
                           "summarize: " + "; ".join(
                               f"{i['source']} trial {i['trial']} stopped at step {i['last_step']}"
                               f"/{i['total_steps']} ({i['reason']})" for i in sc["incomplete"]) + hint)
    runs = sc["counted"]
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
        steps=common, per_step=per_step,
        incomplete=sc["incomplete"], duplicates=sc["duplicates"], bad_lines=sc["bad_lines"],
        pass_chance=pass_chance(per_step, n, record["step"] if record else None, target, new_trials))


def summarize_groups(groups, target, new_trials):
    results, errors = [], []
    for label, runs in groups.items():
        try:
            results.append((label, summarize(runs, target, new_trials)))
        except RecordsError as e:
            errors.append(dict(group=label, error=str(e)))
    if not results:
        raise RecordsError("no group of logs can be summarized: " + "; ".join(
            f"{e['group']}: {e['error']}" for e in errors))
    # the claim: the earliest passing step, then the larger margin (none passes: the larger margin)
    label, best = min(results, key=lambda x: (x[1]["step"] is None, x[1]["step"] or 0, -x[1]["margin"]))
    table = [dict(group=g, n=r["n"], step=r["step"], final_step=r["final_step"], mean=r["mean"],
                  margin=r["margin"]) for g, r in results]
    return dict(best, group=label, groups=table + errors)


def claimed(runs, target=DEFAULT_TARGET):
    """The runs of the group a summary claims for (all runs when they share a configuration)."""
    groups = groups_of(runs)
    if len(groups) == 1:
        return runs
    return groups[summarize(runs, target)["group"]]


def compare(runs_a, runs_b, target=DEFAULT_TARGET):
    """The benchmark's pairwise test of record A against record B. Each is taken at its own record
    step (its last common step if it never passes):
        z = ((mean_B - mean_A) + (steps_B - steps_A) / 100 * 0.0045) / sqrt(1/n_A + 1/n_B)
    A is significantly better when z >= 0.004, B when -z >= 0.004 (the same test, A and B swapped).
    Only complete trials count, each seed once (see screen())."""
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
                threshold=PASS_MARGIN, verdict=verdict, side_by_side=side_by_side,
                left_out_a=len(a["incomplete"]) + len(a["duplicates"]),
                left_out_b=len(b["incomplete"]) + len(b["duplicates"]))
