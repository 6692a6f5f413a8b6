"""Download pre-tokenized FineWeb-10B shards (GPT-2 tokens) from the Hugging Face hub.

    python data/cached_fineweb10B.py        # val shard + the 17 train shards a 3200-step record reads
    python data/cached_fineweb10B.py 103    # all of FineWeb-10B (about 20 GB)

Files go to data/fineweb10B/. Shards already there with a valid header and size are skipped;
every downloaded shard is checked the same way. Set HF_ENDPOINT to use a hub mirror.
"""
import argparse
import os
import sys

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.shards import DataError, read_shard_header  # noqa: E402  (the one shard reader)

REPO_ID = "kjj0/fineweb10B-gpt2"  # dataset repo of the published shards
MAX_TRAIN_SHARDS = 103
RECORD_TRAIN_SHARDS = 17  # 3200 steps * 524,288 tokens = 1.68B tokens, ~190 batches per shard


def shard_names(n_train):
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_train + 1)]


def is_valid(path):
    try:
        read_shard_header(path)
        return True
    except DataError:
        return False


def hub_download(name, local_dir):
    """The one network call (tests replace it)."""
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=local_dir)


def download(n_train, local_dir, fetch=None):
    """Fetch the val shard and the first n_train train shards; returns the number downloaded."""
    fetch = fetch or hub_download
    os.makedirs(local_dir, exist_ok=True)
    fetched = 0
    for name in tqdm(shard_names(n_train), desc="FineWeb shards", unit="shard"):
        path = os.path.join(local_dir, name)
        if os.path.exists(path):
            if is_valid(path):
                continue
            tqdm.write(f"{path} is corrupt or truncated: downloading it again")
            os.remove(path)
        try:
            fetch(name, local_dir)
        except Exception as e:  # huggingface_hub raises many types; all mean "not downloaded"
            raise DataError(
                f"could not download {name} from the Hugging Face hub dataset {REPO_ID} "
                f"({type(e).__name__}: {e}). Check the network connection (or set HF_ENDPOINT "
                "to a mirror), then run this command again: finished shards are kept") from None
        try:
            read_shard_header(path)
        except DataError as e:
            if os.path.exists(path):
                os.remove(path)  # never leave a bad shard where the trainer would read it
            raise DataError(f"downloaded shard failed verification: {e}") from None
        fetched += 1
    return fetched


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n_train", nargs="?", type=int, default=RECORD_TRAIN_SHARDS,
                    help=f"number of train shards (default {RECORD_TRAIN_SHARDS}: enough for the "
                         f"record's 3200 steps; at most {MAX_TRAIN_SHARDS})")
    ap.add_argument("--dir", default=os.path.join(ROOT, "data", "fineweb10B"),
                    help="destination folder (default data/fineweb10B)")
    args = ap.parse_args(argv)
    if not 1 <= args.n_train <= MAX_TRAIN_SHARDS:
        ap.error(f"n_train must be between 1 and {MAX_TRAIN_SHARDS}, got {args.n_train}")
    try:
        fetched = download(args.n_train, args.dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = len(shard_names(args.n_train))
    print(f"{args.dir}: {total} shards present and verified ({fetched} downloaded now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
