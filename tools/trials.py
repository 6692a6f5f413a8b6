"""Which trials count, so that a summary cannot lie: screen() splits the trials read by
tools/logs.py into counted (complete, each seed once, in order), incomplete, duplicates (a repeated
seed, or the same run logged twice) and the cut lines of their logs.

A trial counts when complete (why_incomplete()): ours need a validation at the final step or the
trainer's end line after their last validation; upstream logs (no trial lines) may also end
cleanly at the step where their siblings' logs end (horizons()), since some records stop before
train_steps on purpose. copies() finds upstream trials whose validation lines repeat another's.
loss_at() is the metric of a trial at a step, for everything that reads counted trials.
"""


def is_complete(run):
    return run["total_steps"] is not None and run["total_steps"] in run["steps"]


def trial_name(run):
    return f"{run['source']} trial {run['trial']}"


def horizons(runs):
    """Per group, the last validation step of its upstream trials (logs without trial lines):
    where their logs end, which may be before `train_steps` on purpose (a 2860-step claim of a
    2900-step schedule stops there)."""
    ends = {}
    for r in runs:
        if not r.get("announced") and r["steps"]:
            ends[r.get("group")] = max(ends.get(r.get("group"), 0), r["steps"][-1])
    return ends


def why_incomplete(run, horizon):
    """None when the trial counts. Ours: a validation at its final step, or the trainer's end line
    after it. Upstream's: that, or its log ends cleanly (no cut line, no training step after) at
    its last validation, the step where its siblings' logs end too. A trial whose last step line
    is whole but unusable (a `val_loss:nan` of a diverged run, a step outside the run) ends there."""
    last = run["steps"][-1] if run["steps"] else None
    clean = last is not None and run["stop"] is None and not run.get("cut_end") and \
        not run.get("bad_end") and (run["last_step"] or 0) <= last
    if is_complete(run) or (clean and (run.get("finished") if run.get("announced") else last == horizon)):
        return None
    if run.get("bad_end") and not run["stop"]:
        return run["bad_end"]
    if run["stop"] or run.get("announced") or (run.get("end") or "").startswith("the next trial"):
        return run.get("end") or "no validation at the final step"
    if run.get("cut_end"):
        return f"the log is cut mid-line after step {run['last_step']}"
    if not clean:
        return f"the log ends at training step {run['last_step']}, after its last validation"
    return (f"stopped at step {last}, before the last validation its siblings share ({horizon}): "
            "killed, crashed or cut short")


def copies(runs):
    """{i: j}: upstream trial i repeats validation lines (step, loss and clock) of trial j: the
    same run logged twice, e.g. a log and its stdout capture, or a file holding only its final
    validation. Step 0 aside (no clock yet); j has more lines, or as many (two or more) and comes
    first. Two one-line logs that agree are not taken for copies: different runs may."""
    points = [frozenset(p for p in zip(r["steps"], r["losses"], r["train_time"]) if p[0] > 0)
              if not r.get("announced") else frozenset() for r in runs]
    found = {}
    for i, p in enumerate(points):
        j = next((j for j, q in enumerate(points) if p and j != i and p <= q
                  and runs[i]["total_steps"] == runs[j]["total_steps"]
                  and (len(q) > len(p) or (j < i and len(p) > 1))), None)
        if j is not None:
            found[i] = j
    return found


def screen(runs):
    """What may be pooled: counted (complete trials, each seed once, in order; see
    why_incomplete), incomplete (per trial: source, trial, seed, last_step, total_steps, reason),
    duplicates (a trial whose seed an earlier counted trial already has, or an upstream trial whose
    validation lines repeat another's: kept out, `duplicate_of` names that one) and bad_lines (the
    cut lines of all the runs' logs)."""
    counted, incomplete, duplicates, bad, first, seen = [], [], [], [], {}, set()
    ends, copied = horizons(runs), copies(runs)
    for i, r in enumerate(runs):
        for b in r.get("bad_lines", ()):
            if (b["source"], b["line"]) not in seen:
                seen.add((b["source"], b["line"]))
                bad.append(dict(b))
        info = dict(source=r["source"], trial=r["trial"], seed=r["seed"])
        reason = why_incomplete(r, ends.get(r.get("group")))
        if r.get("copy_of"):
            source, trial = r["copy_of"]
            duplicates.append(dict(info, duplicate_of=f"{source} trial {trial}", copy=True))
        elif i in copied:
            duplicates.append(dict(info, duplicate_of=trial_name(runs[copied[i]]), copy=True))
        elif reason:
            incomplete.append(dict(info, last_step=r.get("last_step"), total_steps=r["total_steps"],
                                   reason=reason))
        elif r["seed"] is not None and r["seed"] in first:
            duplicates.append(dict(info, duplicate_of=trial_name(first[r["seed"]]), copy=False))
        else:
            if r["seed"] is not None:
                first[r["seed"]] = r
            counted.append(r)
    return dict(counted=counted, incomplete=incomplete, duplicates=duplicates, bad_lines=bad)


def loss_at(run, step):
    return run["losses"][run["steps"].index(step)]
