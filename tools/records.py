"""Step counts, significance tests, comparisons, plots and submissions from speedrun logs (ours and
upstream's).

Usage (from the repository root or anywhere else):

    python tools/records.py summary PATH... [--target T] [--metric val_loss] [--new-trials N] [--json]
    python tools/records.py summary RECORD_DIR --write     # also (re)write RECORD_DIR/summary.json
    python tools/records.py compare A B [--png FILE] [--band minmax|std] [--target] [--metric] [--json]
    python tools/records.py plot PATH... --png FILE [--label NAME ...] [--band minmax|std]
    python tools/records.py diff A B [--target] [--metric] [--json]
    python tools/records.py submit RECORD_DIR --name NAME [--baseline LOG_OR_DIR] [--out DIR]
                                   [--description TEXT] [--contributors TEXT] [--date YYYY-MM-DD]

A PATH is a log file or a directory (every *.txt under it, subfolders included, sorted; files
without validation lines are skipped with one notice); `summary` pools all its PATHs into one
record (`--pool` even across configurations), `compare`, `plot` and `diff` take one record per PATH.
`tools/check_leaderboard.py` runs `summary` on every result of upstream's Track-3 leaderboard.
`diff` shows what differs between two logs or records: hyperparameters, code (unified diff), val
losses at common steps, and the pairwise test. `submit` writes an upstream-style result folder
(default records/track_3_optimization/results/<YYYYMMDD>_<NAME>/): the logs, the script they ran,
a README (claim, per-seed table, comparison with the parent record, hardware, command) and two
figures; it prints the leaderboard row. The parent record (--baseline) defaults to the published
one, records/published_aurora_3175/track3_aurora_3175_n20.txt.

Log format. A log is the training script's source (the "code part"), a line of '=' characters
(>= 50; ours have 100), header lines (ours: environment, then one `name: value` line per
hyperparameter), another '=' line, then output. Only lines after the FIRST '=' line are read as
output, so `step:` text inside the code never counts (a file without any '=' line is read whole).
Validation lines look like `step:{s}/{total} val_loss:{x} train_time:{t}s step_avg:{ms}ms [more
key:value fields]`; `step:` lines without the chosen metric (training progress) are skipped. A file
may hold several trials: a trial starts after a `trial:{i} seed:{s}` line (s: an integer; older
logs of ours label unseeded trials `record{k}`, kept as a string), or, in logs without trial
lines, when the step does not increase.

What counts (so that a summary cannot lie):
- a trial counts only when complete: a validation line at its final step (`step:N/N`), or a clean
  end at its last validation (ours: the trainer's `final val losses:` line; upstream's: no cut line
  and no training step after it, at the step where its siblings' logs end, since some records stop
  before `train_steps` on purpose). Incomplete trials (killed, crashed, still running, cut
  mid-line, stopped before their siblings; an `interrupted:`/`failed:` line says why) are listed
  apart, never pooled;
- a val line counts only when whole: step, metric, train_time ending in s and step_avg ending in
  ms, each well-formed, every field named once. A cut or garbled line (full disk, kill mid-write,
  a field repeated) is ignored and listed in `bad_lines`;
- a file counts once: given twice (`summary A A`, a folder and a file in it) it is read once, and
  a copy (the same content; trials with at least two validation lines) is listed in `duplicates`
  as a copy of the original's trials, with a note;
- a seed counts once: a later complete trial with the seed of an earlier one (across files too) is
  listed in `duplicates` and left out; an upstream trial whose validation lines (with their clock)
  repeat another's is the same run logged twice, listed there as a copy;
- logs of several configurations (code part without comments, strings and seed lines, or
  hyperparameter lines) are summarized per group; the claim is the group that passes earliest;
- the target: --target, else the `val_loss_target:` header line of the logs (our trainer writes
  it; logs of one record that state different targets are refused), else 3.28. `compare` and
  `diff` take A's and warn when A and B were run for different targets;
- the metric: `val_loss`, unless the README.md beside the logs names another field of their val
  lines more often (a claim on a readout such as `val_ema_loss`); `--metric` chooses.

The benchmark's rules: n runs pass at step S when
`(target - mean_S) * sqrt(n) >= 0.004`; the record is the earliest validated step, common to all
runs, that passes. Pairwise test: see compare(). `summary` and `submit` also estimate the chance
that a new set of n trials passes near the record step (see pass_chance()).

In Python: read_log, parse_log, load_runs, screen, summarize, compare, pass_chance, write_summary,
plot_records, diff_records, submit. train_gpt.py rewrites summary.json after every run (write_summary,
through `summary RECORD_DIR --write`): this module is the only implementation of these statistics. Errors (missing path, no logs, unreadable file, no
val lines, no complete trial, no common step, a submission that does not hold together) raise
RecordsError; the command line prints `error: ...` on stderr and exits with status 2.
"""
import argparse
import ast
import datetime
import difflib
import functools
import glob
import hashlib
import io
import json
import math
import operator
import os
import re
import shlex
import shutil
import sys
import tempfile
import textwrap
import tokenize

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The parent record by default: an in-repo copy of the published record's output (never a path
# outside the repository, so that every checkout gives the same answer).
PUBLISHED = os.path.join(ROOT, "records", "published_aurora_3175", "track3_aurora_3175_n20.txt")
PUBLISHED_LABEL = ("the published record, modded-nanoGPT optimization track #17 (Tilde Research's "
                   "Aurora, 3175 steps, 20 seeds, 8xH100)")
UPSTREAM_RESULTS = "records/track_3_optimization/results"  # where results live upstream
RESULTS_DIR = os.path.join(ROOT, *UPSTREAM_RESULTS.split("/"))  # the same path here

SEPARATOR = re.compile(r"^={50,}\s*$")
STEP_LINE = re.compile(r"^step:(\d+)/(\d+)$")
SEED_LINE = re.compile(r"^trial:(\d+)\s+seed:(\S+)")
STOP_LINE = re.compile(r"^(interrupted|failed|error):\s")
END_LINE = re.compile(r"^final val losses:")  # our trainer's last line: every trial ended as planned
STOP_STEP = re.compile(r"\bat step (\d+)")
KEY = re.compile(r"^[A-Za-z_]\w*$", re.ASCII)  # a field name on a step line
DERIVED = ("seconds",)  # a field read_step_line adds itself
HYPERPARAMETER = re.compile(r"^([A-Za-z_]\w*): (.*)$")
NUMBER = re.compile(r"^[-+]?((\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|nan|inf)$", re.IGNORECASE)
SECONDS = re.compile(r"^(\d+(?:\.\d+)?)(m?)s$")  # ours write seconds; some upstream logs ms
MILLISECONDS = re.compile(r"^(\d+(\.\d+)?|nan|inf)ms$")
# Hyperparameter lines that vary between the runs of one record (as train_gpt.py's --append check);
# a log whose trainer declares PER_RUN adds those names (see run_specific()).
RUN_SPECIFIC = ("seed", "trials", "data_dir")
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


class RecordsError(Exception):
    """A log or record that cannot be read or summarized; the message says which and why."""


class NotALog(RecordsError):
    """A file without validation lines of the metric (metadata, a manifest, stderr): a directory's
    such files are skipped with a notice, a file named on its own is an error."""


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


def parse_seed(token):
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    return None if token == "None" else token  # e.g. record0: unseeded, the record's stream


def header_value(text):
    """A hyperparameter line's value as Python: our trainer writes JSON (`"aurora"`, `true`,
    `[0.8, 0.95]`, `null`), older logs Python literals (`aurora`, `True`, `(0.8, 0.95)`); anything
    else stays the text."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def read_step_line(line, metric):
    """A line starting with 'step:': ('val', fields) for a whole line with the metric, ('other',
    fields) for a whole line without it (training progress, another metric), or ('cut', None).
    Whole: `step:S/T` then key:value tokens only, a well-formed train_time (s or ms) and step_avg
    (ms), and a well-formed metric value if present. A line cut mid-write (`step:3175/3200
    val_loss:3.27`) fails this, so it can never be read as a loss."""
    tokens = line.split()
    m = STEP_LINE.match(tokens[0]) if tokens else None
    if not m:
        return "cut", None
    fields = dict(step=int(m.group(1)), total=int(m.group(2)))
    for tok in tokens[1:]:
        key, sep, value = tok.partition(":")
        # a repeated field (`... step:1/2`, two val_loss) or a garbage key: not a line we can trust
        if not (KEY.match(key) and sep and value) or key in fields or key in DERIVED:
            return "cut", None
        fields[key] = value
    time = SECONDS.match(fields.get("train_time", ""))
    if not time or not MILLISECONDS.match(fields.get("step_avg", "")):
        return "cut", None
    fields["seconds"] = float(time.group(1)) / (1000 if time.group(2) else 1)
    if metric not in fields:
        return "other", fields
    if not NUMBER.match(fields[metric]):
        return "cut", None
    return "val", fields


def new_trial(trials, path, seed):
    trials.append(dict(source=str(path), trial=len(trials), seed=seed, total_steps=None, steps=[],
                       losses=[], train_time=[], last_step=None, stop=None, complete=False,
                       announced=False, finished=False, cut_end=False, end=None, bad_lines=[]))
    return trials[-1]


def read_log(path, metric="val_loss"):
    """Everything a log says: code (the code part, text before the first '=' line), header (lines
    between the first two '=' lines), hyperparameters (its `name: value` lines, as strings),
    environment (its other lines), trials (see parse_log; incomplete ones included), bad_lines
    (cut step lines: source, line number, text) and stops (`interrupted:`/`failed:` lines)."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            raw = f.read().splitlines(keepends=True)
    except OSError as e:
        raise RecordsError(f"cannot read {path}: {e.strerror or e}") from None
    lines = [line.rstrip("\r\n") for line in raw]
    seps = [i for i, line in enumerate(lines) if SEPARATOR.match(line)]
    start = seps[0] + 1 if seps else 0
    header = lines[start:seps[1]] if len(seps) > 1 else []
    hyper = {m.group(1): m.group(2).strip() for m in map(HYPERPARAMETER.match, header) if m}
    digest = hashlib.sha256("".join(raw).encode("utf-8", "surrogatepass")).hexdigest()
    log = dict(path=str(path), digest=digest, code="".join(raw[:seps[0]]) if seps else "", header=header,
               hyperparameters=hyper, environment=[h for h in header if not HYPERPARAMETER.match(h)],
               trials=[], bad_lines=[], stops=[], metrics=set())
    trials, pending_bad, other_metric, seed_lines = log["trials"], [], False, False
    for number, line in enumerate(lines[start:], start + 1):
        m = SEED_LINE.match(line)
        if m:  # our trainer announces each trial: the lines after it are that trial's
            new_trial(trials, path, parse_seed(m.group(2)))["announced"] = True
            seed_lines = True
            continue
        if STOP_LINE.match(line):  # the trainer says why it stopped (SIGTERM, a failure)
            log["stops"].append(line)
            if trials:
                trials[-1]["stop"] = line
                at = STOP_STEP.search(line)
                if at:
                    trials[-1]["last_step"] = max(trials[-1]["last_step"] or 0, int(at.group(1)))
            continue
        if END_LINE.match(line):
            for t in trials:
                t["finished"] = t["stop"] is None
            continue
        if not (line.startswith("step:") or (line and "step:".startswith(line))):
            continue
        kind, fields = read_step_line(line, metric)
        if kind == "cut":
            bad = dict(source=str(path), line=number, text=line[:200])
            log["bad_lines"].append(bad)
            (trials[-1]["bad_lines"] if trials else pending_bad).append(bad)
            if trials:  # until a later whole line: this trial's log may be cut mid-line here
                trials[-1]["cut_end"] = True
            continue
        log["metrics"].update(k for k in fields if k.startswith("val"))
        step, current = fields["step"], trials[-1] if trials else None
        if kind == "other":
            other_metric = other_metric or any(k.startswith("val") for k in fields)
            # progress of the current trial (not of one already finished: the next trial of a
            # log without trial lines only shows itself at its first val line)
            if current is not None and not current["complete"]:
                current["total_steps"] = current["total_steps"] or fields["total"]
                current["last_step"] = max(current["last_step"] or 0, step)
            continue
        # The first val line of a trial is not always step 0, so a restart is seen as a step that
        # does not increase (or an explicit trial line).
        if current is None or (current["steps"] and step <= current["steps"][-1]):
            current = new_trial(trials, path, None)
        if current["total_steps"] is None:
            current["total_steps"] = fields["total"]
        current["steps"].append(step)
        current["losses"].append(to_float(fields[metric]))
        current["train_time"].append(fields["seconds"])
        current["last_step"] = max(current["last_step"] or 0, step)
        current["cut_end"] = False
        current["complete"] = current["complete"] or step == current["total_steps"]
    if trials:
        trials[0]["bad_lines"][:0] = pending_bad
    for i, t in enumerate(trials):
        if t["complete"]:
            continue
        if t["stop"]:
            t["end"] = t["stop"]
        elif i + 1 < len(trials):
            t["end"] = "the next trial started before a validation at the final step"
        else:
            t["end"] = "the log ends here: killed, crashed or still running"
    # No val line of the metric at all: not a training log, or another metric was meant. A log
    # whose trials started but have not validated yet (a run just started) is not an error.
    if not any(t["steps"] for t in trials) and (not seed_lines or other_metric):
        bad = log["bad_lines"]
        notes = [f"{len(bad)} cut line(s) ignored, e.g. line {bad[0]['line']}: {bad[0]['text']!r}"
                 ] if bad else []
        notes += [f"the log says {log['stops'][-1]!r}"] if log["stops"] else []
        raise NotALog(f"{path}: no validation lines with '{metric}:' (is it a training log? "
                      "another field can be chosen with --metric)" + "".join(f"; {n}" for n in notes))
    return log


def parse_log(path, metric="val_loss"):
    """The trials of one log file, in order: a list of dicts with source, trial (index in the
    file), seed (int, `record{k}`, or None), total_steps, steps, losses (the metric), train_time
    (s), complete (a val line at the final step), finished (ours: the trainer's end line follows),
    cut_end (the log is cut mid-line after its last validation), last_step (the last step seen),
    end (why it ended, if not at its final step) and bad_lines (its cut lines). Whether a trial
    counts is screen()'s decision: an upstream run may stop before its horizon on purpose."""
    return read_log(path, metric)["trials"]


def log_files(path):
    """The log files a path stands for: itself, or every *.txt under a directory (sorted; results
    folders keep logs in subfolders, e.g. one per seed or per configuration)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "**", "*.txt"), recursive=True))
        if not files:
            raise RecordsError(f"no .txt logs found in directory {path}")
        return files
    if not os.path.exists(path):
        raise RecordsError(f"{path}: no such file or directory")
    return [path]


def readme_metric(paths, metrics):
    """(metric, note) when the README.md beside the logs names one of the other metrics on their
    val lines (`val_ema_loss` or `val_ema`) more often than val_loss: a result may claim on a
    readout logged beside the plain loss. None otherwise."""
    others = sorted(m for m in metrics if m != "val_loss")
    for path in paths:
        readme = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "README.md")
        try:
            with open(readme, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        def mentions(name):  # the field, or its name without _loss, as a whole word
            short = name[:-len("_loss")] if name.endswith("_loss") else name
            return sum(len(re.findall(rf"\b{re.escape(n)}\b", text)) for n in {name, short})
        counts = {m: mentions(m) for m in others}
        best = max(others, key=lambda m: counts[m], default=None)
        if best and counts[best] > mentions("val_loss"):
            return best, (f"metric {best}: {readme} names it {counts[best]} time(s), val_loss "
                          f"{mentions('val_loss')} (--metric val_loss for the plain loss)")
    return None


def load_record(paths, metric=None):
    """Everything under `paths` (files and directories), read for one summary: dict(runs, logs,
    skipped, metric, notes). A directory's files without validation lines (metadata, manifests,
    stderr) are skipped and listed; a file named on its own must be a log. metric None: val_loss,
    or the metric the folder's README claims on (readme_metric). Runs carry their `group` (see
    assign_groups) when the logs hold several configurations."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    files, first, given_twice = [], {}, []
    for p in paths:
        for f in log_files(p):
            real = os.path.realpath(f)
            if real in first:  # `summary A A`, or a folder and a file in it: read once
                given_twice.append(f"{f} (also {first[real]})" if f != first[real] else f)
            else:
                first[real] = f
                files.append((p, f))

    def read_all(m):
        logs, skipped = [], []
        for path, f in files:
            try:
                logs.append(read_log(f, m))
            except NotALog:
                if f == path:
                    raise
                skipped.append(os.path.relpath(f, path))
        return logs, skipped

    chosen, notes = metric or "val_loss", []
    logs, skipped = read_all(chosen)
    seen = set().union(*(log["metrics"] for log in logs))
    if metric is None and readme_metric(paths, seen):
        chosen, note = readme_metric(paths, seen)
        notes.append(note)
        logs, skipped = read_all(chosen)
    elif len(seen - {chosen}) > 0 and chosen in seen:
        notes.append(f"metric {chosen}; the val lines also carry {', '.join(sorted(seen - {chosen}))} "
                     "(--metric chooses)")
    if not logs:
        raise RecordsError(f"no log in {', '.join(paths)} has validation lines with '{chosen}:' "
                           f"(skipped: {', '.join(skipped)}; another field can be chosen with --metric)")
    if given_twice:
        notes.append(f"read once: {len(given_twice)} file(s) given more than once: "
                     + ", ".join(given_twice[:4]) + (" ..." if len(given_twice) > 4 else ""))
    notes += mark_copies(logs)
    notes += [note for p in paths if os.path.isdir(p) for note in [read_config(p)[1]] if note]
    if skipped:
        shown = ", ".join(skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4 else "")
        notes.append(f"skipped {len(skipped)} file(s) without '{chosen}:' validation lines (not "
                     f"logs): {shown}")
    notes += assign_groups(logs, paths)
    return dict(runs=[t for log in logs for t in log["trials"]], logs=logs, skipped=skipped,
                metric=chosen, notes=notes)


def mark_copies(logs):
    """A log with the same content as an earlier one (a copy of the file) holds the same trials:
    each of its trials gets `copy_of` (the original trial), so that screen() counts it once. As in
    copies(), a trial with a single validation line after step 0 is not enough to tell: different
    runs may log the same one line."""
    originals, notes = {}, []
    for log in logs:
        original = originals.setdefault(log["digest"], log)
        marked = 0
        for mine, theirs in zip(log["trials"], original["trials"]) if original is not log else ():
            if sum(step > 0 for step in mine["steps"]) >= 2:
                mine["copy_of"] = (theirs["source"], theirs["trial"])
                marked += 1
        if marked:
            notes.append(f"{log['path']} has the same content as {original['path']}: a copy, its "
                         "trials are counted once")
    return notes


def read_config(record_dir):
    """(config.json of a record folder as a dict, or None; a note when it exists but cannot be
    used). The trainer writes it and checks `--append` runs against it; the summary says when it
    is broken (a later --append would stumble on it)."""
    path = os.path.join(record_dir, "config.json")
    if not os.path.lexists(path):
        return None, None
    why = None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        config = json.loads(text) if text.strip() else None
        if config is None:
            why = "empty" if not text.strip() else "not a JSON object (null)"
        elif not isinstance(config, dict):
            why = f"not a JSON object (a {type(config).__name__})"
    except IsADirectoryError:
        why = "a directory, not a file"
    except OSError as e:
        why = f"unreadable: {e.strerror or e}"
    except ValueError as e:
        why = f"not valid JSON ({e})"
    if why:
        return None, (f"{path} is {why}: ignored here; the trainer's --append checks new runs "
                      "against it (delete it to have the logs' headers used)")
    return config, None


def logged_target(logs):
    """The val_loss_target the logs' headers state (our trainer logs it), or None when none does.
    RecordsError when logs of one record state different targets, or one is not a number."""
    found = {}
    for log in logs:
        text = log["hyperparameters"].get("val_loss_target")
        if text is None:
            continue
        value = header_value(text)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecordsError(f"{log['path']}: val_loss_target {text!r} is not a number")
        found.setdefault(float(value), []).append(log["path"])
    if len(found) > 1:
        raise RecordsError("the logs were run for different targets (their val_loss_target lines): "
                           + "; ".join(f"{t:g} in {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
                                       for t, files in found.items())
                           + ": give each record apart, or choose one with --target")
    return next(iter(found), None)


def resolve_target(logs, target=None):
    """(target, note): `target` when given, else the logs' val_loss_target, else 3.28."""
    if target is not None:
        return float(target), None
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
    used = own_a if target is None else float(target)
    if own_a == own_b:
        return used, None
    return used, (f"A and B were run for different targets: A for {target_text(own_a, logged_a)}, "
                  f"B for {target_text(own_b, logged_b)}; both are taken at {used:g} "
                  f"({'--target' if target is not None else 'A' + chr(39) + 's'}; --target chooses)")


def load_runs(paths, metric="val_loss"):
    """All trials of all logs under `paths` (files and directories, or a single path), in order."""
    runs = load_record(paths, metric)["runs"]
    if not runs:
        raise RecordsError("no logs given")
    return runs


SEEDISH = re.compile(r"seed", re.IGNORECASE)


def code_signature(code):
    """The code part as far as it sets the configuration: its tokens without comments, strings
    (log paths, messages) and lines naming a seed (upstream scripts hard-code `SEED = k` per run),
    one string per line. Not Python: its lines without `#` comments."""
    lines, line = [], []
    skip = {tokenize.COMMENT, tokenize.STRING, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                lines.append(line)
                line = []
            elif tok.type not in skip and not tokenize.tok_name[tok.type].startswith("FSTRING"):
                line.append(tok.string)
    except (tokenize.TokenError, SyntaxError):
        lines = [text.split("#")[0].split() for text in code.splitlines()]
    return tuple(" ".join(tokens) for tokens in lines
                 if tokens and not any(SEEDISH.search(t) for t in tokens))


def assign_groups(logs, paths):
    """Split logs of several configurations: the key is the code signature and the hyperparameter
    lines (run-specific ones aside). Logs without a code part (stdout captures) join the only
    configuration there is, else form their own group. Sets each trial's `group` (a label: the
    subfolder, or the first file) only when there are several; returns notes saying so."""
    keys = []
    for log in logs:
        code = code_signature(log["code"]) if log["code"].strip() else None
        config = tuple(sorted(config_of(log).items()))
        keys.append(None if code is None and not config else (code, config))
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    if len(distinct) <= 1:
        return []
    root = paths[0] if len(paths) == 1 and os.path.isdir(paths[0]) else None
    members = {}
    for log, key in zip(logs, keys):
        members.setdefault(key, []).append(log)
    where = {key: [os.path.relpath(log["path"], root) if root else log["path"] for log in group]
             for key, group in members.items()}
    folders = {key: {os.path.dirname(w) for w in files} for key, files in where.items()}
    labels = {}
    for key, group in members.items():
        folder = next(iter(folders[key])) if len(folders[key]) == 1 else ""
        if folder and not any(folder in f for k, f in folders.items() if k != key):
            labels[key] = folder + "/"  # e.g. one subfolder per configuration
        else:
            files = where[key]
            labels[key] = files[0] + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
        labels[key] += " [no code part]" if key is None else ""
        for log in group:
            for t in log["trials"]:
                t["group"] = labels[key]
    first = distinct[0]
    notes = [f"the logs hold {len(members)} configurations (code or hyperparameters differ): each "
             "is summarized apart"]
    for key in members:
        if key not in (None, first):
            code_diff = [line for line in key[0] or () if line not in set(first[0] or ())][:1]
            conf_diff = [f"{k}: {v}" for k, v in key[1] if (k, v) not in first[1]][:2]
            notes.append(f"group {labels[key]} differs from {labels[first]} in: "
                         + "; ".join(code_diff + conf_diff or ["line order"]))
    return notes


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

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
    its last validation, the step where its siblings' logs end too."""
    last = run["steps"][-1] if run["steps"] else None
    clean = last is not None and run["stop"] is None and not run.get("cut_end") and \
        (run["last_step"] or 0) <= last
    if is_complete(run) or (clean and (run.get("finished") if run.get("announced") else last == horizon)):
        return None
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
    target = DEFAULT_TARGET if target is None else target
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
    notes = record["notes"] + ([note] if note else [])
    if pool:
        for r in record["runs"]:
            r["group"] = None
        notes = [n for n in notes if not n.startswith(("the logs hold", "group "))]
    summary = summarize(record["runs"], target, new_trials)
    summary.update(metric=record["metric"], notes=notes)
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


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def curves(records, target, band):
    """Per record: (label, summary, steps, mean, lo, hi) of its counted runs."""
    if band not in ("minmax", "std"):
        raise RecordsError(f"band must be 'minmax' or 'std', not {band!r}")
    if not records:
        raise RecordsError("nothing to plot")
    out = []
    for label, runs in records.items():
        s = summarize(runs, target)
        counted = screen(claimed(runs, target))["counted"]
        steps = np.array(s["steps"])
        values = np.array([[loss_at(r, st) for st in steps] for r in counted])
        mean = values.mean(0)
        if band == "minmax":
            lo, hi = values.min(0), values.max(0)
        else:
            std = values.std(0, ddof=1) if len(counted) > 1 else np.zeros_like(mean)
            lo, hi = mean - std, mean + std
        out.append((label, s, steps, mean, lo, hi))
    return out


def draw_full(ax, data, target, band):
    bottom, top = target - 0.05, target + 0.5
    for label, s, steps, mean, lo, hi in data:
        record = f"step {s['step']}" if s["step"] is not None else "no record"
        line, = ax.plot(steps, mean, label=f"{label} (n={s['n']}, {record})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        top = max(top, min(4.5, float(np.nanmax(mean))))
        bottom = min(bottom, float(np.nanmin(mean)) - 0.01)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.set_title(f"mean val loss ({'min-max' if band == 'minmax' else '± std'} band)")
    ax.set_ylim(bottom, top)  # the first steps (loss ~11) would flatten everything else
    ax.legend(fontsize=8)


def draw_zoom(ax, data, target, legend=False):
    last, near = 0, []
    for label, s, steps, mean, lo, hi in data:
        record = f"step {s['step']}" if s["step"] is not None else "no record"
        line, = ax.plot(steps, mean, label=f"{label} (n={s['n']}, {record})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        if s["step"] is not None:
            ax.axvline(s["step"], color=line.get_color(), linestyle=":", linewidth=1)
        last = max(last, int(steps[-1]))
        # the zoom starts where the first record comes within the panel's y range of the target
        near += [int(st) for st, m in zip(steps, mean) if m <= target + 0.06][:1]
    ax.axhline(target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    start = min(near) if near else 0.7 * last
    ax.set_xlim(start - 0.02 * (last - start), last + 0.02 * (last - start) + 1)
    ax.set_ylim(target - 0.02, target + 0.06)
    ax.set_title(f"near the target {target} (dotted: record step)")
    if legend:
        ax.set_ylabel("val loss")
        ax.legend(fontsize=8)


def save(fig, png_path, plt):
    fig.tight_layout()
    try:
        fig.savefig(png_path, dpi=120)
    except OSError as e:
        raise RecordsError(f"cannot write {png_path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    return plt


def plot_records(records, png_path, target=DEFAULT_TARGET, band="minmax"):
    """Mean val-loss curve of each record with a min-max or mean ± std band: the whole run (y axis
    cut at 4.5), and a panel zoomed near the target (target - 0.02 .. target + 0.06, from the first
    step where a mean curve enters that range). `records` maps a label to its runs (counted runs
    only are drawn: see screen())."""
    data = curves(records, target, band)
    plt = pyplot()
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    draw_full(full, data, target, band)
    draw_zoom(zoom, data, target)
    save(fig, png_path, plt)


def plot_submission(records, full_png, zoom_png, target=DEFAULT_TARGET, band="minmax"):
    """The two figures of an upstream result folder: whole curves, and zoomed near the target."""
    data = curves(records, target, band)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_full(ax, data, target, band)
    save(fig, full_png, plt)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_zoom(ax, data, target, legend=True)
    save(fig, zoom_png, plt)


# ------------------------------------------------------------------------------------------------
# diff: what differs between two logs or records
# ------------------------------------------------------------------------------------------------

def read_record(path, metric="val_loss"):
    """The logs under a path (a log file or a directory), read whole; at least one."""
    return load_record(path, metric)["logs"]


def config_of(log, skip=None):
    """The hyperparameters that must agree between the logs of one record."""
    skip = run_specific(log) if skip is None else skip
    return {k: v for k, v in log["hyperparameters"].items() if k not in skip}


def config_difference(hp_a, hp_b, keys=None):
    """[(name, value in a, value in b)] for the names whose values differ (None: absent)."""
    keys = sorted(set(hp_a) | set(hp_b)) if keys is None else keys
    return [(k, hp_a.get(k), hp_b.get(k)) for k in keys if hp_a.get(k) != hp_b.get(k)]


def inconsistencies(logs):
    """Why the logs of one record do not share a configuration and code part (empty: they do)."""
    first, problems = logs[0], []
    name = os.path.basename(first["path"])
    for log in logs[1:]:
        other = os.path.basename(log["path"])
        skip = run_specific(first, log)
        diff = config_difference(config_of(first, skip), config_of(log, skip))
        if diff:
            problems.append(f"{other} differs from {name} in " + ", ".join(
                f"{k} ({a if a is not None else 'absent'} vs {b if b is not None else 'absent'})"
                for k, a, b in diff))
        if log["code"] != first["code"]:
            problems.append(f"the code part of {other} differs from {name}'s "
                            f"(python tools/records.py diff {first['path']} {log['path']} shows how)")
    return problems


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


def diff_records(a, b, target=None, metric="val_loss"):
    """What differs between A and B (log files or record folders): hyperparameters (header
    `name: value` lines of each side's first log; seed, trials and data_dir apart as run-specific),
    a unified diff of the code parts, the mean val loss at common steps side by side, and the
    pairwise test (compare()) when either side has more than one trial."""
    logs_a, logs_b = read_record(a, metric), read_record(b, metric)
    target, target_warning = pair_targets(logs_a, logs_b, target)
    runs_a = [t for log in logs_a for t in log["trials"]]
    runs_b = [t for log in logs_b for t in log["trials"]]
    hp_a, hp_b = logs_a[0]["hyperparameters"], logs_b[0]["hyperparameters"]
    skip = run_specific(logs_a[0], logs_b[0])
    config = [k for k in sorted(set(hp_a) | set(hp_b)) if k not in skip]
    code_a, code_b = logs_a[0]["code"], logs_b[0]["code"]
    result = dict(a=os.fspath(a), b=os.fspath(b), metric=metric, target=target,
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
    if max(len(runs_a), len(runs_b)) > 1:  # a folder or a multi-trial log: the benchmark's test
        try:
            result["compare"] = compare(runs_a, runs_b, target)
        except RecordsError as e:
            result["compare_error"] = str(e)
    return result


def print_diff(d):
    if d.get("target_warning"):
        print(f"warning: {d['target_warning']}")
    for side in ("a", "b"):
        note = f"  ({d['note_' + side]})" if d["note_" + side] else ""
        print(f"{side.upper()}: {d[side]}  ({d['logs_' + side]} log(s), n={d['n_' + side]}){note}")
        for problem in d["inconsistent_" + side]:
            print(f"  warning: {side.upper()}'s logs do not share one configuration: {problem}")
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


# ------------------------------------------------------------------------------------------------
# submit: an upstream-style result folder
# ------------------------------------------------------------------------------------------------

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}


def literal(node):
    """The value of a constant expression in a script (literals, `1 / 320`, `dict(a=1)`), without
    running it; ValueError for anything else."""
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        x, y = literal(node.left), literal(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
            raise ValueError("not arithmetic")
        try:
            return BINARY[type(node.op)](x, y)
        except ArithmeticError:
            raise ValueError("bad arithmetic") from None
    if isinstance(node, (ast.Call, ast.Dict)):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id == "dict") or node.args:
                raise ValueError("not dict(...)")
            items = [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
        else:
            items = [(literal(k), v) for k, v in zip(node.keys, node.values) if k is not None]
        out = {}
        for key, value in items:
            try:
                out[key] = literal(value)
            except ValueError:
                pass  # e.g. a path built at run time: not needed for flags
        return out
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("not a literal") from None


def field_default(node):
    """A dataclass field's default: `x = 1`, `x = hparam(1, "help")`, `x = field(default=1)`."""
    if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id == "dict"):
        default = next((kw.value for kw in node.keywords if kw.arg == "default"), None)
        if default is None and node.args:
            default = node.args[0]
        if default is None:
            raise ValueError("no default")
        return literal(default)
    return literal(node)


def script_facts(code):
    """What a logged trainer like ours declares, read from its code part without running it:
    defaults (the `class Hyperparameters` field defaults), presets (the `PRESETS` dict), per_run
    (its `PER_RUN` tuple: fields that may differ between the logs of one record), and how its
    flags look (generated: one flag per field, bools as --x/--no-x). Empty for an upstream script
    or code this reader does not understand."""
    facts = dict(defaults={}, presets={}, per_run=(), generated="dataclasses.fields(Hyperparameters)" in code,
                 boolean_optional="BooleanOptionalAction" in code)
    # our code part is train_gpt.py and aurora.py, each after a `#### <file> ####` line
    for section in re.split(r"(?m)^#### \S+ ####\n", code):
        if "class Hyperparameters" not in section:
            continue
        try:
            tree = ast.parse(section)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == "Hyperparameters":
                for item in node.body:
                    if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                            and item.value is not None):
                        try:
                            facts["defaults"][item.target.id] = field_default(item.value)
                        except ValueError:
                            pass  # e.g. a path built at run time (data_dir): no flag inferred
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1
                  and isinstance(node.targets[0], ast.Name)
                  and node.targets[0].id in ("PRESETS", "PER_RUN")):
                try:
                    value = literal(node.value)
                except ValueError:
                    continue
                if node.targets[0].id == "PRESETS" and isinstance(value, dict):
                    facts["presets"] = {k: v for k, v in value.items() if isinstance(v, dict)}
                elif isinstance(value, (tuple, list)):
                    facts["per_run"] = tuple(v for v in value if isinstance(v, str))
        if facts["defaults"]:
            break
    return facts


def run_specific(*logs):
    """Hyperparameters that may differ between runs of one record: seed, trials, data_dir, and
    whatever the logs' trainer declares in PER_RUN (e.g. run_name, records_dir, append)."""
    names = list(RUN_SPECIFIC)
    for log in logs:
        if "PER_RUN" in log["code"]:
            names += [k for k in declared_per_run(log["code"]) if k not in names]
    return tuple(names)


@functools.lru_cache(maxsize=16)
def declared_per_run(code):
    """script_facts(code)["per_run"], parsed once per code part (every log of a record has it)."""
    return script_facts(code)["per_run"]


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
        if "preset" in hp:  # the log names its preset: its values are the baseline for flags
            base.update(presets.get(values["preset"], {}) if isinstance(values["preset"], str) else {})
        else:  # an older trainer: the preset whose every value the log shows, if one
            matching = [p for p, entries in presets.items() if entries and all(
                k in values and same_value(v, values[k]) for k, v in entries.items() if k not in skip)]
            if matching and '"--preset"' in code:
                preset = max(matching, key=lambda p: len(presets[p]))
                flags += ["--preset", preset]
                base.update(presets[preset])
        unflagged = []
        for k, v in hp.items():
            if k in skip or k not in base or same_value(base[k], values[k]):
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


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


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


def verdict_vs_parent(c):
    """compare(this record, parent)'s verdict in words (A is this record, B the parent)."""
    return (c["verdict"].replace("A is", "this record is").replace("B is", "the parent is")
            .replace("than B", "than the parent").replace("than A", "than this record"))


def submission_readme(ctx):
    """The README.md text of a result folder (ctx: what submit() gathered)."""
    s, c, name, target = ctx["summary"], ctx["comparison"], ctx["name"], ctx["target"]
    step, n = s["step"], s["n"]
    out = [f"# {name}: val loss {target} in {step} steps (n={n})", "", ctx["description"], "",
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
            f"Claimed: step **{step}**, mean {s['mean']:.6f} over {n} "
            f"complete trials, margin ({target} - mean) * sqrt(n) = {s['margin']:.5f} >= "
            f"{PASS_MARGIN}: PASS. The benchmark's rule: n runs pass at step S when (target - "
            f"mean_S) * sqrt(n) >= {PASS_MARGIN}, and the claim is the earliest validated step, "
            "common to all runs, that passes.", "",
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
        where = f"[{base}]({base})" + (f" trial {r['trial']}" if per_file[r["source"]] > 1 else "")
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
                + [f"- cut line (ignored): {x['source']} line {x['line']}: "
                   f"`{x['text']}`" for x in s["bad_lines"]])
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
    out += ["", "## Comparison with the parent record", "",
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
    out += [f"- [{f}]({f})" for f in ctx["log_names"]]
    out += [f"- [train_gpt_simple_{name}.py](train_gpt_simple_{name}.py): the code part of "
            f"{ctx['log_names'][0]} (the script that ran)",
            "- [figure.png](figure.png): mean val loss, whole run; "
            "[zoomed_figure.png](zoomed_figure.png): near the target",
            "", "Written by `python tools/records.py submit`.", ""]
    return "\n".join(out)


def submit(record_dir, name, baseline=None, out=None, target=None, metric="val_loss",
           description=None, contributors=None, date=None):
    """Write an upstream-style result folder for the record in record_dir and return
    dict(out, files, row, summary, comparison). Refuses (RecordsError) when the logs do not share
    one configuration (hyperparameter lines; seed, trials, data_dir and the trainer's PER_RUN
    names aside) and code part, when they
    hold no code, when no step passes, or when `out` exists and is not empty (never overwrites).
    The folder is built beside `out` and renamed into place, so a failure leaves nothing behind."""
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
    if s["step"] is None:
        raise RecordsError(f"{record_dir}: no validated step passes (last common step "
                           f"{s['final_step']}: mean {s['mean']:.6f}, margin {s['margin']:.5f} < "
                           f"{PASS_MARGIN}, n={s['n']}): nothing to submit")
    baseline = baseline or PUBLISHED
    baseline_logs = read_record(baseline, metric)
    comparison = compare(runs, [t for log in baseline_logs for t in log["trials"]], target)
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
    row = (f"| ? | {s['step']} | {s['mean']:.4f} (n={s['n']})✓ | {cell(description)} | "
           f"{date:%Y-%m-%d} | [log](/{UPSTREAM_RESULTS}/{folder}/{log_names[0]}) | "
           f"{cell(contributors or '?')} |")
    same = os.path.abspath(baseline) == os.path.abspath(PUBLISHED) or \
        os.path.abspath(baseline) == os.path.dirname(PUBLISHED)
    hardware = []
    for log in logs:
        for line in log["environment"]:
            if re.match(r"(python |device |Running |torch )", line.strip()) and line.strip() not in hardware:
                hardware.append(line.strip())
    counted = screen(runs)["counted"]
    ctx = dict(summary=s, comparison=comparison, name=name, target=target, description=description,
               row=row, logs=logs, log_names=log_names, counted=counted, hardware=hardware,
               baseline_label=(PUBLISHED_LABEL + " (in-repo copy of its output: "
                               "records/published_aurora_3175/)") if same else f"`{baseline}`",
               baseline_hp=baseline_hp, baseline_code=baseline_logs[0]["code"], hp_diff=hp_diff,
               skip=skip,
               code_added=sum(line.startswith("+") for line in code_lines),
               code_removed=sum(line.startswith("-") for line in code_lines),
               reproduce=reproduce(logs, counted, name))
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
        parent_label = "parent (published)" if same else "parent"
        plot_submission({name: runs, parent_label: [t for log in baseline_logs for t in log["trials"]]},
                        os.path.join(tmp, "figure.png"), os.path.join(tmp, "zoomed_figure.png"), target)
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
    return dict(out=out, files=files, row=row, summary=s, comparison=comparison)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

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
        print(f"cut line (ignored): {x['source']} line {x['line']}: {x['text']!r}")


def num(value, spec):
    """A number for the text output; summary.json's null (a diverged run's NaN) prints as nan."""
    return format(math.nan if value is None else value, spec)


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
    print(f"runs: n={s['n']}  target: {s['target']}  total steps: {totals}"
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
              f">= {PASS_MARGIN}  (n={s['n']})")


def print_compare(c, name_a, name_b):
    print(f"A: {name_a}\nB: {name_b}")
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", type=float, help="target val loss (default: the logs' "
                        "val_loss_target line, which our trainer writes, else 3.28)")
    common.add_argument("--metric", help="field of the val lines (default: val_loss, or the one the "
                        "folder's README.md claims on when the val lines also carry it, e.g. "
                        "val_ema_loss)")
    p = sub.add_parser("summary", parents=[common], help="step count and statistics of one record")
    p.add_argument("paths", nargs="+", metavar="PATH", help="log files and directories, pooled")
    p.add_argument("--new-trials", type=int, metavar="N",
                   help="size of the new set in the pass-chance estimate (default: as observed)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--pool", action="store_true", help="pool the logs even when they hold several "
                   "configurations (by default each is summarized apart, and the claim is one's)")
    p.add_argument("--write", action="store_true", help="also (re)write summary.json in PATH, which "
                   "must be one record directory (train_gpt.py does this after every run)")
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
    p = sub.add_parser("diff", parents=[common], help="what differs between two logs or records")
    p.add_argument("a", metavar="A", help="a log file or a directory of logs")
    p.add_argument("b", metavar="B", help="a log file or a directory of logs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p = sub.add_parser("submit", parents=[common], help="write an upstream-style result folder")
    p.add_argument("record_dir", metavar="RECORD_DIR", help="the record's directory of logs")
    p.add_argument("--name", required=True, help="result name: <YYYYMMDD>_<name>/, "
                   "train_gpt_simple_<name>.py")
    p.add_argument("--baseline", metavar="LOG_OR_DIR", help="the parent record (default: the "
                   "published one, records/published_aurora_3175/)")
    p.add_argument("--out", metavar="DIR", help="result folder (default: records/"
                   "track_3_optimization/results/<YYYYMMDD>_<name>/); must not exist or be empty")
    p.add_argument("--description", help="leaderboard description (default: from the logs)")
    p.add_argument("--contributors", help="leaderboard contributors (default: ?)")
    p.add_argument("--date", help="YYYY-MM-DD (default: today, UTC)")
    args = ap.parse_args(argv)
    try:
        if args.command == "summary":
            if args.new_trials is not None and args.new_trials < 1:
                raise RecordsError(f"--new-trials must be >= 1, got {args.new_trials}")
            if args.write:
                if len(args.paths) != 1 or not os.path.isdir(args.paths[0]):
                    raise RecordsError("--write needs exactly one PATH, a record directory")
                s = write_summary(args.paths[0], args.target, metric=args.metric,
                                  new_trials=args.new_trials)
            else:
                s = summary_of(args.paths, args.target, args.metric, args.new_trials, args.pool)[0]
            if args.json:
                print(json.dumps(json_safe(s)))
            else:
                print_summary(s)
        elif args.command == "compare":
            rec_a, rec_b = load_record([args.a], args.metric), load_record([args.b], args.metric)
            runs_a, runs_b = rec_a["runs"], rec_b["runs"]
            target, warning = pair_targets(rec_a["logs"], rec_b["logs"], args.target)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
            c = dict(compare(runs_a, runs_b, target), target_warning=warning)
            if args.png:
                plot_records({f"A: {args.a}": runs_a, f"B: {args.b}": runs_b}, args.png,
                             target, args.band)
            if args.json:
                print(json.dumps(json_safe(c)))
            else:
                print_compare(c, args.a, args.b)
        elif args.command == "plot":
            labels = args.label or args.paths
            if len(labels) != len(args.paths):
                raise RecordsError(f"{len(labels)} --label for {len(args.paths)} paths")
            loaded = [load_record([p], args.metric) for p in args.paths]
            own = [resolve_target(r["logs"])[0] for r in loaded]
            target = own[0] if args.target is None else args.target
            if len(set(own)) > 1:
                print(f"warning: the records were run for different targets ({', '.join(map(format, own, ['g'] * len(own)))}): "
                      f"the target line is drawn at {target:g} (--target chooses)", file=sys.stderr)
            plot_records({lab: r["runs"] for lab, r in zip(labels, loaded)}, args.png, target,
                         args.band)
            print(f"wrote {args.png}")
        elif args.command == "diff":
            d = diff_records(args.a, args.b, args.target, args.metric or "val_loss")
            if args.json:
                print(json.dumps(json_safe(d)))
            else:
                print_diff(d)
        else:
            r = submit(args.record_dir, args.name, args.baseline, args.out, args.target,
                       args.metric or "val_loss", args.description, args.contributors, args.date)
            s = r["summary"]
            print(f"wrote {r['out']}: {', '.join(r['files'])}")
            print(f"record: step {s['step']}  mean {s['mean']:.6f}  margin {s['margin']:.5f} "
                  f">= {PASS_MARGIN}  (n={s['n']})")
            print(f"pairwise test against the parent: z {r['comparison']['z']:+.5f}: "
                  f"{verdict_vs_parent(r['comparison'])}")
            print("leaderboard row (also in the README):")
            print(r["row"])
    except RecordsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the checks above did not foresee (permissions, a full disk)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
