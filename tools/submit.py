"""The `submit` command: an upstream-style result folder for a record that passes.

submit() checks that the record's logs share one configuration and code part and that a step
passes, compares the record with its parent (by default the published record its preset starts
from: tools/parents.py) with the pairwise test, and writes the folder atomically (built beside
it, then renamed): the logs, the script that ran (the code part), a README (submission_readme():
claim, per-seed table, pass chance, comparison with the parent, configuration, hardware, the
command that reproduces it) and two figures (tools/plots.py). reproduce() rebuilds that command from the log's header: the flags
that differ from the trainer's defaults and preset (read by tools/configs.py's script_facts(),
turned into arguments by flag_arguments()) and the seeds (seed_arguments()).
"""

if __name__ == "__main__":  # a module of the toolkit, not a command
    raise SystemExit("tools/submit.py is a module of the records toolkit, not a command: "
                     "python tools/records.py --help lists the commands")

import datetime
import difflib
import os
import re
import shlex
import shutil
import tempfile
import urllib.parse

from tools.campaign import stop_notes
from tools.configs import config_difference, config_of, inconsistencies, run_specific, script_facts
from tools.logs import RecordsError, header_value, read_record
from tools.parents import PARENTS, default_parent, parent_note, published_label
from tools.plots import plot_submission
from tools.stats import (DEFAULT_TARGET, NOT_LEADERBOARD, PASS_MARGIN, compare, passes, resolve_target, summarize,
                         task_of, unlike_tasks)
from tools.summary import bad_line_kind, needed, percent, relative_sources, seed_text, task_mark, write_public
from tools.trials import loss_at, screen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM_RESULTS = "records/track_3_optimization/results"  # where results live upstream
RESULTS_DIR = os.path.join(ROOT, *UPSTREAM_RESULTS.split("/"))  # the same path here


def same_value(a, b):
    """A default (Python) and a logged value (header_value) say the same: lists and tuples alike,
    1 == 1.0, True only equal to True."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(same_value, a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def flag_arguments(name, value, facts):
    """Command-line arguments that set hyperparameter `name` to its logged `value` (the header's
    text: JSON as our trainer writes it, or a Python literal as older logs do); plain values, as
    the flags take them (--rule aurora, --adam-betas 0.8 0.95, --no-nesterov). None when no flag
    can say it (e.g. null, or a nested value)."""
    flag = "--" + name.replace("_", "-")
    parsed = header_value(value)
    if isinstance(parsed, bool):
        if facts["boolean_optional"]:
            return [flag] if parsed else ["--no-" + name.replace("_", "-")]
        return [flag, "on" if parsed else "off"]
    if isinstance(parsed, (list, tuple)):  # e.g. adam_betas: [0.8, 0.95] -> --adam-betas 0.8 0.95
        if not all(isinstance(x, (int, float, str)) and not isinstance(x, bool) for x in parsed):
            return None
        return [flag, *map(str, parsed)]
    if parsed is None or isinstance(parsed, dict):
        return None
    if isinstance(parsed, str):
        return [flag, parsed]
    return [flag, value.strip()]  # a number: as logged


def seed_arguments(logs, counted):
    """(arguments for one process, note, per-log commands or None) reproducing the seeds."""
    seeds, n = [r["seed"] for r in counted], len(counted)
    if all(isinstance(s, int) for s in seeds) and seeds == list(range(seeds[0], seeds[0] + n)):
        return (["--seed", str(seeds[0]), "--trials", str(n)],
                f"seeds {seeds[0]}..{seeds[-1]}" if n > 1 else f"seed {seeds[0]}", None)
    labels = [s for s in seeds if not isinstance(s, int)]
    if labels:  # older logs label unseeded trials record0, record1, ...: no seed was recorded
        note = (f"trials labelled {', '.join(map(str, labels[:3]))}{', ...' if len(labels) > 3 else ''} "
                "ran without --seed: they are not reproducible by seed (this runs new trials of the "
                "same configuration)")
        if len(labels) == n:
            return ["--trials", str(n)], note, None
    per_log = []
    for log in logs:
        mine = [r for r in counted if r["source"] == log["path"]]
        if mine:
            seed = mine[0]["seed"]
            per_log.append(["--trials", str(len(mine))]
                           + (["--seed", str(seed)] if isinstance(seed, int) else []))
    return ["--trials", str(n)], (note + "; " if labels else "") + f"seeds {seeds}", per_log


def reproduce(logs, counted, name):
    """The command lines that reproduce the record, and notes on what they cannot say."""
    log, notes = logs[0], []
    world = next((m.group(1) for line in log["header"]
                  for m in [re.search(r"world_size\s*:?\s*(\d+)", line)] if m), None)
    if not log["hyperparameters"]:  # an upstream script: it holds its own configuration
        return ([f"torchrun --standalone --nproc_per_node={world or 8} train_gpt_simple_{name}.py"],
                [f"upstream-style script: run it once per trial ({len(counted)} trials); its "
                 "configuration and seeding are in the script"])
    hp, code = log["hyperparameters"], log["code"]
    facts = script_facts(code)
    skip = run_specific(log)
    flags = []
    if facts["defaults"]:
        base, presets = dict(facts["defaults"]), facts["presets"]
        values = {k: header_value(v) for k, v in hp.items()}
        known = True  # every part of the preset readable from the code part (else every setting is restated)
        if "preset" in hp:  # the log names its preset: its values are the baseline for flags
            parts = values["preset"].split("+") if isinstance(values["preset"], str) else []
            known = all(p in presets for p in parts)
            for part in parts:
                base.update(presets.get(part, {}))
            if not known:
                notes.append(f"preset {values['preset']}: its values are not literals of the code part "
                             "(a technique's, or scaled to the run): every setting is restated as a flag")
        else:  # an older trainer: the preset whose every value the log shows, if one
            matching = [p for p, entries in presets.items() if entries and all(
                k in values and same_value(v, values[k]) for k, v in entries.items() if k not in skip)]
            if matching and '"--preset"' in code:
                preset = max(matching, key=lambda p: len(presets[p]))
                flags += ["--preset", preset]
                base.update(presets[preset])
        unflagged = []
        for k, v in hp.items():
            if k in skip or k not in base or (known and same_value(base[k], values[k])):
                continue
            arguments = flag_arguments(k, v, facts)
            if arguments is not None and (facts["generated"] or f'"--{k.replace("_", "-")}"' in code):
                flags += arguments
            else:
                unflagged.append(f"{k}: {v}")
        if unflagged:
            notes.append(f"{', '.join(unflagged)}: not the script's default and no command-line flag: "
                         f"set in train_gpt.py (train_gpt_simple_{name}.py is the code that ran)")
    else:
        notes.append("the script's defaults could not be read: flags other than the trial count "
                     "are not inferred; see the configuration table")
    seeds, seed_note, per_log = seed_arguments(logs, counted)
    notes.append(seed_note)
    if world:
        notes.append(f"world size {world} (./run.sh uses every GPU of the node)")
    if per_log:
        notes.append("the seeds are not one run of consecutive seeds: one process per log")
        return [shlex.join(["./run.sh", *args, *flags, "--run-name", name, "--append"])
                for args in per_log], notes
    return [shlex.join(["./run.sh", *seeds, *flags, "--run-name", name])], notes


def link(path):
    """A markdown link target: spaces and other characters a link cannot hold, %-encoded."""
    return urllib.parse.quote(path)


def claim_terms(metric, target):
    """What the leaderboard row adds to its description when the claim is not on the benchmark's
    terms (val_loss, 3.28), which its table's header states: e.g. ' (metric val_ema_loss)'."""
    terms = ([f"metric {metric}"] if metric != "val_loss" else []) + (
        [f"target {target:g}"] if target != DEFAULT_TARGET else [])
    return f" ({', '.join(terms)})" if terms else ""


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def verdict_vs_parent(c):
    """compare(this record, parent)'s verdict in words (A is this record, B the parent)."""
    return (c["verdict"].replace("A is", "this record is").replace("B is", "the parent is")
            .replace("than B", "than the parent").replace("than A", "than this record"))


def submission_readme(ctx):
    """The README.md text of a result folder (ctx: what submit() gathered)."""
    s, c, name, target = ctx["summary"], ctx["comparison"], ctx["name"], ctx["target"]
    step, n, metric = s["step"], s["n"], ctx["metric"]
    out = [f"# {name}: {metric} {target} in {step} steps (n={n})", "", ctx["description"], "",
           *([f"**{NOT_LEADERBOARD.capitalize()}**: these logs trained on {ctx['task']}; the claim "
              f"below is judged against {target} on that task.", ""] if ctx["task"] else []),
           f"| # | Steps to {target} | Evidence | Description | Date | Log | Contributors |",
           "|---|---|---|---|---|---|---|", ctx["row"], "",
           "## Method and difference from the parent record", "",
           f"- Parent record: {ctx['baseline_label']}."]
    hp = ctx["logs"][0]["hyperparameters"]
    for key in ("rule", "optimizer"):  # ours: rule (older logs: optimizer)
        if key in hp:
            out.append(f"- Orthogonalization rule (the logs' `{key}:` line): `{hp[key]}`.")
    if not hp:
        out.append("- Hyperparameters: these logs have no hyperparameter lines (upstream format); "
                   "they are in the script.")
    elif not ctx["baseline_hp"]:
        out.append("- Hyperparameters: the parent's log has no hyperparameter lines (output only), "
                   "so they cannot be compared here; the configuration table below lists ours.")
    elif not ctx["hp_diff"]:
        out.append(f"- Hyperparameters: identical to the parent's ({', '.join(ctx['skip'])} aside).")
    else:
        out.append("- Hyperparameters that differ from the parent's:")
        out += [f"  - `{k}`: {a if a is not None else '(absent)'} (parent) -> "
                f"{b if b is not None else '(absent)'}" for k, a, b in ctx["hp_diff"]]
    if not ctx["baseline_code"].strip():
        out.append("- Code: not compared (the parent's log holds no code part).")
    elif ctx["baseline_code"] == ctx["logs"][0]["code"]:
        out.append("- Code: identical to the parent's code part.")
    else:
        out.append(f"- Code: differs from the parent's code part ({ctx['code_added']} lines added, "
                   f"{ctx['code_removed']} removed; `python tools/records.py diff` shows the "
                   "unified diff).")
    rows = s["per_step"]
    i = s["steps"].index(step)
    near = rows[max(0, i - 2):i + 3]
    out += ["", "## Result", "",
            f"Claimed on `{metric}` (target {target}): step **{step}**, mean {s['mean']:.6f} over {n} "
            f"complete trials, margin ({target} - mean) * sqrt(n) = {s['margin']:.5f} >= "
            f"{PASS_MARGIN}: PASS{f' on that task ({NOT_LEADERBOARD})' if ctx['task'] else ''}. The benchmark's rule: n runs pass at step S when (target - "
            f"mean_S) * sqrt(n) >= {PASS_MARGIN}, and the claim is the earliest validated step, "
            "common to all runs, that passes.", "",
            *[f"Note: the {note}." for note in ctx["stops"]], *([""] if ctx["stops"] else []),
            "| step | mean | std | margin | |", "|---|---|---|---|---|"]
    for row in near:
        label = f"**{row['step']}** (claimed)" if row["step"] == step else str(row["step"])
        out.append(f"| {label} | {row['mean']:.6f} | {row['std']:.5f} | {row['margin']:.5f} | "
                   f"{'PASS' if passes(row['margin']) else 'fail'} |")
    steps = [row["step"] for row in near]
    out += ["", "## Per seed", "",
            "| seed | log | " + " | ".join(f"**{st}**" if st == step else str(st) for st in steps)
            + " |", "|---|---|" + "---|" * len(steps)]
    per_file = {}
    for r in ctx["counted"]:
        per_file[r["source"]] = per_file.get(r["source"], 0) + 1
    for r in ctx["counted"]:
        base = os.path.basename(r["source"])
        where = f"[{base}]({link(base)})" + (f" trial {r['trial']}" if per_file[r["source"]] > 1 else "")
        out.append(f"| {r['seed'] if r['seed'] is not None else '?'} | {where} | "
                   + " | ".join(f"{loss_at(r, st):.5f}" for st in steps) + " |")
    out.append("| **mean** | | " + " | ".join(f"{row['mean']:.6f}" for row in near) + " |")
    out.append("| **std** | | " + " | ".join(f"{row['std']:.5f}" for row in near) + " |")
    left_out = ([f"- incomplete (not counted): {x['source']} trial {x['trial']} "
                 f"{seed_text(x['seed'])}, last step {x['last_step']}/{x['total_steps']}: {x['reason']}"
                 for x in s["incomplete"]]
                + [f"- copy (counted once): {x['source']} trial {x['trial']} repeats {x['duplicate_of']}"
                   if x.get("copy") else
                   f"- duplicate seed (counted once): {x['source']} trial "
                   f"{x['trial']} seed {x['seed']} repeats {x['duplicate_of']}" for x in s["duplicates"]]
                + [f"- {bad_line_kind(x)} (ignored): {x['source']} line {x['line']}: "
                   f"`{x['text']}` ({x['reason']})" for x in s["bad_lines"]])
    out += ["", "Left out: " + ("none: every trial in the logs is complete, no seed repeats, no "
                                "line is cut." if not left_out else ""), *left_out]
    pc = s["pass_chance"]
    out += ["", "## How many seeds to pay for", "",
            f"Chance that a new set of {pc['rows'][0]['n'] if pc['rows'] else n} trials passes, "
            f"and trials needed for a {int(100 * pc['probability'])}% chance "
            f"({pc['note']}).", "",
            "| step | mean | std | P(pass), mu exact | P(pass), mu estimated | n for 90%, mu exact "
            "| n for 90%, mu estimated |", "|---|---|---|---|---|---|---|"]
    for row in pc["rows"]:
        known = row["p_exact"] is not None
        out.append(f"| {row['step']} | {row['mean']:.6f} | {row['std']:.5f} | "
                   f"{percent(row['p_exact'])} | {percent(row['p_estimated'])} | "
                   f"{needed(row['n90_exact'], row['reachable']) if known else 'n/a'} | "
                   f"{needed(row['n90_estimated'], row['reachable']) if known else 'n/a'} |")
    out += ["", "## Comparison with the parent record", ""]
    if ctx["unlike"]:
        out.append(f"Not compared: {ctx['unlike']}.")
    else:
        out += [
            "The benchmark's pairwise rule: each record at its own record step, z = ((mean_parent - "
            "mean_this) + (steps_parent - steps_this) / 100 * 0.0045) / sqrt(1/n_this + "
            "1/n_parent); this record is significantly better when z >= 0.004, the parent when "
            "-z >= 0.004.", "",
            "| | n | step | mean |", "|---|---|---|---|",
            f"| this record | {c['n_a']} | {c['steps_a']} | {c['mean_a']:.6f} |",
            f"| parent | {c['n_b']} | {c['steps_b']}{'' if c['passes_b'] else ' (does not pass)'} "
            f"| {c['mean_b']:.6f} |", "",
            f"z = {c['z']:+.5f}: {verdict_vs_parent(c)}."]
    out += ["", "## Configuration", ""]
    config = config_of(ctx["logs"][0], ctx["skip"])
    if config:
        out += ["| hyperparameter | value |", "|---|---|"]
        out += [f"| {k} | {cell(v)} |" for k, v in config.items()]
        out += ["", f"(Not listed, as they may vary between runs: {', '.join(ctx['skip'])}; "
                "seeds are in the per-seed table.)"]
    else:
        out.append("No hyperparameter lines in the logs: the configuration is in the script.")
    out += ["", "## Hardware", ""]
    out += [f"- `{h}`" for h in ctx["hardware"]] or ["- not stated in the logs"]
    commands, notes = ctx["reproduce"]
    out += ["", "## Reproduce", "", "```bash", *commands, "```", ""]
    out += [f"- {note}" for note in notes]
    out += ["", "## Files", ""]
    out += [f"- [{f}]({link(f)})" for f in ctx["log_names"]]
    out += [f"- [train_gpt_simple_{name}.py](train_gpt_simple_{name}.py): the code part of "
            f"{ctx['log_names'][0]} (the script that ran)",
            "- [figure.png](figure.png): mean val loss, whole run; "
            "[zoomed_figure.png](zoomed_figure.png): near the target",
            "", "Written by `python tools/records.py submit`.", ""]
    return "\n".join(out)


def submit(record_dir, name, baseline=None, out=None, target=None, metric="val_loss",
           description=None, contributors=None, date=None):
    """Write an upstream-style result folder for the record in record_dir and return
    dict(out, files, row, summary, comparison). The parent record is `baseline` (a log or a
    folder), by default the published record of the logs' preset (tools/parents.py). Refuses
    (RecordsError) when the logs do not share one configuration (hyperparameter lines; seed,
    trials, data_dir and the trainer's PER_RUN names aside) and code part, when they hold no code,
    when no step passes, or when `out` exists and is not empty (never overwrites). The folder is
    built beside `out` and renamed into place, so a failure leaves nothing behind."""
    metric = "val_loss" if metric is None else metric
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise RecordsError(f"--name must be a plain name (letters, digits, _ . -), got {name!r}")
    if date is None:
        date = datetime.datetime.now(datetime.timezone.utc).date()
    elif isinstance(date, str):
        try:
            date = datetime.date.fromisoformat(date)
        except ValueError:
            raise RecordsError(f"--date must be YYYY-MM-DD, got {date!r}") from None
    out = os.path.abspath(out or os.path.join(RESULTS_DIR, f"{date:%Y%m%d}_{name}"))
    if os.path.exists(out) and not os.path.isdir(out):
        raise RecordsError(f"{out} exists and is not a directory: choose another --out")
    if os.path.exists(out) and os.listdir(out):
        raise RecordsError(f"{out} already exists and is not empty: choose another --name or --out "
                           "(a result folder is never overwritten)")
    logs = read_record(record_dir, metric)
    problems = inconsistencies(logs)
    if problems:
        raise RecordsError(f"{record_dir}: the logs do not share one configuration and code: "
                           + "; ".join(problems))
    if not logs[0]["code"].strip():
        raise RecordsError(f"{logs[0]['path']} holds no code part (nothing before its first '=' "
                           "line): a submission must include the code that ran")
    target, _ = resolve_target(logs, target)
    runs = [t for log in logs for t in log["trials"]]
    s = summarize(runs, target)
    relative_sources(s, record_dir)
    stops = stop_notes(logs)
    if s["step"] is None:
        raise RecordsError(f"{record_dir}: no validated step passes (last common step "
                           f"{s['final_step']}: mean {s['mean']:.6f}, margin {s['margin']:.5f} < "
                           f"{PASS_MARGIN}, n={s['n']}): nothing to submit"
                           + "".join(f"; the {note}" for note in stops))
    by_preset = baseline is None
    if by_preset:
        baseline, preset = default_parent(logs, "give --baseline")
    baseline_logs = read_record(baseline, metric)
    task, unlike = task_of(logs), unlike_tasks(logs, baseline_logs)
    comparison = None if unlike else compare(runs, [t for log in baseline_logs for t in log["trials"]], target)
    hp, baseline_hp = logs[0]["hyperparameters"], baseline_logs[0]["hyperparameters"]
    skip = run_specific(baseline_logs[0], logs[0])
    hp_diff = (config_difference(config_of(baseline_logs[0], skip), config_of(logs[0], skip))
               if baseline_hp else [])
    # unified_diff, not ndiff: ndiff's intraline matching is quadratic on a 1000-line trainer
    code_lines = list(difflib.unified_diff(baseline_logs[0]["code"].splitlines(),
                                           logs[0]["code"].splitlines(), lineterm="", n=0)
                      )[2:] if baseline_logs[0]["code"].strip() else []
    if description is None:  # factual: what the logs say about the difference
        if hp_diff:
            description = "Differs from the parent in " + ", ".join(f"{k}={b}" for k, a, b in hp_diff)
        elif code_lines and baseline_logs[0]["code"] != logs[0]["code"]:
            description = "Code changes relative to the parent record"
        else:
            description = f"{name} (optimizer {hp['optimizer']})" if "optimizer" in hp else name
    log_names = [os.path.basename(log["path"]) for log in logs]
    folder = os.path.basename(out)
    row = (f"| ? | {s['step']} | {s['mean']:.4f} (n={s['n']})✓ | "
           f"{cell(description + claim_terms(metric, target) + (f' ({NOT_LEADERBOARD})' if task else ''))} | "
           f"{date:%Y-%m-%d} | "
           f"[log]({link(f'/{UPSTREAM_RESULTS}/{folder}/{log_names[0]}')}) | "
           f"{cell(contributors or '?')} |")
    published = published_label(baseline)
    if published and by_preset:
        published += f", the default parent of preset {preset}{parent_note(preset)}" if preset in PARENTS else ""
    hardware = []
    for log in logs:
        for line in log["environment"]:
            if re.match(r"(python |device |Running |torch )", line.strip()) and line.strip() not in hardware:
                hardware.append(line.strip())
    counted = screen(runs)["counted"]
    ctx = dict(summary=s, comparison=comparison, unlike=unlike, task=task, name=name, target=target, metric=metric,
               description=description,
               row=row, logs=logs, log_names=log_names, counted=counted, hardware=hardware,
               baseline_label=published or f"`{baseline}`",
               baseline_hp=baseline_hp, baseline_code=baseline_logs[0]["code"], hp_diff=hp_diff,
               skip=skip,
               code_added=sum(line.startswith("+") for line in code_lines),
               code_removed=sum(line.startswith("-") for line in code_lines),
               reproduce=reproduce(logs, counted, name), stops=stops)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{folder}-")
    except OSError as e:
        raise RecordsError(f"cannot create {out}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o755)
        for log, base in zip(logs, log_names):
            shutil.copyfile(log["path"], os.path.join(tmp, base))
            os.chmod(os.path.join(tmp, base), 0o644)
        script = f"train_gpt_simple_{name}.py"
        write_public(os.path.join(tmp, script), logs[0]["code"])
        write_public(os.path.join(tmp, "README.md"), submission_readme(ctx))
        parent_label = "parent (published)" if published else "parent"
        plot_submission({name: runs, parent_label: [t for log in baseline_logs for t in log["trials"]]},
                        os.path.join(tmp, "figure.png"), os.path.join(tmp, "zoomed_figure.png"), target,
                        metric=metric)
        for png in ("figure.png", "zoomed_figure.png"):
            os.chmod(os.path.join(tmp, png), 0o644)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above); fails rather than overwrite if it filled since
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # e.g. `out` filled meanwhile, or the disk is full
            raise RecordsError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    files = sorted(os.listdir(out))
    return dict(out=out, files=files, row=row, summary=s, comparison=comparison, unlike=unlike, task=task, metric=metric,
                target=target, stops=stops)


def print_submission(r):
    """What `submit` prints: the folder written, the claim, the test against the parent, and the
    leaderboard row."""
    s = r["summary"]
    print(f"wrote {r['out']}: {', '.join(r['files'])}")
    print(f"record: step {s['step']}  mean {s['mean']:.6f}  margin {s['margin']:.5f} "
          f">= {PASS_MARGIN}  (n={s['n']}){task_mark(r)}")
    for note in r["stops"]:
        print(f"note: the {note}")
    if r["unlike"]:
        print(f"pairwise test against the parent: not possible: {r['unlike']}")
    else:
        print(f"pairwise test against the parent: z {r['comparison']['z']:+.5f}: "
              f"{verdict_vs_parent(r['comparison'])}")
    print(f"leaderboard row (steps to {r['target']:g} on {r['metric']}; also in the README):")
    print(r["row"])
