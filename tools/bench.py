"""Time Aurora's optimizer step (and optionally whole training steps) on this machine's device.

    python tools/bench.py                    # optimizer step over the record's 72 block matrices
    python tools/bench.py --train            # + full record training steps: ms/step and MFU
    python tools/bench.py --size small       # CPU-quick: the tiny preset's shapes

(a) One optimizer step for muon and aurora, each with the straightforward per-matrix reference
path (`batched=False`) and the batched fast path, measured in the same run, with the ratios
aurora/muon and fast/reference. (b) With --train, full training steps of the configuration (one
process: all micro-batches and all matrices on this device; torch.compile excluded by warm-up)
for aurora and muon, with ms/step and model FLOPs utilisation against --peak-tflops.
On CUDA the times come from CUDA events after warm-up; every number is the median of --iters.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt  # noqa: E402
from aurora_variants import VariantAurora  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H100 SXM figure for dense bf16 tensor-core math


def timed(fn, device, iters, warmup):
    """Median and min milliseconds of fn() over `iters` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), min(times)


def block_matrix_shapes(hp):
    with torch.device("meta"):
        model = train_gpt.GPT(hp, torch.bfloat16)
    return [tuple(p.shape) for p in model.blocks.parameters() if p.ndim == 2]


def bench_optimizer(hp, device, iters, warmup):
    shapes = block_matrix_shapes(hp)
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(s, generator=gen, device=device) for s in shapes]
    results = {}
    for rule in ("muon", "aurora"):
        for batched in (False, True):
            params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device) * 0.02)
                      for s in shapes]
            for p, g in zip(params, grads):
                p.grad = g
            opt = VariantAurora(params, lr=hp.lr_matrix, rule=rule, batched=batched)
            results[rule, batched] = timed(opt.step, device, iters, warmup)
            opt.check_finite()
    return shapes, results


class FixedBatch:
    """Stands in for the train loader: the same tokens every step."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def next_batch(self):
        return self.x, self.y


def bench_training(hp, device, iters, warmup):
    ctx = train_gpt.Context(0, 1, device, *train_gpt.micro_batch_plan(hp, 1))
    model = train_gpt.GPT(hp, train_gpt.activation_dtype(ctx)).to(device)
    compiled = torch.compile(model, dynamic=False) if device.type == "cuda" else model
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, min(hp.vocab_size, 50257), (hp.batch_tokens + 1,), generator=gen,
                           device=device)
    batch = FixedBatch(tokens[:-1].int(), tokens[1:])
    results = {}
    for rule in ("muon", "aurora"):
        model.init_weights(hp.init_var)
        rule_hp = train_gpt.dataclasses.replace(hp, rule=rule)
        run = train_gpt.Run(rule_hp, ctx, train_gpt.Logger(1), model, compiled, batch, None)
        optimizers = train_gpt.build_optimizers(model, rule_hp, device)
        results[rule] = timed(lambda: train_gpt.train_step(run, optimizers, 0), device, iters, warmup)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = n_params - model.embed.weight.numel()  # the embedding is a lookup, not a matmul
    flops_per_token = 6 * n_matmul + 6 * hp.n_layer * hp.seq_len * hp.d_model  # + causal attention
    return results, flops_per_token * hp.batch_tokens, ctx.accum


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["record", "small"], default="record",
                    help="record: the 124M model's shapes; small: the tiny preset's (CPU-quick)")
    ap.add_argument("--train", action="store_true", help="also time full training steps")
    ap.add_argument("--iters", type=int, default=20, help="timed runs per measurement (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (compile, caches)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, help="device peak bf16 TFLOP/s for MFU (default: "
                    f"{H100_BF16_DENSE_TFLOPS:g} on an H100, none elsewhere)")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    hp = train_gpt.Hyperparameters(**train_gpt.PRESETS["tiny" if args.size == "small" else "record"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if "H100" in name else None)
    print(f"device: {name}  torch {torch.__version__}  size: {args.size}  "
          f"median of {args.iters} after {args.warmup} warm-up")

    shapes, opt = bench_optimizer(hp, device, args.iters, args.warmup)
    print(f"\n(a) optimizer step over {len(shapes)} block matrices "
          f"({', '.join(f'{s[0]}x{s[1]} x{shapes.count(s)}' for s in sorted(set(shapes)))})")
    print(f"{'rule':8} {'path':10} {'median ms':>10} {'min ms':>10}")
    for (rule, batched), (med, low) in opt.items():
        print(f"{rule:8} {'fast' if batched else 'reference':10} {med:10.2f} {low:10.2f}")
    ratio = lambda a, b: opt[a][0] / opt[b][0]  # noqa: E731
    print(f"aurora/muon: fast {ratio(('aurora', True), ('muon', True)):.3f}  "
          f"reference {ratio(('aurora', False), ('muon', False)):.3f}")
    print(f"fast/reference: aurora {ratio(('aurora', True), ('aurora', False)):.3f}  "
          f"muon {ratio(('muon', True), ('muon', False)):.3f}")

    if args.train:
        steps, flops, accum = bench_training(hp, device, args.iters, args.warmup)
        print(f"\n(b) training step: {hp.batch_tokens:,} tokens, {accum} micro-batches, one process, "
              f"{'batched' if hp.aurora_batched else 'per-matrix'} optimizer path; {flops / 1e12:.1f} TFLOP per step")
        print(f"{'rule':8} {'median ms':>10} {'min ms':>10} {'MFU':>7}")
        for rule, (med, low) in steps.items():
            mfu = f"{flops / (med / 1000) / (peak * 1e12):7.1%}" if peak else "    n/a"
            print(f"{rule:8} {med:10.2f} {low:10.2f} {mfu}")
        diff = steps["aurora"][0] - steps["muon"][0]
        print(f"aurora - muon: {diff:.2f} ms = {diff / steps['aurora'][0]:.2%} of an aurora step")


if __name__ == "__main__":
    main()
