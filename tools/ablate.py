"""Muon / NorMuon / Aurora ablation: same seed, same data, same pipeline; only the update differs.

    python tools/ablate.py                          # tiny preset on the CPU (a few minutes)
    python tools/ablate.py --variants               # + the tall-only/cans12 variant and MuonEq
    python tools/ablate.py --preset small           # the 124M model, quarter batch (one GPU)
    python tools/ablate.py --n-layer 2 --val-every 5  # any other flag goes to every run

Runs train_gpt.py once per optimizer into records/<date>_ablation_<preset>/ (one record
directory per optimizer inside), then writes there `ablation.md` (the command and a table of final
val loss and neuron-health diagnostics per optimizer), `val_loss.png` (val loss vs step) and
`dead.png` (dead-neuron fraction vs step, one line per layer, one panel per optimizer).
"""
import argparse
import datetime
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.logs import parse_log  # noqa: E402

RUNS = {
    "muon": ["--rule", "muon"],
    "normuon": ["--rule", "normuon"],
    "aurora": ["--rule", "aurora"],
}
VARIANTS = {
    "aurora_tall_cans12": ["--rule", "aurora", "--aurora-on", "tall", "--ns-iteration", "cans12"],
    "muoneq": ["--rule", "aurora", "--pp-iterations", "1"],  # row-normalize, then polar
}
METRICS = ("dead", "starved", "leverage_cv", "frozen")


def load(run_dir):
    """(val steps, val losses, diagnostics rows) of the single log in run_dir."""
    logs = glob.glob(os.path.join(run_dir, "*.txt"))
    if len(logs) != 1:
        raise SystemExit(f"error: expected one log in {run_dir}, found {len(logs)}")
    (trial,) = parse_log(logs[0])
    with open(os.path.splitext(logs[0])[0] + ".jsonl") as f:
        rows = [json.loads(line) for line in f]
    return trial["steps"], trial["losses"], rows


def layer_mean(rows, step, key):
    values = [r[key] for r in rows if r["step"] == step and r[key] is not None]
    return sum(values) / len(values) if values else float("nan")


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, losses, _) in results.items():
        ax.plot(steps[1:], losses[1:], marker=".", label=name)  # step 0 (ln vocab) squashes the plot
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "val_loss.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.8), sharey=True, squeeze=False)
    for ax, (name, (_, _, rows)) in zip(axes[0], results.items()):
        for layer in sorted({r["layer"] for r in rows}):
            pts = [(r["step"], r["dead"]) for r in rows if r["layer"] == layer]
            ax.plot(*zip(*pts), label=f"layer {layer}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("dead neuron fraction")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "dead.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="train_gpt.py preset (tiny, small, record)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    ap.add_argument("--train-steps", type=int, help="override the preset's steps")
    ap.add_argument("--data-dir", help="shard folder (default: the preset's)")
    ap.add_argument("--variants", action="store_true", help="also aurora_tall_cans12 and muoneq")
    ap.add_argument("--out", help="output folder (default records/<date>_ablation_<preset>)")
    # every other flag is train_gpt.py's, passed to each run (train_gpt.py checks it)
    args, extra = ap.parse_known_args(argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or os.path.join(ROOT, "records", f"{date}_ablation_{args.preset}")
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: {out} exists and is not empty; choose another --out")
    os.makedirs(out, exist_ok=True)
    runs = dict(RUNS, **(VARIANTS if args.variants else {}))
    common = ["--preset", args.preset, "--seed", str(args.seed), "--records-dir", out]
    common += ["--train-steps", str(args.train_steps)] if args.train_steps else []
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    common += extra
    results = {}
    for i, (name, flags) in enumerate(runs.items()):
        print(f"[{i + 1}/{len(runs)}] {name}: train_gpt.py {' '.join(flags)}", flush=True)
        cmd = [sys.executable, os.path.join(ROOT, "train_gpt.py")] + common + flags + ["--run-name", name]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if proc.returncode:
            raise SystemExit(f"error: the {name} run failed (exit {proc.returncode}); see its log in {out}")
        results[name] = load(glob.glob(os.path.join(out, f"*_{name}"))[0])

    header = "| optimizer | final val loss | dead | starved | leverage CV | frozen |"
    lines = [header, "|---|---|---|---|---|---|"]
    for name, (steps, losses, rows) in results.items():
        last = steps[-1]
        cells = " | ".join(f"{layer_mean(rows, last, k):.4f}" for k in METRICS)
        lines.append(f"| {name} | {losses[-1]:.5f} | {cells} |")
    table = "\n".join(lines)
    command = "python tools/ablate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(f"# Ablation ({args.preset} preset, seed {args.seed})\n\nCommand: `{command.strip()}`\n\n"
                f"Diagnostics at the final step ({steps[-1]}), mean over MLP layers "
                "(definitions in README.md):\n\n" + table + "\n")
    plot(results, out)
    print(table)
    print(f"wrote {out}/ablation.md, val_loss.png, dead.png")


if __name__ == "__main__":
    main()
