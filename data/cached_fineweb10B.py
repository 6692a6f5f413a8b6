"""Download pre-tokenized FineWeb-10B shards (GPT-2 tokens) from the Hugging Face hub.

    python data/cached_fineweb10B.py        # val shard + the 17 train shards a 3200-step record reads
    python data/cached_fineweb10B.py 103    # all of FineWeb-10B (about 20 GB)

Files go to data/fineweb10B/. Shards already there with a valid header and size are skipped;
every downloaded shard is checked the same way. Set HF_ENDPOINT to use a hub mirror.
A download that makes no progress for FINEWEB_TIMEOUT seconds (default 60) fails, naming the
endpoint: a hub or proxy that accepts connections and never answers cannot hang it. meta.json
beside the shards lists every shard present and verified, with its size (data/shards.py checks it).
"""
import argparse
import json
import math
import os
import sys
import threading
import time

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.shards import DataError, read_shard_header, write_meta  # noqa: E402  (the one shard reader)

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


DEFAULT_TIMEOUT = 60.0  # seconds without a byte of progress before a download is given up


def endpoint():
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def stall_timeout():
    text = os.environ.get("FINEWEB_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = math.nan
    if not value > 0 or value == math.inf:
        raise DataError(f"FINEWEB_TIMEOUT must be a positive number of seconds, got {text!r}")
    return value


def hub_download(name, local_dir):
    """The one network call (tests replace it). The hub client's own timeouts (per request) are
    set to FINEWEB_TIMEOUT; download() adds the overall bound on a stalled transfer."""
    timeout = stall_timeout()
    for name in ("HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT"):  # read when the hub is imported
        os.environ.setdefault(name, str(math.ceil(timeout)))  # whole seconds only
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=local_dir,
                           etag_timeout=timeout)


def progress(local_dir, name):
    """Bytes written so far for `name`: the shard itself and the hub client's partial files."""
    total = 0
    for folder, pattern in ((local_dir, name), (os.path.join(local_dir, ".cache", "huggingface",
                                                             "download"), None)):
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            for entry in entries:
                if pattern is None or entry.name == pattern:
                    try:
                        total += entry.stat().st_size if entry.is_file() else 0
                    except OSError:
                        pass
    return total


def fetch_bounded(fetch, name, local_dir, timeout, poll=0.2):
    """fetch(name, local_dir) in a daemon thread; TimeoutError when no byte arrives for `timeout`
    seconds (the thread is abandoned: the process exits with the error). Returns or re-raises
    what fetch did."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fetch(name, local_dir)
        except BaseException as e:  # noqa: B036  (handed to the caller)
            outcome["error"] = e

    worker = threading.Thread(target=target, name=f"download {name}", daemon=True)
    worker.start()
    seen, last = progress(local_dir, name), time.monotonic()
    while worker.is_alive():
        worker.join(poll)
        now = progress(local_dir, name)
        if now != seen:
            seen, last = now, time.monotonic()
        elif worker.is_alive() and time.monotonic() - last > timeout:
            raise TimeoutError(f"no progress for {timeout:g} s ({seen:,} bytes received); "
                               "FINEWEB_TIMEOUT sets this limit")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def download(n_train, local_dir, fetch=None):
    """Fetch the val shard and the first n_train train shards; returns the number downloaded."""
    fetch = fetch or hub_download
    timeout = stall_timeout()
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
            fetch_bounded(fetch, name, local_dir, timeout)
        except Exception as e:  # huggingface_hub raises many types; all mean "not downloaded"
            where = (f"HF_ENDPOINT={os.environ['HF_ENDPOINT']}" if os.environ.get("HF_ENDPOINT")
                     else f"{endpoint()}, HF_ENDPOINT unset")
            raise DataError(
                f"could not download {name} from the Hugging Face hub dataset {REPO_ID} at "
                f"{where} ({type(e).__name__}: {e}). Check the network connection (or set "
                "HF_ENDPOINT to a mirror), then run this command again: finished shards are "
                "kept") from None
        try:
            read_shard_header(path)
        except DataError as e:
            if os.path.exists(path):
                os.remove(path)  # never leave a bad shard where the trainer would read it
            raise DataError(f"downloaded shard failed verification: {e}") from None
        fetched += 1
    record_shards(local_dir)
    return fetched


def record_shards(local_dir):
    """meta.json: every shard now in local_dir (all verified), with its size, so that a later
    check sees a deleted or foreign shard. Shards listed before stay listed (a missing one is then
    reported, and this command fetches it again)."""
    path = os.path.join(local_dir, "meta.json")
    try:
        with open(path) as f:
            old = json.load(f)
        files = dict(old.get("files", {})) if isinstance(old, dict) else {}
    except (OSError, ValueError, AttributeError, TypeError):
        files = {}
    for name in sorted(os.listdir(local_dir)):
        if name.startswith("fineweb_") and name.endswith(".bin"):
            files[name] = os.path.getsize(os.path.join(local_dir, name))
    write_meta(local_dir, dict(source=f"huggingface dataset {REPO_ID}", files=files))


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
