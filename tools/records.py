"""Step counts, significance tests, comparisons, plots and submissions from speedrun logs (ours and
upstream's).

Usage (from the repository root or anywhere else):

    python tools/records.py summary PATH... [--target T] [--metric val_loss] [--new-trials N] [--json]
    python tools/records.py summary RECORD_DIR --write     # also (re)write RECORD_DIR/summary.json
    python tools/records.py compare A B [--png FILE] [--band minmax|std] [--target] [--metric] [--json]
    python tools/records.py plot PATH... --png FILE [--label NAME ...] [--band minmax|std]
    python tools/records.py diff A [B | --baseline B] [--target] [--metric] [--json]
    python tools/records.py submit RECORD_DIR --name NAME [--baseline LOG_OR_DIR] [--out DIR]
                                   [--description TEXT] [--contributors TEXT] [--date YYYY-MM-DD]
    python tools/records.py campaign PATH... --trials N [--step S] [--target T] [--metric M]

A PATH is a log file or a directory (every *.txt under it, subfolders included, sorted; files
without validation lines are skipped with one notice; a link back to a folder already read or to
one that holds the record, and a *.txt that is not a regular file such as a FIFO, are skipped
with a notice on stderr); `summary` pools all its PATHs into one
record (`--pool` even across configurations), `compare`, `plot` and `diff` take one record per PATH.
`campaign` is a claim in progress: with k of the N planned trials in (a folder filled by one or
several processes), the mean and margin at the claim step and the chance that the N-trial campaign
passes there, with the trials needed for a 90% chance (tools/campaign.py; docs/campaign.md).
`tools/check_leaderboard.py` runs `summary` on every result of upstream's Track-3 leaderboard.
`diff` shows what differs between two logs or records: hyperparameters, code (unified diff), val
losses at common steps, and the pairwise test. `submit` writes an upstream-style result folder
(default records/track_3_optimization/results/<YYYYMMDD>_<NAME>/): the logs, the script they ran,
a README (claim, per-seed table, comparison with the parent record, hardware, command) and two
figures; it prints the leaderboard row. The parent record (`diff`'s B, `submit`'s --baseline)
defaults to the published record that the run's preset starts from (its log header's `preset:`
line; tools/parents.py's PARENTS): aurora_2930, aurora_2890 and aurora_2860 have the published
records of those step counts (records/published_aurora_<steps>/), the SOAP-Muon presets the
record their published result built on (soap_2690: records/published_soap_2720/, soap_2720:
records/published_soap_2750/, soap_2750: #40's, the nearest preset ancestor of its parent #41),
any other preset, or none, the 3175-step record (records/published_aurora_3175/track3_aurora_3175_n20.txt).

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
  a field repeated) is ignored and listed in `bad_lines` ("cut line"); so is a whole line that
  cannot be a validation of its run ("bad line": a loss that is not a finite positive number, such
  as a diverged run's nan, or a step outside 0..N of `step:S/N`), and a trial whose last step line
  is one of these does not count;
- a file counts once: given twice (`summary A A`, a folder and a file in it) it is read once, and
  a copy (the same content; trials with at least two validation lines) is listed in `duplicates`
  as a copy of the original's trials, with a note;
- a seed counts once: a later complete trial with the seed of an earlier one (across files too) is
  listed in `duplicates` and left out; an upstream trial whose validation lines (with their clock)
  repeat another's is the same run logged twice, listed there as a copy;
- logs of several configurations (code part without comments, strings and seed lines, or
  hyperparameter lines) are summarized per group; the claim is the group that passes earliest;
- the target: --target, else the `val_loss_target:` header line of the logs (our trainer writes
  it; logs of one record that state different targets are refused), else 3.28; a target must be
  a finite positive number. `compare` and `diff` take A's and warn when A and B were run for
  different targets;
- the metric: `val_loss`, unless the README.md beside the logs names another field of their val
  lines more often (a claim on a readout such as `val_ema_loss`); `--metric` chooses, and must
  name a validation field (val_*; train_loss is refused). Every output names the metric and the
  target it used.
`plot --png` and `compare --png` take a file name ending in .png.

The benchmark's rules: n runs pass at step S when
`(target - mean_S) * sqrt(n) >= 0.004`; the record is the earliest validated step, common to all
runs, that passes. Pairwise test: see compare(). `summary` and `submit` also estimate the chance
that a new set of n trials passes near the record step (see pass_chance()).

Layout: this file is the command line (main); the work is done by sibling modules, each opening
with a docstring that says how its parts fit:
    tools/logs.py      reading logs and record folders: read_log, parse_log, load_record, load_runs
    tools/configs.py   which configuration a log ran: code signature, hyperparameters, groups
    tools/trials.py    which trials count: screen (complete, each seed once, copies once)
    tools/stats.py     the benchmark's rules, the only implementation of the statistics: target,
                       pass rule, summarize, the pairwise test (compare), pass_chance
    tools/summary.py   the summary command and summary.json (summary_of, write_summary)
    tools/compare.py   the compare command's text, and diff (diff_records)
    tools/plots.py     figures (plot_records, plot_submission)
    tools/submit.py    an upstream-style result folder (submit)
    tools/parents.py   the default parent record of a run, by preset (PARENTS, parent_of)
    tools/campaign.py  a campaign in progress: its chance of passing, the futility stop
The names used from Python (read_log, parse_log, load_runs, screen, summarize, compare,
pass_chance, write_summary, plot_records, diff_records, submit, RecordsError, ...) can also be
imported from here. train_gpt.py rewrites summary.json after every run (write_summary, through
`summary RECORD_DIR --write`). Errors (missing path, no logs, unreadable file, no val lines, no
complete trial, no common step, a target, metric or --png that cannot be right, a submission that
does not hold together) raise RecordsError; the command line prints `error: ...` on stderr and
exits with status 2, before it writes anything. docs/failure-modes.md lists what is refused.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script (python tools/records.py): the siblings are tools.*
    sys.path.insert(0, ROOT)

# What other code imports from here (tests, train_gpt.py's users, tools/*.py): the command line's
# own imports, and the rest of the Python interface, re-exported (see __all__).
from tools.campaign import campaign_of, print_campaign  # noqa: E402
from tools.compare import diff_records, print_compare, print_diff  # noqa: E402
from tools.configs import script_facts  # noqa: E402
from tools.logs import RecordsError, load_record, load_runs, parse_log, read_log  # noqa: E402
from tools.plots import checked_png, plot_records  # noqa: E402
from tools.stats import (checked_target, claimed, compare, pair_targets, pass_chance,  # noqa: E402
                         pass_probability, resolve_target, summarize, trials_needed, unlike_tasks)
from tools.parents import PARENTS, PUBLISHED, parent_of  # noqa: E402
from tools.submit import flag_arguments, print_submission, submit  # noqa: E402
from tools.summary import json_safe, print_summary, summary_of, write_summary  # noqa: E402
from tools.trials import copies, screen  # noqa: E402

__all__ = ["PARENTS", "PUBLISHED", "RecordsError", "claimed", "compare", "copies", "diff_records",
           "flag_arguments", "load_record", "load_runs", "main", "parent_of", "parse_log",
           "pass_chance", "pass_probability", "plot_records", "read_log", "screen", "script_facts",
           "submit", "summarize", "summary_of", "trials_needed", "write_summary"]


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
    p.add_argument("b", metavar="B", nargs="?", help="a log file or a directory of logs (default: "
                   "A's parent record, the published record of A's preset)")
    p.add_argument("--baseline", metavar="LOG_OR_DIR", help="B, named as submit names it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p = sub.add_parser("submit", parents=[common], help="write an upstream-style result folder")
    p.add_argument("record_dir", metavar="RECORD_DIR", help="the record's directory of logs")
    p.add_argument("--name", required=True, help="result name: <YYYYMMDD>_<name>/, "
                   "train_gpt_simple_<name>.py")
    p.add_argument("--baseline", metavar="LOG_OR_DIR", help="the parent record (default: the "
                   "published record of the logs' preset, records/published_aurora_<steps>/)")
    p.add_argument("--out", metavar="DIR", help="result folder (default: records/"
                   "track_3_optimization/results/<YYYYMMDD>_<name>/); must not exist or be empty")
    p.add_argument("--description", help="leaderboard description (default: from the logs)")
    p.add_argument("--contributors", help="leaderboard contributors (default: ?)")
    p.add_argument("--date", help="YYYY-MM-DD (default: today, UTC)")
    p = sub.add_parser("campaign", parents=[common], help="a campaign in progress: its chance "
                       "of passing once all N trials are in")
    p.add_argument("paths", nargs="+", metavar="PATH", help="log files and directories, pooled")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="the campaign's planned number of trials (>= the complete trials in)")
    p.add_argument("--step", type=int, metavar="S", help="the claim step (default: the trials' "
                   "own earliest passing step, else the preset's published claim step, else the "
                   "last common validated step)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    try:
        # what cannot be right is refused before anything is read or written
        if args.target is not None:
            checked_target(args.target)
        if getattr(args, "png", None) is not None:
            checked_png(args.png)
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
            unlike = unlike_tasks(rec_a["logs"], rec_b["logs"])
            if unlike:
                raise RecordsError(f"not compared: {unlike} (compare records of one task)")
            metric_a, metric_b = rec_a["metric"], rec_b["metric"]
            metric_warning = None if metric_a == metric_b else (  # each chose its README's
                f"A is read on {metric_a}, B on {metric_b} (their folders' README.md): --metric "
                "reads both on one")
            for text in filter(None, (warning, metric_warning)):
                print(f"warning: {text}", file=sys.stderr)
            c = dict(compare(runs_a, runs_b, target), target_warning=warning, metric_a=metric_a,
                     metric_b=metric_b, metric_warning=metric_warning)
            if args.png:
                plot_records({f"A: {args.a}": runs_a, f"B: {args.b}": runs_b}, args.png,
                             target, args.band, metric_name(metric_a, metric_b))
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
                         args.band, metric_name(*(r["metric"] for r in loaded)))
            print(f"wrote {args.png}")
        elif args.command == "diff":
            if args.b and args.baseline:
                raise RecordsError("diff: give B or --baseline, not both")
            d = diff_records(args.a, args.b or args.baseline, args.target, args.metric)
            if args.json:
                print(json.dumps(json_safe(d)))
            else:
                print_diff(d)
        elif args.command == "campaign":
            c = campaign_of(args.paths, args.trials, args.step, args.target, args.metric)
            if args.json:
                print(json.dumps(json_safe(c)))
            else:
                print_campaign(c, ", ".join(args.paths))
        else:
            r = submit(args.record_dir, args.name, args.baseline, args.out, args.target,
                       args.metric, args.description, args.contributors, args.date)
            print_submission(r)
    except RecordsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped reading (`... | head`): nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as e:  # a path the checks above did not foresee (permissions, a full disk)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def metric_name(*metrics):
    """The metric of several records, for a figure's axis: one name, or each one once."""
    return " / ".join(dict.fromkeys(metrics))


if __name__ == "__main__":
    sys.exit(main())
