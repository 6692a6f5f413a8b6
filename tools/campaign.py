"""A claim in progress: after k of the N trials of a campaign, the chance that it passes.

A record claim is a campaign of N trials judged at one step S: it passes when
(target - mean_N) * sqrt(N) >= 0.004 (tools/stats.py's pass rule), mean_N over all N trials. With
k trials in, the chance that it passes once the other N - k are in is a predictive probability:

- model: per-trial losses at S are independent Normal(mu, sigma^2), mu and sigma unknown;
- prior: flat on mu; on sigma^2, Jeffreys' 1/sigma^2 when k >= 3 (the trials' own spread), else
  (k < 3: no usable spread of their own) a scaled-inverse-chi^2 with nu0 = n_parent - 1 degrees
  of freedom and scale s0^2, the spread of the parent record's published trials at its claim step
  (tools/parents.py): as if those trials' spread had been seen before these;
- then sigma^2 | data ~ nu s^2 / chi^2_nu with nu = nu0 + k - 1 and nu s^2 = nu0 s0^2 + (k-1) s_k^2,
  mu | sigma, data ~ Normal(mean_k, sigma^2 / k), and the mean of the m = N - k trials to come is
  exactly mean_k + s * sqrt(1/k + 1/m) * t_nu (Student's t): predictive_pass() is one t CDF.

A futility stop (`--stop-below P`, campaign_decision()) ends a campaign after a complete trial
when that chance is below P. Nothing ever stops a campaign because it passes: choosing N by the
result inflates the chance of a false claim; a futility stop can only drop claims.

campaign_of() reads a folder or log (the trials that count: tools/trials.py's screen) and chooses
S: --step, else the folder's own earliest passing step if it passes, else the preset's published
claim step (CLAIM_STEPS), else the last common validated step. campaign_line() is the one line
the trainer logs after each trial and `records.py campaign` prints last; futility_stops() finds
the trainer's `campaign stopped:` lines for `summary` and `submit`.
"""
import functools
import math
import os
import re

import numpy as np

from tools.logs import RecordsError, load_record
from tools.parents import ROOT, parent_of, preset_of
from tools.stats import (PASS_MARGIN, PLAN_MAX_TRIALS, PLAN_PROBABILITY, TOLERANCE, claimed,
                         resolve_target, summarize, task_of)
from tools.trials import loss_at, screen

# The step each published record claims at: a run of that preset is judged there by default.
CLAIM_STEPS = {"record": 3175, "aurora_2930": 2930, "aurora_2890": 2890, "aurora_2860": 2860}
OWN_SPREAD_FROM = 3  # with fewer complete trials, the spread comes from the parent record
STOP_LINE = re.compile(r"^campaign stopped: .*$", re.M)
STOP_ABOVE_REFUSED = (
    "--stop-above is refused: stopping a campaign because its claim passes chooses the number "
    "of trials by the result, which inflates the chance of a false claim (the rules ask for "
    "non-cherry-picked runs); only a futility stop (--stop-below P) is offered, since it can "
    "only drop claims")


def t_cdf(x, nu):
    """Student's t CDF with an integer nu >= 1 degrees of freedom, exact (the finite series of
    Abramowitz & Stegun 26.7.3-4; no scipy needed); x a number or an array."""
    nu = int(nu)
    if nu < 1:
        raise ValueError(f"t_cdf: nu must be an integer >= 1, got {nu}")
    x = np.asarray(x, dtype=float)
    theta = np.arctan(x / math.sqrt(nu))
    c2, s = np.cos(theta) ** 2, np.sin(theta)
    term, total = np.ones_like(x), np.ones_like(x)
    if nu % 2:
        for j in range(1, (nu - 3) // 2 + 1):
            term = term * c2 * (2 * j) / (2 * j + 1)
            total = total + term
        a = 2 / math.pi * (theta + (s * np.cos(theta) * total if nu > 1 else 0.0))
    else:
        for j in range(1, (nu - 2) // 2 + 1):
            term = term * c2 * (2 * j - 1) / (2 * j)
            total = total + term
        a = s * total
    out = np.clip(0.5 + 0.5 * a, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def t_quantile(p, nu):
    """x with t_cdf(x, nu) = p (bisection; for figures)."""
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, nu) < p else (lo, mid)
    return (lo + hi) / 2


def posterior_spread(std, k, prior=None):
    """(s, nu): the scale and degrees of freedom of sigma's posterior (see the module docstring).
    prior: (s0, nu0) of the parent record, or None (Jeffreys: the k trials' own std, k - 1 df)."""
    s0, nu0 = prior if prior is not None else (0.0, 0)
    nu = nu0 + k - 1
    if nu < 1:
        raise ValueError(f"{k} trial(s) and no prior spread: at least 2 are needed")
    own = np.asarray(std, dtype=float) ** 2 * (k - 1) if k > 1 else 0.0
    return np.sqrt((nu0 * s0 ** 2 + own) / nu), nu


def pass_line(n, target):
    """The largest mean of n trials that passes: target - 0.004 / sqrt(n) (with the rule's slack)."""
    return target - (PASS_MARGIN - TOLERANCE) / math.sqrt(n)


def predictive_pass(mean, std, k, n, target, prior=None):
    """Chance that an n-trial campaign passes, given k <= n trials in with `mean` and `std`
    (ddof=1) at the claim step. mean/std may be arrays (one campaign each). k == n: 1 or 0."""
    mean = np.asarray(mean, dtype=float)
    m = n - k
    if m == 0:
        out = (mean <= pass_line(n, target)).astype(float)
    else:
        s, nu = posterior_spread(std, k, prior)
        # the m trials to come must average at most this for mean_n to reach the pass line
        needed = (n * pass_line(n, target) - k * mean) / m
        scale = s * math.sqrt(1 / k + 1 / m)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(scale > 0, (needed - mean) / np.where(scale > 0, scale, 1.0),
                         np.where(needed >= mean, np.inf, -np.inf))
        out = t_cdf(z, nu)
    out = np.asarray(out, dtype=float)
    return float(out) if out.ndim == 0 else out


def trials_for(mean, std, k, target, prior=None, probability=PLAN_PROBABILITY, n_max=PLAN_MAX_TRIALS):
    """Smallest campaign size n (k <= n <= n_max) whose predictive_pass reaches `probability`,
    given the k trials in; None when none does."""
    return next((n for n in range(k, max(k, n_max) + 1)
                 if predictive_pass(mean, std, k, n, target, prior) >= probability), None)


def final_mean_interval(mean, std, k, n, prior=None, level=0.9):
    """Central `level` predictive interval of the n-trial mean given k trials in (figures)."""
    if k >= n:
        return mean, mean
    s, nu = posterior_spread(std, k, prior)
    m = n - k
    half = m / n * float(s) * math.sqrt(1 / k + 1 / m) * t_quantile(0.5 + level / 2, nu)
    return mean - half, mean + half


def campaign_math(losses, n, target, prior=None):
    """The claim so far from k = len(losses) trials' losses at the claim step: dict(k, n, mean,
    std, margin (of the k in), needed (the n-trial pass line), passes_now (the k pass on their
    own), chance, n90 (trials for a 90% chance), model (words)). prior (s0, nu0, words) is used
    when k < 3; chance None when k < 3 and no prior is given."""
    k = len(losses)
    if k < 1:
        raise RecordsError("no complete trial yet: nothing to estimate")
    values = np.asarray(losses, dtype=float)
    if not np.all(np.isfinite(values)):
        raise RecordsError("a loss at the claim step is not finite (a diverged trial): the "
                           "campaign cannot pass")
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if k > 1 else 0.0
    out = dict(k=k, n=n, target=target, mean=mean, std=std, margin=(target - mean) * math.sqrt(k),
               needed=pass_line(n, target), passes_now=bool(mean <= pass_line(k, target)),
               chance=None, n90=None, model=None)
    if k >= OWN_SPREAD_FROM:
        used = None
        s, nu = posterior_spread(std, k)
        out["model"] = f"own spread {float(s):.5f} ({nu} df, Jeffreys prior)"
    elif prior is not None:
        used = prior[:2]
        s, nu = posterior_spread(std, k, used)
        out["model"] = (f"k < {OWN_SPREAD_FROM}: spread {float(s):.5f} ({nu} df) from {prior[2]}"
                        + (f" pooled with the {k} trials'" if k > 1 else ""))
    else:
        out["model"] = f"k < {OWN_SPREAD_FROM} and no parent spread: no estimate"
        return out
    out["chance"] = predictive_pass(mean, std, k, n, target, used)
    out["n90"] = trials_for(mean, std, k, target, used)
    return out


@functools.lru_cache(maxsize=None)
def parent_spread(path):
    """(s0, nu0, words): the spread of a published record's trials at its claim step."""
    s = summarize(load_record(path)["runs"])
    step = s["step"] if s["step"] is not None else s["final_step"]
    name = os.path.relpath(path, ROOT)
    return float(s["std"]), s["n"] - 1, f"the parent record's {s['n']} published trials at step {step} ({name})"


def choose_step(runs, common, target, preset, step=None):
    """(S, why) for the claim: `step` (must be validated by every trial), else the trials' own
    earliest passing step, else the preset's published claim step, else the last common step."""
    if step is not None:
        if step not in common:
            near = ", ".join(map(str, [s for s in common if abs(s - step) <= 100][:8] or common[-3:]))
            raise RecordsError(f"--step {step} is not a validated step of every counted trial "
                               f"(near it: {near})")
        return step, "--step"
    own = summarize(runs, target)["step"]
    if own is not None:
        return own, "the trials' own earliest passing step"
    claim = CLAIM_STEPS.get(preset)
    if claim in common:
        return claim, f"the {preset} preset's published claim step"
    why = (f"the last common validated step (the {preset} preset's claim step {claim} is not one)"
           if claim else "the last common validated step")
    return common[-1], why


def campaign_of(paths, n, step=None, target=None, metric=None):
    """The claim so far of a folder (or logs) filled by one or several processes: its counted
    trials (complete, each seed once; tools/trials.py), the claim step, and campaign_math() with
    the parent record's spread for k < 3. Raises RecordsError on bad input."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RecordsError(f"--trials must be a whole number >= 1, got {n!r}")
    record = load_record(paths, metric)
    target, _ = resolve_target(record["logs"], target)
    sc = screen(claimed(record["runs"], target))
    runs, k = sc["counted"], len(sc["counted"])
    if not k:
        raise RecordsError("no complete trial yet in " + ", ".join(map(str, [paths] if isinstance(
            paths, str) else paths)) + ": the first estimate comes after the first trial")
    if n < k:
        raise RecordsError(f"--trials {n} is less than the {k} complete trials already in: give the "
                           "campaign's planned number of trials")
    common = sorted(set.intersection(*(set(r["steps"]) for r in runs)))
    if not common:
        raise RecordsError(f"the {k} complete trials have no validated step in common")
    preset = preset_of(record["logs"])
    claim, why = choose_step(runs, common, target, preset, step)
    prior = parent_spread(parent_of(record["logs"])[0]) if k < OWN_SPREAD_FROM else None
    task = task_of(record["logs"])
    if prior and task:  # e.g. the tiny preset: the published parents are all FineWeb records
        prior = prior[:2] + (f"{prior[2]}, a stand-in: they trained on FineWeb, these trials on {task}",)
    out = campaign_math([loss_at(r, claim) for r in runs], n, target, prior)
    out.update(step=claim, step_why=why, metric=record["metric"], preset=preset,
               incomplete=sc["incomplete"], duplicates=sc["duplicates"],
               stops=futility_stops(record["logs"]))
    return out


def percent_text(p):
    return "n/a" if p is None else ">99.9%" if p > 0.999 else "<0.1%" if p < 0.001 else f"{100 * p:.1f}%"


def chance_text(c):
    if c["k"] >= c["n"]:  # nothing left to predict
        return f"all in, it {'passes' if c['chance'] else 'does not pass'}"
    return percent_text(c["chance"])


def campaign_line(c):
    """The trainer's line after each complete trial (and `records.py campaign`'s last line)."""
    n90 = ("n/a" if c["chance"] is None else str(c["n90"]) if c["n90"] is not None
           else f">{PLAN_MAX_TRIALS}")
    return (f"campaign: {c['k']} of {c['n']} trials in; step {c['step']}: mean {c['mean']:.6f}, "
            f"margin {c['margin']:.5f} (n={c['k']}{', passes' if c['passes_now'] else ''}); the "
            f"{c['n']}-trial campaign needs mean <= {c['needed']:.6f}; chance it passes at step "
            f"{c['step']}: {chance_text(c)}; trials for a {100 * PLAN_PROBABILITY:.0f}% "
            f"chance: {n90}; model: {c['model']}")


def campaign_decision(c, stop_below):
    """The `campaign stopped:` line when a futility stop applies (trials remain and the chance is
    below stop_below), else None. A passing claim never stops a campaign."""
    if stop_below is None or c["k"] >= c["n"] or c["chance"] is None or not c["chance"] < stop_below:
        return None
    return (f"campaign stopped: after {c['k']} of {c['n']} trials, for futility: the chance that "
            f"the {c['n']}-trial campaign passes at step {c['step']} is {percent_text(c['chance'])}, "
            f"below --stop-below {stop_below:g}; the {c['n'] - c['k']} remaining trial(s) are not "
            f"run, the {c['k']} trial(s) run are complete and counted")


def futility_stops(logs):
    """[(log path, its `campaign stopped:` line)] of logs read by tools/logs.py."""
    found = []
    for log in logs:
        try:
            with open(log["path"], encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        start = text.find("=" * 50)  # the output part only: never the code's own strings
        found += [(log["path"], m.group(0)) for m in STOP_LINE.finditer(text, max(start, 0))]
    return found


def stop_notes(logs):
    """Notes for `summary` and `submit`: the campaign was stopped for futility."""
    return [f"campaign was stopped ({os.path.basename(path)}): "
            f"{line[len('campaign stopped: '):]}" for path, line in futility_stops(logs)]


def print_campaign(c, source):
    for x in c["incomplete"]:
        print(f"not counted (incomplete): {x['source']} trial {x['trial']}: {x['reason']}")
    for x in c["duplicates"]:
        print(f"not counted (duplicate): {x['source']} trial {x['trial']} repeats {x['duplicate_of']}")
    for _, line in c["stops"]:
        print(f"note: {line}")
    print(f"campaign: {source}: {c['k']} of {c['n']} trials complete ({c['metric']}, target "
          f"{c['target']:g})")
    print(f"claim step {c['step']}: {c['step_why']}")
    print(f"mean {c['mean']:.6f}, std {c['std']:.5f}, margin {c['margin']:.5f} with n={c['k']}"
          f"{' (passes)' if c['passes_now'] else ''}; the {c['n']}-trial campaign passes when its "
          f"mean is <= {c['needed']:.6f}")
    print(f"model: losses at the claim step normal, mean and spread unknown (flat prior on the mean); "
          f"{c['model']}")
    print(campaign_line(c))
