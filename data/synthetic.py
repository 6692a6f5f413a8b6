"""Synthetic token shards in the real FineWeb shard format, for smoke runs and tests.

    python data/synthetic.py                      # data/synthetic/: 2 train shards + 1 val shard
    python data/synthetic.py --out DIR --train-shards 4 --shard-tokens 2000000 --vocab 1024
    python data/synthetic.py --if-needed          # only when the folder does not hold exactly these

The text is drawn from a seeded generator with structure a small GPT can learn at several ranges,
so its loss falls clearly within a few hundred steps:
  * heavy-tailed (Zipf) token frequencies;
  * a bigram rule (each token has 4 favoured successors, Zipf-weighted);
  * a trigram rule (hashed pairs of the last two tokens have 2 favoured successors);
  * a long-range copy rule (repeat the token `lag` positions back; `lag` in 8..64 is drawn per
    document), which only attention can exploit.
Documents start with the end-of-text token, which is the LAST id of the vocabulary (vocab - 1),
so a model with `vocab` embeddings can read these shards; real FineWeb uses 50256.

Because the generator knows the probability of each token it emits, it also reports the
entropy of the process (the mean -log p of the emitted tokens): no model can beat that loss on
average. It is printed and stored in `meta.json` beside the shards, with the generator's settings
and the name and size of every shard written (meta.json is written last: without it, or when the
shards no longer match it, e.g. one was deleted, the folder is not a finished generation and
--if-needed writes it again; the shards are deterministic, so the data is the same).
"""
import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import (DataError, META, SHARD_NAME, read_shard_header, shard_set_problems,  # noqa: E402
                         write_meta, write_shard)  # the one shard format of the project

# Probabilities of the four rules for each next token (the rest of the mass is the unigram).
P_BIGRAM, P_TRIGRAM, P_COPY = 0.45, 0.25, 0.15
N_BIGRAM, N_TRIGRAM, TRIGRAM_BUCKETS = 4, 2, 8192
MEAN_DOC_LEN = 256


def zipf(n, s=1.1):
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


class Generator:
    """The tables of one synthetic language (fixed by `seed`), and a sampler of token streams."""

    def __init__(self, vocab=1024, seed=0):
        if vocab < 16 or vocab > 2**16:
            raise ValueError(f"vocab must be in [16, 65536], got {vocab}")
        rng = np.random.default_rng(seed)
        self.vocab, self.eot = vocab, vocab - 1
        n = vocab - 1  # content tokens are 0 .. vocab-2
        self.unigram = zipf(n)[rng.permutation(n)]  # frequent ids scattered over the range
        self.bigram = rng.choice(n, size=(n, N_BIGRAM), p=self.unigram)
        self.bigram_p = zipf(N_BIGRAM, 1.0)
        self.trigram = rng.choice(n, size=(TRIGRAM_BUCKETS, N_TRIGRAM), p=self.unigram)
        self.trigram_p = zipf(N_TRIGRAM, 1.0)

    def streams(self, n_streams, length, seed):
        """`n_streams` token streams of `length`, each a run of documents; also the total
        -log p of the emitted content tokens and their count (for the entropy)."""
        rng = np.random.default_rng(seed)
        n = self.vocab - 1
        out = np.empty((n_streams, length), dtype=np.int64)
        rows = np.arange(n_streams)
        cum_uni = np.cumsum(self.unigram)
        nll, count = 0.0, 0
        pos = np.zeros(n_streams, dtype=np.int64)  # position inside the current document
        lag = rng.integers(8, 65, size=n_streams)
        for t in tqdm(range(length), desc="generating", leave=False, mininterval=1.0):
            new_doc = (pos == 0) | (rng.random(n_streams) < 1.0 / MEAN_DOC_LEN)
            if t == 0:
                new_doc[:] = True
            p1 = out[:, t - 1] if t >= 1 else np.zeros(n_streams, dtype=np.int64)
            p2 = out[:, t - 2] if t >= 2 else np.zeros(n_streams, dtype=np.int64)
            p1c, p2c = np.minimum(p1, n - 1), np.minimum(p2, n - 1)  # eot has its own tables too
            bucket = (p2c * 7919 + p1c * 104729) % TRIGRAM_BUCKETS
            copy_src = np.where(t - lag >= 0, out[rows, np.maximum(t - lag, 0)], 0)
            copy_ok = (pos >= lag) & (copy_src != self.eot)
            # Pick a rule per stream, then a token from that rule.
            u = rng.random(n_streams)
            use_copy = copy_ok & (u < P_COPY)
            use_bi = ~use_copy & (u >= P_COPY) & (u < P_COPY + P_BIGRAM)
            use_tri = ~use_copy & (u >= P_COPY + P_BIGRAM) & (u < P_COPY + P_BIGRAM + P_TRIGRAM)
            tok = np.searchsorted(cum_uni, rng.random(n_streams) * cum_uni[-1]).clip(0, n - 1)
            bi_k = rng.choice(N_BIGRAM, size=n_streams, p=self.bigram_p)
            tri_k = rng.choice(N_TRIGRAM, size=n_streams, p=self.trigram_p)
            tok = np.where(use_bi, self.bigram[p1c, bi_k], tok)
            tok = np.where(use_tri, self.trigram[bucket, tri_k], tok)
            tok = np.where(use_copy, copy_src, tok)
            # Exact probability of `tok` under the mixture the stream was sampled from.
            p_copy = np.where(copy_ok, P_COPY, 0.0)
            p_uni = 1.0 - P_BIGRAM - P_TRIGRAM - p_copy
            prob = p_uni * self.unigram[tok]
            prob += P_BIGRAM * (self.bigram[p1c] == tok[:, None]) @ self.bigram_p
            prob += P_TRIGRAM * (self.trigram[bucket] == tok[:, None]) @ self.trigram_p
            prob += p_copy * (copy_src == tok)
            content = ~new_doc
            nll -= np.log(prob[content]).sum()
            count += int(content.sum())
            out[:, t] = np.where(new_doc, self.eot, tok)
            lag = np.where(new_doc, rng.integers(8, 65, size=n_streams), lag)
            pos = np.where(new_doc, 1, pos + 1)
        return out, nll, count


def make_tokens(gen, n_tokens, seed, stream_len=2048):
    streams = -(-n_tokens // stream_len)
    out, nll, count = gen.streams(streams, stream_len, seed)
    return out.reshape(-1)[:n_tokens], nll, count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic"),
                    help="output folder (default: data/synthetic)")
    ap.add_argument("--train-shards", type=int, default=2, help="number of train shards (default 2)")
    ap.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per train shard")
    ap.add_argument("--val-tokens", type=int, default=262_144, help="tokens in the val shard")
    ap.add_argument("--vocab", type=int, default=1024, help="vocabulary size; eot = vocab-1")
    ap.add_argument("--seed", type=int, default=0, help="seed of the language and the samples")
    ap.add_argument("--if-needed", action="store_true", help="do nothing when the folder already "
                    "holds exactly these shards (meta.json's settings and file list match, every "
                    "header is valid); otherwise say why and write them again")
    args = ap.parse_args(argv)
    if args.train_shards < 1 or args.shard_tokens < 1 or args.val_tokens < 1:
        ap.error("--train-shards, --shard-tokens and --val-tokens must be positive")
    settings = dict(vocab=args.vocab, eot=args.vocab - 1, seed=args.seed, train_shards=args.train_shards,
                    shard_tokens=args.shard_tokens, val_tokens=args.val_tokens)
    jobs = [("fineweb_val_000000.bin", args.val_tokens)]
    jobs += [(f"fineweb_train_{i:06d}.bin", args.shard_tokens) for i in range(1, args.train_shards + 1)]
    if args.if_needed:
        why = not_current(args.out, settings, jobs)
        if why is None:
            print(f"{args.out}: synthetic shards present and verified")
            return
        print(f"{args.out}: {why}: writing the synthetic shards again (the same data: the "
              "generator is deterministic)")
    os.makedirs(args.out, exist_ok=True)
    meta_path = os.path.join(args.out, META)
    if os.path.exists(meta_path):  # from here until the new meta.json, not a finished generation
        with open(meta_path) as f:
            old_meta = f.read()
        os.remove(meta_path)
        if "entropy_nats_per_token" in old_meta:  # an earlier generation here: drop its extra shards
            wanted = {name for name, _ in jobs}
            for name in os.listdir(args.out):
                if SHARD_NAME.match(name) and name not in wanted:
                    os.remove(os.path.join(args.out, name))
    gen = Generator(args.vocab, args.seed)
    total_nll, total_count = 0.0, 0
    for k, (name, n) in enumerate(tqdm(jobs, desc="shards")):
        tokens, nll, count = make_tokens(gen, n, seed=args.seed * 1000 + k + 1)
        write_shard(os.path.join(args.out, name), tokens)
        total_nll, total_count = total_nll + nll, total_count + count
    entropy = total_nll / max(total_count, 1)
    files = {name: os.path.getsize(os.path.join(args.out, name)) for name, _ in jobs}
    write_meta(args.out, dict(settings, entropy_nats_per_token=round(entropy, 4),
                              generator="data/synthetic.py", files=files))
    print(f"wrote {len(jobs)} shards to {args.out} (vocab {args.vocab}); "
          f"process entropy {entropy:.4f} nats/token (the best achievable loss on content tokens)")


def not_current(out, settings, jobs):
    """None when `out` holds exactly the shards these settings write; else why not."""
    path = os.path.join(out, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return "no meta.json (never generated, or interrupted)"
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    if not isinstance(meta, dict) or "files" not in meta:
        return "meta.json lists no files (an older generation)"
    changed = [k for k, v in settings.items() if meta.get(k) != v]
    if changed:
        return "other settings (" + ", ".join(f"{k} {meta.get(k)} -> {settings[k]}" for k in changed) + ")"
    if sorted(meta["files"]) != sorted(name for name, _ in jobs):
        return "meta.json lists other files"
    problems = shard_set_problems(out)
    for name, _ in jobs if not problems else ():
        try:
            read_shard_header(os.path.join(out, name))
        except DataError as e:
            problems.append(str(e))
    return "; ".join(problems) if problems else None


if __name__ == "__main__":
    main()
