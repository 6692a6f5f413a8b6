"""Check tools/records.py against the Track-3 leaderboard: for every row of the leaderboard table
in an upstream copy, run `summary` on the result's folder (or its single log) as a user would, and
compare step, mean (to the leaderboard's 4 decimals) and n. Prints a markdown table.

    python tools/check_leaderboard.py UPSTREAM   # UPSTREAM: modded-nanogpt checkout, or its
                                                 # records/track_3_optimization folder

A mismatch row says what the logs give at the leaderboard's step, pooled over every configuration
(when the folder holds several) and with the trials the summary leaves out (when it left some),
so that the reader can tell a leaderboard inconsistent with its logs from a tool problem.
"""
import decimal
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.logs import RecordsError, load_record  # noqa: E402
from tools.stats import claimed, summarize  # noqa: E402
from tools.summary import summary_of  # noqa: E402
from tools.trials import copies, screen  # noqa: E402

NUMBERED = re.compile(r"^\|\s*(\d+)\s*\|")  # a row of the leaderboard table: | 17 | ...
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)(\(!\))?\s*\|\s*(\d+\.\d+)\s*\(n=(\d+)\)(\S*)\s*\|.*?"
                 r"\[log\]\(results/([^)]+)\)")
LINK = re.compile(r"\[log\]\(results/[^)]+\)")


def leaderboard(track_dir):
    """Rows of the leaderboard table: dict(number, step, mean (text), n, passes, link), or, for a
    numbered row that does not read as one, dict(number, problem: why)."""
    with open(os.path.join(track_dir, "README.md"), encoding="utf-8", errors="replace") as f:
        lines = [line.rstrip("\n") for line in f if NUMBERED.match(line)]
    rows = []
    for line in lines:
        m = ROW.match(line)
        rows.append(dict(number=int(m.group(1)), step=int(m.group(2)), mean=m.group(4),
                         n=int(m.group(5)), passes=m.group(6) != "Ⓧ", link=m.group(7)) if m else
                    dict(number=int(NUMBERED.match(line).group(1)), problem=row_problem(line)))
    return rows


def row_problem(line):
    """Why a numbered line of the table is not a leaderboard row this check can read."""
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) < 7:
        return f"{len(cells)} cells, 7 expected"
    if not re.fullmatch(r"\d+(\(!\))?", cells[1]):
        return f"steps {cells[1]!r} is not a step count"
    evidence = re.fullmatch(r"(\S*)\s*\(n=(\d+)\)\S*", cells[2])
    if not evidence:
        return f"evidence {cells[2]!r} is not 'mean (n=N)'"
    if not re.fullmatch(r"\d+\.\d+", evidence.group(1)):
        return f"mean {evidence.group(1)!r} is not a decimal number such as 3.2788"
    if not LINK.search(line):
        return "no [log](results/...) link"
    return "not understood"


def target_of(results, link):
    """What a user summarizes for a row: the result's folder, or the log itself at results/."""
    first = link.split("/")[0]
    return os.path.join(results, first)


def mean_at(runs, step):
    """(mean, n) over the claim's trials that validated at `step`, left-out ones too (not copies)."""
    runs = claimed(runs)
    copied = copies(runs)
    values = [r["losses"][r["steps"].index(step)] for i, r in enumerate(runs)
              if i not in copied and step in r["steps"]]
    return (sum(values) / len(values), len(values)) if values else (None, 0)


def same_mean(runs, step, printed):
    """Whether the leaderboard's `printed` mean is the logs' mean at `step` rounded to its
    decimals, computed exactly from the logged decimals (3.27765 rounds to 3.2777 as well as to
    3.2776: a float's 3.2776 would call that a mismatch)."""
    exact = exact_mean(runs, step)
    return abs(exact - decimal.Decimal(printed)) <= decimal.Decimal(5) / 10 ** (len(printed.split(".")[1]) + 1)


def exact_mean(runs, step):
    values = [decimal.Decimal(repr(loss_at_step(r, step))) for r in screen(runs)["counted"]]
    return sum(values) / len(values)


def loss_at_step(run, step):
    return run["losses"][run["steps"].index(step)]


def check(row, results):
    if "problem" in row:
        return dict(row, name="?", got="", match=False,
                    notes=[f"malformed leaderboard row: {row['problem']}"])
    path = target_of(results, row["link"])
    name = os.path.relpath(path, results)
    out = dict(row, name=name, got="", match=False, notes=[])
    try:
        s, runs, _ = summary_of(path)
    except RecordsError as e:
        out["got"] = f"error: {e}"[:200]
        return out
    step = s["step"] if s["step"] is not None else s["final_step"]
    out["got"] = f"{step} {s['mean']:.4f} (n={s['n']}){'' if s['step'] is not None else ' no pass'}"
    out["match"] = (step == row["step"] and same_mean(runs, step, row["mean"]) and s["n"] == row["n"]
                    and (s["step"] is not None) == row["passes"])
    out["notes"] += [n.replace(results + os.sep, "") for n in s["notes"] if not n.startswith("group ")]
    if s.get("group"):
        out["notes"].append(f"claim for group {s['group']}")
    if out["match"]:
        return out
    by_step = {r["step"]: r for r in s["per_step"]}
    if row["step"] in by_step and row["step"] != step:
        r = by_step[row["step"]]
        out["notes"].append(f"at step {row['step']}: mean {r['mean']:.6f}, margin {r['margin']:.5f} (n={s['n']})")
    if step == row["step"] and not same_mean(runs, step, row["mean"]):
        out["notes"].append(f"exact mean of the logged losses {exact_mean(runs, step).normalize()}")
    if s.get("group"):
        record = load_record(path)
        for r in record["runs"]:
            r["group"] = None
        pooled = summarize(record["runs"])
        out["notes"].append(f"every group pooled: step {pooled['step']} mean {pooled['mean']:.6f} "
                            f"n={pooled['n']}")
    if s["incomplete"]:
        mean, n = mean_at(load_record(path)["runs"], row["step"])
        if mean is not None:
            out["notes"].append(f"with the {len(s['incomplete'])} left-out trial(s) that validated "
                                f"there: mean at {row['step']} {mean:.6f} n={n}")
        out["notes"] += [f"left out: {os.path.relpath(i['source'], results)}: {i['reason']}"
                         for i in s["incomplete"]][:3]
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    track = argv[0]
    if os.path.isdir(os.path.join(track, "records", "track_3_optimization")):
        track = os.path.join(track, "records", "track_3_optimization")
    results = os.path.join(track, "results")
    if not os.path.isfile(os.path.join(track, "README.md")) or not os.path.isdir(results):
        print(f"error: {track} is not a modded-nanogpt checkout or its records/track_3_optimization "
              "folder (README.md and results/ expected)", file=sys.stderr)
        return 2
    rows = [check(row, results) for row in leaderboard(track)]
    print("| # | result | leaderboard | `summary` | match | notes |\n|---|---|---|---|---|---|")
    for r in rows:
        board = ("not read" if "problem" in r else
                 f"{r['step']} {r['mean']} (n={r['n']}){'' if r['passes'] else ' no pass'}")
        notes = "; ".join(r["notes"]).replace("|", "\\|")
        print(f"| {r['number']} | `{r['name']}` | {board} | {r['got']} | "
              f"{'yes' if r['match'] else '**no**'} | {notes} |")
    print(f"\n{sum(r['match'] for r in rows)} of {len(rows)} rows match.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
