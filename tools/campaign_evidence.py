"""Evidence for the futility stop (--stop-below P): is it safe, and what does it save?

    python tools/campaign_evidence.py UPSTREAM --out DIR [--draws R]

UPSTREAM is a modded-nanogpt checkout (or its records/track_3_optimization folder), as for
tools/check_leaderboard.py, whose leaderboard rows and logs this reads. Writes DIR/evidence.md
(the tables) and DIR/campaign.png, and prints the tables:

(a) every passing leaderboard result with >= 8 trials, replayed trial by trial (in seed order when
    every trial's seed is known, else in log order) at its claimed step and n: the trial after
    which --stop-below P would have stopped it (none should), and the lowest chance it showed;
(b) the same logs with every loss raised by 0.001, 0.002 and 0.003 (a slightly worse idea): after
    how many trials each stops, whether the shifted campaign would have passed anyway, and the
    trials and node-hours (the logs' training time per trial) a stop saves;
(c) a simulation of campaigns whose true mean lies around the pass line (normal losses with the
    rules' sigma 0.0013; the k < 3 prior is the published 3175-step record's spread, as in a real
    run): for P = 0.01, 0.05, 0.1, the chance of stopping a campaign that would have passed and
    the expected trials saved. Seeded: the same command gives the same numbers.

The figure: one result's per-trial losses at its claim step as they come in, the running mean and
the 90% predictive band of the final n-trial mean, the pass line; as logged and shifted.
"""
import argparse
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.campaign import (campaign_math, final_mean_interval, parent_spread, pass_line,  # noqa: E402
                            predictive_pass)
from tools.check_leaderboard import leaderboard, target_of  # noqa: E402
from tools.logs import RecordsError  # noqa: E402
from tools.parents import PUBLISHED  # noqa: E402
from tools.stats import DEFAULT_TARGET  # noqa: E402
from tools.summary import summary_of  # noqa: E402
from tools.trials import screen  # noqa: E402

LEVELS = (0.01, 0.05, 0.1)   # --stop-below values studied
MAIN = 0.05                  # the one the replays are told in full
SHIFT_LEVELS = (0.01, MAIN)  # shifted replays: totals for these
SHIFTS = (0.001, 0.002, 0.003)
SIGMA = 0.0013               # the rules' per-trial sigma, for the simulation
SIM_N = (8, 16, 20)
SIM_OFFSETS = (-0.0015, -0.001, -0.0005, 0.0, 0.0005, 0.001, 0.0015, 0.002, 0.003)
SEED_IN_PATH = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)


def seed_of(run, root):
    if isinstance(run["seed"], int):
        return run["seed"]
    m = SEED_IN_PATH.search(os.path.relpath(run["source"], root))
    return int(m.group(1)) if m else None


def claim_trials(path, row):
    """(trials, note) that the leaderboard row counts at its step: the summary's counted trials
    of the claim, or (when the leaderboard pools more, e.g. several configurations or a trial
    stopped after the claim step) every trial of the folder that validated at the step, copies
    and repeated seeds once. None when the logs do not hold row n such trials."""
    s, runs, record = summary_of(path)
    counted = screen(runs)["counted"]
    if len(counted) == row["n"] and all(row["step"] in r["steps"] for r in counted):
        return counted, None
    for r in record["runs"]:
        r["group"] = None
    left = {(d["source"], d["trial"]) for d in screen(record["runs"])["duplicates"]}
    pooled = [r for r in record["runs"] if (r["source"], r["trial"]) not in left and row["step"] in r["steps"]]
    if len(pooled) == row["n"]:
        return pooled, (f"the leaderboard's {row['n']} trials: every trial that validated at "
                        f"{row['step']} (the summary counts {len(counted)})")
    return None, f"the logs hold {len(counted)} counted trial(s) ({len(pooled)} validated at {row['step']})"


def ordered(trials, root):
    seeds = [seed_of(r, root) for r in trials]
    if all(s is not None for s in seeds) and len(set(seeds)) == len(seeds):
        return [r for _, r in sorted(zip(seeds, trials), key=lambda x: x[0])], "seeds"
    return trials, "log order"


def replay(losses, n, target, prior, level):
    """(k after which a --stop-below `level` campaign of n stops, or None; the lowest chance seen
    before all n were in, and after which trial)."""
    lowest = (1.0, None)
    for k in range(1, n):
        chance = campaign_math(losses[:k], n, target, prior)["chance"]
        lowest = min(lowest, (chance, k))
        if chance < level:
            return k, lowest
    return None, lowest


def passes_all(losses, target):
    return float(np.mean(losses)) <= pass_line(len(losses), target)


def published_replays(track):
    results = os.path.join(track, "results")
    prior = parent_spread(PUBLISHED)
    rows, skipped = [], []
    for row in leaderboard(track):
        if row["n"] < 8 or not row["passes"]:
            continue
        path = target_of(results, row["link"])
        try:
            trials, note = claim_trials(path, row)
        except RecordsError as e:
            trials, note = None, str(e)
        if trials is None:
            skipped.append(dict(row, why=note))
            continue
        trials, order = ordered(trials, results)
        losses = [r["losses"][r["steps"].index(row["step"])] for r in trials]
        seconds = [r["train_time"][-1] for r in trials]
        out = dict(row, name=os.path.relpath(path, results), note=note, order=order, losses=losses,
                   mean=float(np.mean(losses)), hours=float(np.nanmean(seconds)) / 3600,
                   stops={p: replay(losses, row["n"], DEFAULT_TARGET, prior, p)[0] for p in LEVELS},
                   lowest=replay(losses, row["n"], DEFAULT_TARGET, prior, 0.0)[1], shifted={})
        for d in SHIFTS:
            moved = [x + d for x in losses]
            for level in SHIFT_LEVELS:
                k, _ = replay(moved, row["n"], DEFAULT_TARGET, prior, level)
                out["shifted"][d, level] = dict(stop=k, passes=passes_all(moved, DEFAULT_TARGET),
                                                saved=row["n"] - k if k else 0)
        rows.append(out)
    return rows, skipped, prior


def simulate(prior, draws, seed=0):
    """Campaigns of n normal losses (mean pass_line(n) + offset, sigma SIGMA), each judged after
    every trial as the trainer judges it. Per (n, offset, level): would pass, stopped, stopped
    among those that would pass, expected trials saved."""
    rng = np.random.default_rng(seed)
    out = []
    for n in SIM_N:
        for offset in SIM_OFFSETS:
            mu = pass_line(n, DEFAULT_TARGET) + offset
            x = rng.normal(mu, SIGMA, (draws, n))
            csum = np.cumsum(x, 1)
            chances = np.empty((draws, n - 1))
            for k in range(1, n):
                mean = csum[:, k - 1] / k
                std = x[:, :k].std(1, ddof=1) if k > 1 else np.zeros(draws)
                chances[:, k - 1] = predictive_pass(mean, std, k, n, DEFAULT_TARGET,
                                                    prior[:2] if k < 3 else None)
            would = csum[:, -1] / n <= pass_line(n, DEFAULT_TARGET)
            for level in LEVELS:
                below = chances < level
                stopped = below.any(1)
                k_stop = np.where(stopped, below.argmax(1) + 1, n)
                out.append(dict(n=n, offset=offset, level=level, would=float(would.mean()),
                                stopped=float(stopped.mean()), passing=int(would.sum()),
                                passing_stopped=int((stopped & would).sum()),
                                lost=float((stopped & would).sum() / max(would.sum(), 1)),
                                saved=float((n - k_stop).mean())))
    return out


def figure(result, prior, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, step = result["n"], result["step"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, d in zip(axes.flat, (0.0,) + SHIFTS):
        losses = [x + d for x in result["losses"]]
        ks = np.arange(1, n + 1)
        running = np.cumsum(losses) / ks
        bands = [final_mean_interval(running[k - 1], np.std(losses[:k], ddof=1) if k > 1 else 0.0,
                                     k, n, prior[:2] if k < 3 else None) for k in ks]
        ax.scatter(ks, losses, s=14, color="0.45", label=f"trial loss at step {step}")
        ax.plot(ks, running, color="C0", label="running mean")
        ax.fill_between(ks, [b[0] for b in bands], [b[1] for b in bands], color="C0", alpha=0.2,
                        label=f"90% band of the final {n}-trial mean")
        ax.axhline(pass_line(n, DEFAULT_TARGET), color="C3", ls="--",
                   label=f"pass line of {n} trials ({pass_line(n, DEFAULT_TARGET):.5f})")
        k, _ = replay(losses, n, DEFAULT_TARGET, prior, MAIN)
        if k:
            ax.axvline(k + 0.5, color="k", ls=":", label=f"--stop-below {MAIN} stops here")
        shift = "as logged" if d == 0 else f"every loss +{d:.3f}"
        ax.set_title(f"{result['name']} ({shift}): " + (f"stops after trial {k} of {n}" if k else
                                                      f"runs all {n} trials"), fontsize=9)
        ax.set_xlabel("trials in")
        ax.set_ylabel(f"val loss at step {step}")
        ax.xaxis.get_major_locator().set_params(integer=True)
    shown = {}
    for ax in axes.flat:  # one legend for the four panels
        for handle, label in zip(*ax.get_legend_handles_labels()):
            shown.setdefault(label, handle)
    fig.legend(shown.values(), shown.keys(), loc="lower center", ncol=len(shown), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def lost_text(s):
    """The share of passing campaigns stopped; the counts when too few pass for a share to mean much."""
    if s["passing"] < 100:
        return f"{s['passing_stopped']} of {s['passing']}"
    return f"{100 * s['lost']:.2f}%"


def tables(rows, skipped, sims, prior, draws):
    hours = lambda h: f"{h:.2f}"  # noqa: E731
    out = [f"Target {DEFAULT_TARGET}; pass rule (target - mean_n) * sqrt(n) >= 0.004. With k < 3 "
           f"trials the spread is {prior[2]} (std {prior[0]:.5f}, {prior[1]} df).", "",
           "## (a) Published results with >= 8 trials, replayed at their claimed step and n", "",
           "| # | result | step | n | mean | order | lowest chance (after trial) | stops at P=0.01 | "
           "P=0.05 | P=0.1 | training time per trial (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stops = [str(r["stops"][p]) if r["stops"][p] else "no" for p in LEVELS]
        out.append(f"| {r['number']} | `{r['name']}` | {r['step']} | {r['n']} | {r['mean']:.5f} | "
                   f"{r['order']} | {100 * r['lowest'][0]:.1f}% ({r['lowest'][1]}) | "
                   + " | ".join(stops) + f" | {3600 * r['hours']:.0f} |")
    out += [""] + [f"- #{r['number']}: {r['note']}" for r in rows if r["note"]]
    out += [f"- #{r['number']} `{r['link'].split('/')[0]}` left out: {r['why']}" for r in skipped]
    for p in LEVELS:
        out.append(f"- --stop-below {p}: {sum(bool(r['stops'][p]) for r in rows)} of {len(rows)} "
                   "published results stopped")
    out += ["", f"## (b) The same logs, every loss shifted up (--stop-below {MAIN})", "",
            "| # | result | n | " + " | ".join(f"+{d:.3f}: stops after | passes anyway | trials saved | "
                                           f"node-hours saved" for d in SHIFTS) + " |",
            "|---|---|---|" + "---|---|---|---|" * len(SHIFTS)]
    for r in rows:
        cells = []
        for d in SHIFTS:
            s = r["shifted"][d, MAIN]
            cells += [str(s["stop"]) if s["stop"] else "no stop", "yes" if s["passes"] else "no",
                      str(s["saved"]), hours(s["saved"] * r["hours"])]
        out.append(f"| {r['number']} | `{r['name']}` | {r['n']} | " + " | ".join(cells) + " |")
    out.append("")
    for level, d in ((level, d) for level in SHIFT_LEVELS for d in SHIFTS):
        s = [r["shifted"][d, level] for r in rows]
        out.append(f"- --stop-below {level}, +{d:.3f}: {sum(bool(x['stop']) for x in s)} of {len(s)} stopped "
                   f"({sum(bool(x['stop']) and x['passes'] for x in s)} of them would have passed), "
                   f"{sum(x['passes'] for x in s)} would still pass; saved "
                   f"{sum(x['saved'] for x in s)} of {sum(r['n'] for r in rows)} trials, "
                   f"{sum(x['saved'] * r['hours'] for x, r in zip(s, rows)):.1f} node-hours of logged "
                   "training time")
    out += ["", f"## (c) Simulated campaigns ({draws} per cell, seed 0; sigma {SIGMA})", "",
            "offset: true mean minus the pass line of n trials (target - 0.004 / sqrt(n)); "
            "'lost' is the share of campaigns that would have passed which the stop ends (the counts "
            "when fewer than 100 of them would pass).", "",
            "| n | offset | would pass | " + " | ".join(f"P={p}: stopped | lost | trials saved"
                                                   for p in LEVELS) + " |",
            "|---|---|---|" + "---|---|---|" * len(LEVELS)]
    for n in SIM_N:
        for offset in SIM_OFFSETS:
            cells = [s for s in sims if s["n"] == n and s["offset"] == offset]
            out.append(f"| {n} | {offset:+.4f} | {100 * cells[0]['would']:.1f}% | " + " | ".join(
                f"{100 * s['stopped']:.1f}% | {lost_text(s)} | {s['saved']:.2f}" for s in cells) + " |")
    out.append("")
    for p in LEVELS:
        good = [s for s in sims if s["level"] == p and s["offset"] <= 0]
        worst = max(good, key=lambda s: s["lost"])
        clear = max((s for s in good if s["offset"] <= -0.001), key=lambda s: s["lost"])
        saved = {d: [s["saved"] for s in sims if s["level"] == p and s["offset"] == d and s["n"] == 20][0]
                 for d in (0.001, 0.002)}
        out.append(f"- P={p}: of the campaigns that would pass with a true mean at or below the pass "
                   f"line, at most {100 * worst['lost']:.1f}% are stopped (n={worst['n']}, offset "
                   f"{worst['offset']:+.4f}); {100 * clear['lost']:.1f}% at most with a true mean 0.001 "
                   f"or more below it; a 20-trial campaign 0.001 (0.002) above the line saves "
                   f"{saved[0.001]:.1f} ({saved[0.002]:.1f}) trials on average")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("upstream", metavar="UPSTREAM", help="modded-nanogpt checkout or its "
                    "records/track_3_optimization folder")
    ap.add_argument("--out", required=True, metavar="DIR", help="folder for evidence.md and campaign.png")
    ap.add_argument("--draws", type=int, default=20000, help="simulated campaigns per cell (default 20000)")
    ap.add_argument("--figure", default="20260505_aurora", help="the result drawn in the figure "
                    "(default: the 3175-step Aurora record)")
    args = ap.parse_args(argv)
    track = args.upstream
    if os.path.isdir(os.path.join(track, "records", "track_3_optimization")):
        track = os.path.join(track, "records", "track_3_optimization")
    if not os.path.isfile(os.path.join(track, "README.md")) or not os.path.isdir(os.path.join(track, "results")):
        print(f"error: {args.upstream} is not a modded-nanogpt checkout or its "
              "records/track_3_optimization folder (README.md and results/ expected)", file=sys.stderr)
        return 2
    if args.draws < 100:
        print(f"error: --draws must be >= 100, got {args.draws}", file=sys.stderr)
        return 2
    rows, skipped, prior = published_replays(track)
    drawn = [r for r in rows if r["name"].split("/")[0] == args.figure]
    if not drawn:
        print(f"error: --figure {args.figure}: no replayed result of that name", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    text = tables(rows, skipped, simulate(prior, args.draws), prior, args.draws)
    with open(os.path.join(args.out, "evidence.md"), "w", encoding="utf-8") as f:
        f.write(text)
    figure(drawn[0], prior, os.path.join(args.out, "campaign.png"))
    print(text)
    print(f"wrote {os.path.join(args.out, 'evidence.md')} and {os.path.join(args.out, 'campaign.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
