"""The FineWeb token shard format, in one place for the trainer, the downloader and the generator.

A shard is a header of 256 little-endian int32 values (magic 20240520, version 1, token count N,
the rest zero), then N little-endian uint16 tokens: 1024 + 2N bytes in all.
"""
import json
import math
import os
import re

import numpy as np

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS


class DataError(Exception):
    """Missing, corrupt or insufficient data; the message says how to fix it."""


def read_shard_header(path):
    """Validate a shard's header and size; return its number of tokens."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: file is shorter than the {HEADER_BYTES}-byte header; "
                        "delete it and download/generate it again")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic number {header[0]} (expected {SHARD_MAGIC}); "
                        "not a FineWeb token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    n_tokens = int(header[2])
    expected, actual = HEADER_BYTES + 2 * n_tokens, os.path.getsize(path)
    if actual != expected:
        raise DataError(f"{path}: size is {actual} bytes but its header promises {n_tokens} tokens "
                        f"({expected} bytes); the file is truncated or corrupt: delete it and "
                        "download/generate it again")
    return n_tokens


def read_shard_tokens(path, vocab_size):
    """All tokens of a shard as a uint16 numpy array, checked against the model's vocabulary."""
    n_tokens = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=n_tokens, offset=HEADER_BYTES)
    if tokens.size != n_tokens:
        raise DataError(f"{path}: read {tokens.size} tokens, header says {n_tokens}")
    if n_tokens and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: token id {int(tokens.max())} >= the model's vocab_size "
                        f"{vocab_size}; use a preset whose vocabulary matches these shards")
    return tokens


def write_shard(path, tokens):
    """Write `tokens` (ints < 65536) as one shard; a crash never leaves half a shard under `path`."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must be in [0, 65536) to fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


SHARD_NAME = re.compile(r"^fineweb_(train|val)_(\d{6})\.bin$")
META = "meta.json"


def write_meta(data_dir, meta):
    """Write data_dir/meta.json atomically (a reader never sees half of it)."""
    path = os.path.join(data_dir, META)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def shard_set_problems(data_dir):
    """Why the shards in data_dir are not the set that was generated or downloaded (empty: they
    are): a gap in the numbering (train shards 1..K, val 0..K), or, when meta.json lists the files
    (data/synthetic.py and data/cached_fineweb10B.py write it), a listed shard that is missing or
    of another size, or a shard it does not list. A trainer reading the shards that remain after
    one was deleted would train on other data under the same record name."""
    try:
        names = sorted(os.listdir(data_dir))
    except OSError as e:
        return [f"cannot list {data_dir}: {e.strerror or e}"]
    problems, numbers = [], {"train": [], "val": []}
    for name in names:
        m = SHARD_NAME.match(name)
        if m:
            numbers[m.group(1)].append(int(m.group(2)))
    for split, first in (("train", 1), ("val", 0)):
        found = numbers[split]
        if found:
            missing = sorted(set(range(first, max(found) + 1)) - set(found))
            if missing:
                shown = ", ".join(f"fineweb_{split}_{i:06d}.bin" for i in missing[:3])
                problems.append(f"{len(missing)} {split} shard(s) missing from the numbering "
                                f"{first}..{max(found)}: {shown}{' ...' if len(missing) > 3 else ''}")
    path = os.path.join(data_dir, META)
    if not os.path.exists(path):
        return problems
    try:
        with open(path) as f:
            meta = json.load(f)
        files = meta.get("files") if isinstance(meta, dict) else None
        if files is not None and not (isinstance(files, dict) and all(
                isinstance(v, int) for v in files.values())):
            raise ValueError("'files' is not a mapping of names to sizes")
    except (OSError, ValueError) as e:
        return problems + [f"{path} is unreadable ({e})"]
    if files is None:
        return problems  # an older meta.json: no file list to compare with
    for name, size in sorted(files.items()):
        where = os.path.join(data_dir, name)
        if not os.path.exists(where):
            problems.append(f"{name} is listed in {META} but missing")
        elif os.path.getsize(where) != size:
            problems.append(f"{name} has {os.path.getsize(where)} bytes, {META} lists {size}")
    extra = [n for n in names if SHARD_NAME.match(n) and n not in files]
    if extra:
        problems.append(f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}: not listed in "
                        f"{META} (left from another generation or download?)")
    return problems


def batches_per_shard(n_tokens, batch):
    """How many global batches the loader reads from a shard before skipping its tail."""
    if n_tokens < batch + 1:
        return 0
    count, pos = 1, batch
    while pos + batch + 1 < n_tokens:
        count, pos = count + 1, pos + batch
    return count


def shards_needed(files, batch, steps, what):
    """The train shards `steps` batches read; fails before training, not hours in, if too few."""
    sizes, total = [], 0
    for f in files:
        sizes.append(read_shard_header(f))
        total += batches_per_shard(sizes[-1], batch)
        if total >= steps:
            return files[:len(sizes)]
    typical = max(batches_per_shard(n, batch) for n in sizes) or 1
    missing = math.ceil((steps - total) / typical)
    raise DataError(
        f"{what}: {len(files)} shard(s) hold {sum(sizes):,} tokens = {total} batches of "
        f"{batch:,} tokens, but {steps} are needed (about {missing} more shard(s) of this size). "
        "Download more with `python data/cached_fineweb10B.py N` (N = number of train shards) "
        "or generate more synthetic ones")
