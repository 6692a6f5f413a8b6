"""Reading speedrun logs (ours and upstream's) and the record folders that hold them.

A log is the training script's source (the code part), a '=' line, header lines (ours: the
environment, then one `name: value` line per hyperparameter), another '=' line, then output; the
format and what makes a line count are described in tools/records.py's docstring (its --help).

How the parts fit: read_step_line() judges one `step:` line (whole, or cut mid-write); read_log()
walks a file's output and splits it into trials (at `trial:{i} seed:{s}` lines, or where the step
does not increase); parse_log() is its list of trials. load_record() turns PATHs (files and
folders) into one record: each file read once, non-logs in folders skipped, the metric chosen
(readme_metric), copies of a file marked (mark_copies), config.json checked (read_config) and the
logs split by configuration (configs.assign_groups). load_runs() and read_record() are its runs
and its logs. Which trials then count is tools/trials.py's decision, and what they add up to is
tools/stats.py's. RecordsError, raised here and by every sibling module, is what the command
line reports as `error: ...`.
"""

if __name__ == "__main__":  # a module of the toolkit, not a command
    raise SystemExit("tools/logs.py is a module of the records toolkit, not a command: "
                     "python tools/records.py --help lists the commands")

import ast
import hashlib
import json
import math
import os
import re
import sys

from tools.configs import assign_groups

SEPARATOR = re.compile(r"^={50,}\s*$")
STEP_LINE = re.compile(r"^step:(-?\d+)/(-?\d+)$")
SEED_LINE = re.compile(r"^trial:(\d+)\s+seed:(\S+)")
STOP_LINE = re.compile(r"^(interrupted|failed|error):\s")
END_LINE = re.compile(r"^final val losses:")  # our trainer's last line: every trial ended as planned
STOP_STEP = re.compile(r"\bat step (\d+)")
KEY = re.compile(r"^[A-Za-z_]\w*$", re.ASCII)  # a field name on a step line
DERIVED = ("seconds",)  # a field read_step_line adds itself
VALIDATION_FIELD = re.compile(r"^val\w*$")  # what --metric may name: a field of the val lines
HYPERPARAMETER = re.compile(r"^([A-Za-z_]\w*): (.*)$")
NUMBER = re.compile(r"^[-+]?((\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|nan|inf)$", re.IGNORECASE)
SECONDS = re.compile(r"^(\d+(?:\.\d+)?)(m?)s$")  # ours write seconds; some upstream logs ms
MILLISECONDS = re.compile(r"^(\d+(\.\d+)?|nan|inf)ms$")


class RecordsError(Exception):
    """A log or record that cannot be read or summarized; the message says which and why."""


class NotALog(RecordsError):
    """A file without validation lines of the metric (metadata, a manifest, stderr): a directory's
    such files are skipped with a notice, a file named on its own is an error. `metrics`: the
    validation fields its step lines carry (another metric may be meant)."""

    def __init__(self, message, metrics=()):
        super().__init__(message)
        self.metrics = set(metrics)


def to_float(text):
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_seed(token):
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    return None if token == "None" else token  # e.g. record0: an older log's unseeded trial


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
    """A line starting with 'step:': ('val', fields) for a whole line with a usable metric value,
    ('other', fields) for a whole line without the metric (training progress, another metric),
    ('cut', why) for a line cut mid-write or garbled, or ('bad', why) for a whole line that cannot
    be a validation of its run. Whole: `step:S/T` then key:value tokens only, each field named
    once, a well-formed train_time (s or ms) and step_avg (ms), and a number as the metric's value
    if present. A line cut mid-write (`step:3175/3200 val_loss:3.27`) fails this, so it can never
    be read as a loss. Usable: 0 <= S <= T (a step within its run), and the loss finite and
    positive (a `val_loss:nan` of a diverged run, or a negative loss, is never pooled)."""
    tokens = line.split()
    m = STEP_LINE.match(tokens[0]) if tokens else None
    if not m:
        return "cut", "cut or garbled: it does not start with step:S/T"
    fields = dict(step=int(m.group(1)), total=int(m.group(2)))
    for tok in tokens[1:]:
        key, sep, value = tok.partition(":")
        if not (KEY.match(key) and sep and value):
            return "cut", f"cut or garbled at {tok[:40]!r}"
        if key in fields or key in DERIVED:  # e.g. `... step:1/2`: two lines run together
            return "cut", f"garbled: the field {key} appears twice"
        fields[key] = value
    time = SECONDS.match(fields.get("train_time", ""))
    if not time or not MILLISECONDS.match(fields.get("step_avg", "")):
        return "cut", "cut or garbled: no well-formed train_time (s) and step_avg (ms)"
    fields["seconds"] = float(time.group(1)) / (1000 if time.group(2) else 1)
    step, total = fields["step"], fields["total"]
    if not 0 <= step <= total:
        return "bad", (f"step {step} is negative" if step < 0 else
                       f"step {step} is not within its run's {total} steps")
    if metric not in fields:
        return "other", fields
    if not NUMBER.match(fields[metric]):
        return "cut", f"cut or garbled: {metric} {fields[metric][:40]!r} is not a number"
    loss = float(fields[metric])
    if not (math.isfinite(loss) and loss > 0):
        return "bad", f"{metric} {fields[metric]} is not a finite positive loss"
    return "val", fields


def new_trial(trials, path, seed):
    trials.append(dict(source=str(path), trial=len(trials), seed=seed, total_steps=None, steps=[],
                       losses=[], train_time=[], last_step=None, stop=None, complete=False,
                       announced=False, finished=False, cut_end=False, bad_end=None, end=None,
                       bad_lines=[]))
    return trials[-1]


def read_log(path, metric="val_loss"):
    """Everything a log says: code (the code part, text before the first '=' line), header (lines
    between the first two '=' lines), hyperparameters (its `name: value` lines, as strings),
    environment (its other lines), trials (see parse_log; incomplete ones included), bad_lines
    (step lines not counted: source, line number, text, reason, cut: True when cut or garbled,
    False when whole but unusable) and stops (`interrupted:`/`failed:` lines). `metric` must name a
    validation field (val_loss, val_ema_loss, ...): RecordsError otherwise."""
    if not VALIDATION_FIELD.match(metric):  # e.g. train_loss: training lines are not validations
        try:
            carried = read_log(path)["metrics"]
        except NotALog as e:
            carried = e.metrics
        raise RecordsError(f"--metric {metric!r}: not a validation field (a val_* field of the val "
                           f"lines); the val lines of {path} carry: {', '.join(sorted(carried)) or 'none'}")
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
        if kind in ("cut", "bad"):
            bad = dict(source=str(path), line=number, text=line[:200], reason=fields, cut=kind == "cut")
            log["bad_lines"].append(bad)
            (trials[-1]["bad_lines"] if trials else pending_bad).append(bad)
            if trials:  # until a later counted validation: the log may be cut mid-line here, or
                trials[-1]["cut_end"] = kind == "cut"  # its last step line is not usable
                trials[-1]["bad_end"] = None if kind == "cut" else (
                    f"its last step line, line {number}, is not usable: {fields}")
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
        current["cut_end"], current["bad_end"] = False, None
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
        notes = [f"{len(bad)} {'cut' if bad[0]['cut'] else 'bad'} line(s) ignored, e.g. line "
                 f"{bad[0]['line']}: {bad[0]['text']!r} ({bad[0]['reason']})"] if bad else []
        notes += [f"the log says {log['stops'][-1]!r}"] if log["stops"] else []
        raise NotALog(f"{path}: no validation lines with '{metric}:' (is it a training log? "
                      "another field can be chosen with --metric)" + "".join(f"; {n}" for n in notes),
                      log["metrics"])
    return log


def parse_log(path, metric="val_loss"):
    """The trials of one log file, in order: a list of dicts with source, trial (index in the
    file), seed (int, `record{k}`, or None), total_steps, steps, losses (the metric), train_time
    (s), complete (a val line at the final step), finished (ours: the trainer's end line follows),
    cut_end (the log is cut mid-line after its last validation), bad_end (why a whole step line
    after its last validation is not usable), last_step (the last step seen), end (why it ended,
    if not at its final step) and bad_lines (its step lines not counted). Whether a trial counts
    is screen()'s decision: an upstream run may stop before its horizon on purpose."""
    return read_log(path, metric)["trials"]


def log_files(path):
    """The log files a path stands for: itself, or every *.txt under a directory (sorted; results
    folders keep logs in subfolders, e.g. one per seed or per configuration; see walk_logs). A path
    that is not a regular file (a FIFO, whose open() would wait for a writer forever) is refused."""
    if os.path.isdir(path):
        files = walk_logs(path)
        if not files:
            raise RecordsError(f"no .txt logs found in directory {path}")
        return files
    if not os.path.exists(path):
        raise RecordsError(f"{path}: no such file or directory")
    if not os.path.isfile(path):
        raise RecordsError(f"{path}: not a regular file (a FIFO, socket or device): not read")
    return [path]


def walk_logs(root):
    """Every regular *.txt file under `root`, subfolders included, sorted by path; names starting
    with '.' are left out (as glob does). A link to a folder is followed once: a link back to a
    folder already walked (a loop such as `sub/up -> ..`) is skipped, and so is a *.txt that is
    not a regular file (a FIFO: open() would block), each with a notice on stderr. So is a link to
    a folder that holds `root` (`sub/top -> /`): it would walk far beyond the record."""
    files, walked, top = [], set(), os.path.realpath(root)

    def walk(folder):
        real = os.path.realpath(folder)
        if real in walked:
            notice(f"skipped {folder}: a link to a folder already read ({real})")
            return
        if real != top and os.path.commonpath([real, top]) == real:
            notice(f"skipped {folder}: a link to {real}, a folder that holds {root}")
            return
        walked.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            notice(f"skipped {folder}: cannot list it ({e.strerror or e})")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows links: checked against `walked` above
                walk(entry.path)
            elif entry.name.endswith(".txt"):
                if entry.is_file():
                    files.append(entry.path)
                else:
                    notice(f"skipped {entry.path}: not a regular file (a FIFO, socket, device or "
                           "broken link)")

    walk(root)
    return sorted(files)


def notice(text):
    print(f"note: {text}", file=sys.stderr)


def readme_metric(paths, metrics):
    """(metric, note) when the README.md beside the logs names one of the other metrics on their
    val lines (`val_ema_loss` or `val_ema`) more often than val_loss: a result may claim on a
    readout logged beside the plain loss. None otherwise."""
    others = sorted(m for m in metrics if m != "val_loss")
    for path in paths:
        readme = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "README.md")
        if not os.path.isfile(readme):  # absent, or a FIFO (open() would block)
            continue
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

    chosen, notes = "val_loss" if metric is None else metric, []
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
    config, why = None, None
    if os.path.exists(path) and not (os.path.isdir(path) or os.path.isfile(path)):
        # a FIFO: open() would wait for a writer forever
        return None, note_config(path, "not a regular file (a FIFO, socket or device)")
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
    return (None, note_config(path, why)) if why else (config, None)


def note_config(path, why):
    return (f"{path} is {why}: ignored here; the trainer's --append checks new runs against it "
            "(delete it to have the logs' headers used)")


def load_runs(paths, metric="val_loss"):
    """All trials of all logs under `paths` (files and directories, or a single path), in order."""
    runs = load_record(paths, metric)["runs"]
    if not runs:
        raise RecordsError("no logs given")
    return runs


def read_record(path, metric="val_loss"):
    """The logs under a path (a log file or a directory), read whole; at least one."""
    return load_record(path, metric)["logs"]
