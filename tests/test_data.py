"""Shard format, the per-rank loader, the synthetic generator and the FineWeb downloader."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from data import cached_fineweb10B
from data.shards import (DataError, batches_per_shard, read_shard_header, read_shard_tokens, shard_set_problems,
                         shards_needed, write_shard)
from data.synthetic import Generator, main as synthetic_main
from harness import find_shards
from train_gpt import Context, TokenLoader, load_shard


def make_loader(files, batch, rank, world, vocab):
    return TokenLoader(files, batch, Context(rank, world, torch.device("cpu"), 1, 1), vocab)


def shard(tmp_path, name, tokens):
    path = str(tmp_path / name)
    write_shard(path, np.asarray(tokens))
    return path


def test_round_trip(tmp_path):
    path = shard(tmp_path, "fineweb_train_000001.bin", np.arange(1000) % 500)
    assert os.path.getsize(path) == 1024 + 2 * 1000
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, 1000]
    assert read_shard_header(path) == 1000
    assert load_shard(path).tolist() == (np.arange(1000) % 500).tolist()


def corrupt(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], dtype="<i4").tobytes())


def test_bad_magic(tmp_path):
    path = shard(tmp_path, "a.bin", np.zeros(10))
    corrupt(path, 0, 12345)
    with pytest.raises(DataError, match="bad magic number 12345"):
        read_shard_header(path)


def test_bad_version(tmp_path):
    path = shard(tmp_path, "a.bin", np.zeros(10))
    corrupt(path, 4, 7)
    with pytest.raises(DataError, match="unsupported shard version 7"):
        read_shard_header(path)


def test_truncated_shard(tmp_path):
    path = shard(tmp_path, "a.bin", np.zeros(100))
    with open(path, "r+b") as f:
        f.truncate(1024 + 150)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_shard_header(path)


def test_file_shorter_than_header(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(DataError, match="shorter than the 1024-byte header"):
        read_shard_header(str(path))


def test_token_outside_vocabulary(tmp_path):
    path = shard(tmp_path, "a.bin", [1, 2, 50256])
    with pytest.raises(DataError, match="token id 50256 >= the model's vocab_size 1024"):
        read_shard_tokens(path, vocab_size=1024)


def test_missing_shards_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="cached_fineweb10B.py.*synthetic.py"):
        find_shards(str(tmp_path), "train")


def test_loader_slices_per_rank_and_skips_shard_tails(tmp_path):
    # Two shards with token i at position i (shard 2 offset by 1000) make slices readable.
    f1 = shard(tmp_path, "fineweb_train_000001.bin", np.arange(100))
    f2 = shard(tmp_path, "fineweb_train_000002.bin", 1000 + np.arange(100))
    batch, world = 16, 4
    loaders = [make_loader([f1, f2], batch, r, world, 2000) for r in range(world)]
    steps_in_shard1 = batches_per_shard(100, batch)
    assert steps_in_shard1 == 6  # reads at 0..80; 96 + 16 + 1 >= 100, so the tail 96..99 is skipped
    for step in range(steps_in_shard1 + 2):
        base = step * batch if step < steps_in_shard1 else 1000 + (step - steps_in_shard1) * batch
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            start = base + r * (batch // world)
            assert x.tolist() == list(range(start, start + 4))
            assert y.tolist() == list(range(start + 1, start + 5))  # targets shifted by one
            assert x.dtype == torch.int32 and y.dtype == torch.int64  # as the record


def test_loader_one_rank_reads_what_all_ranks_read(tmp_path):
    f = shard(tmp_path, "fineweb_train_000001.bin", np.arange(500))
    one = make_loader([f], 32, 0, 1, 1000)
    two = [make_loader([f], 32, r, 2, 1000) for r in range(2)]
    for _ in range(3):
        x, y = one.next_batch()
        parts = [loader.next_batch() for loader in two]
        assert x.tolist() == parts[0][0].tolist() + parts[1][0].tolist()
        assert y.tolist() == parts[0][1].tolist() + parts[1][1].tolist()


def test_too_few_tokens_says_how_many_shards_are_missing(tmp_path):
    files = [shard(tmp_path, f"fineweb_train_{i:06d}.bin", np.zeros(1000)) for i in (1, 2)]
    per_shard = batches_per_shard(1000, 100)
    assert shards_needed(files, 100, per_shard, "train") == files[:1]  # only what the run reads
    assert shards_needed(files, 100, 2 * per_shard, "train") == files  # exactly enough: fine
    with pytest.raises(DataError, match=r"but 40 are needed \(about 3 more shard"):
        shards_needed(files, 100, 40, "train")


def test_synthetic_is_deterministic_learnable_and_in_shard_format(tmp_path):
    args = ["--train-shards", "2", "--shard-tokens", "20000", "--val-tokens", "5000", "--vocab", "256"]
    synthetic_main(["--out", str(tmp_path / "a")] + args)
    synthetic_main(["--out", str(tmp_path / "b")] + args)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["fineweb_train_000001.bin", "fineweb_train_000002.bin",
                     "fineweb_val_000000.bin", "meta.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tokens = load_shard(str(tmp_path / "a" / "fineweb_train_000001.bin")).numpy()
    assert len(tokens) == 20000 and tokens[0] == 255  # documents start with eot = vocab - 1
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    # Real structure: the process entropy is far below a uniform distribution's log(vocab) ...
    assert meta["entropy_nats_per_token"] < 0.6 * np.log(256)
    # ... and a plain bigram count model already beats the unigram entropy clearly.
    uni = np.bincount(tokens, minlength=256) / len(tokens)
    h_uni = -(uni[uni > 0] * np.log(uni[uni > 0])).sum()
    pairs = np.zeros((256, 256))
    np.add.at(pairs, (tokens[:-1], tokens[1:]), 1)
    cond = pairs / pairs.sum(1, keepdims=True).clip(1)
    h_bi = -(pairs * np.log(np.where(cond > 0, cond, 1))).sum() / pairs.sum()
    assert h_bi < h_uni - 0.5


def test_synthetic_vocab_must_fit_uint16():
    with pytest.raises(ValueError, match="vocab"):
        Generator(vocab=70000)


# --- the downloader, with only the network call replaced by a local "hub" folder ---

@pytest.fixture
def fake_hub(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in cached_fineweb10B.shard_names(3):
        shard(hub, name, np.arange(64))
    calls = []

    def fetch(name, local_dir):
        calls.append(name)
        shutil.copy(hub / name, os.path.join(local_dir, name))

    return hub, fetch, calls


def test_download_fetches_verifies_and_skips_valid_shards(tmp_path, fake_hub):
    hub, fetch, calls = fake_hub
    out = str(tmp_path / "fineweb10B")
    assert cached_fineweb10B.download(2, out, fetch) == 3
    assert calls == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    calls.clear()
    assert cached_fineweb10B.download(3, out, fetch) == 1  # only the new one
    assert calls == ["fineweb_train_000003.bin"]


def test_download_replaces_a_corrupt_local_shard(tmp_path, fake_hub):
    hub, fetch, calls = fake_hub
    out = tmp_path / "fineweb10B"
    out.mkdir()
    (out / "fineweb_val_000000.bin").write_bytes(b"garbage")
    cached_fineweb10B.download(1, str(out), fetch)
    assert "fineweb_val_000000.bin" in calls
    assert read_shard_header(str(out / "fineweb_val_000000.bin")) == 64


def test_download_rejects_a_bad_download(tmp_path, fake_hub):
    hub, fetch, calls = fake_hub
    with open(hub / "fineweb_train_000001.bin", "r+b") as f:
        f.truncate(2000)
    out = tmp_path / "fineweb10B"
    with pytest.raises(DataError, match="failed verification.*truncated"):
        cached_fineweb10B.download(1, str(out), fetch)
    assert not (out / "fineweb_train_000001.bin").exists()  # never left for the trainer
    assert (out / "fineweb_val_000000.bin").exists()  # earlier good shards are kept


def test_download_reports_an_unreachable_hub(tmp_path, capsys, monkeypatch):
    def offline(name, local_dir):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(cached_fineweb10B, "hub_download", offline)
    assert cached_fineweb10B.main(["2", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "could not download fineweb_val_000000.bin" in err and "kjj0/fineweb10B-gpt2" in err
    assert "ConnectionError" in err


def test_download_bounds_a_hub_that_accepts_and_never_answers(tmp_path):
    """The real hub client against a local server that accepts connections and never answers:
    the download gives up after FINEWEB_TIMEOUT seconds without progress, naming HF_ENDPOINT."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop, held = threading.Event(), []

    def accept():  # accepts and holds every connection, never answers; stops itself after 60 s
        end = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < end:
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = dict(os.environ, HF_ENDPOINT=endpoint, FINEWEB_TIMEOUT="1.5", HF_HUB_OFFLINE="0")
    for name in ("HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT"):
        env.pop(name, None)
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, cached_fineweb10B.__file__, "1", "--dir", str(tmp_path)],
                              capture_output=True, text=True, env=env, timeout=60)
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"HF_ENDPOINT={endpoint}" in proc.stderr and "no progress for 1.5 s" in proc.stderr
    assert held and took < 20, took  # it did connect; a few seconds, not minutes


def test_download_timeout_setting_is_checked(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("FINEWEB_TIMEOUT", "soon")
    with pytest.raises(DataError, match="FINEWEB_TIMEOUT must be a positive number"):
        cached_fineweb10B.download(1, str(tmp_path), fake_hub[1])


def test_download_lists_its_shards_in_meta_json(tmp_path, fake_hub):
    out = tmp_path / "fineweb10B"
    cached_fineweb10B.download(2, str(out), fake_hub[1])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"] == {n: 1024 + 2 * 64 for n in cached_fineweb10B.shard_names(2)}
    assert shard_set_problems(str(out)) == []
    os.remove(out / "fineweb_train_000001.bin")
    assert shard_set_problems(str(out)) == [
        "1 train shard(s) missing from the numbering 1..2: fineweb_train_000001.bin",
        "fineweb_train_000001.bin is listed in meta.json but missing"]
    cached_fineweb10B.download(2, str(out), fake_hub[1])  # what the message says to do: run it again
    assert shard_set_problems(str(out)) == []


def test_shard_set_problems(tmp_path):
    for i in (1, 2, 4):
        shard(tmp_path, f"fineweb_train_{i:06d}.bin", np.zeros(10))
    assert shard_set_problems(str(tmp_path)) == [
        "1 train shard(s) missing from the numbering 1..4: fineweb_train_000003.bin"]  # no meta.json
    (tmp_path / "meta.json").write_text(json.dumps(dict(files={
        "fineweb_train_000001.bin": 1044, "fineweb_train_000002.bin": 999, "fineweb_train_000003.bin": 1044})))
    assert shard_set_problems(str(tmp_path))[1:] == [
        "fineweb_train_000002.bin has 1044 bytes, meta.json lists 999",
        "fineweb_train_000003.bin is listed in meta.json but missing",
        "fineweb_train_000004.bin: not listed in meta.json (left from another generation or download?)"]
    (tmp_path / "meta.json").write_text("[1, 2")
    assert "meta.json is unreadable" in shard_set_problems(str(tmp_path))[-1]


def test_synthetic_if_needed_regenerates_a_folder_that_lost_a_shard(tmp_path, capsys, monkeypatch):
    import data.synthetic  # the tokens themselves are tested above: a fast stand-in here
    monkeypatch.setattr(data.synthetic, "make_tokens",
                        lambda gen, n, seed: (np.arange(n) * seed % 255, 1.0, 1))
    out = tmp_path / "syn"
    args = ["--out", str(out), "--train-shards", "3", "--shard-tokens", "3000", "--val-tokens", "2000",
            "--if-needed"]
    synthetic_main(args)
    assert "wrote 4 shards" in capsys.readouterr().out
    first = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".bin")}
    synthetic_main(args)
    assert "present and verified" in capsys.readouterr().out
    os.remove(out / "fineweb_train_000002.bin")  # what a corrupt shard's error message advises
    synthetic_main(args)
    said = capsys.readouterr().out
    assert "fineweb_train_000002.bin" in said and "writing the synthetic shards again" in said
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".bin")} == first
    assert shard_set_problems(str(out)) == []
    # fewer shards than before: the earlier generation's extra shard does not stay behind
    synthetic_main(args[:3] + ["2"] + args[4:])
    assert "other settings (train_shards 3 -> 2)" in capsys.readouterr().out
    assert not (out / "fineweb_train_000003.bin").exists() and shard_set_problems(str(out)) == []


def test_the_trainer_refuses_an_incomplete_shard_set_and_names_the_fix(tmp_path):
    synthetic = tmp_path / "syn"
    synthetic.mkdir()
    for i in (0, 1, 3):  # train shard 2 missing from the numbering
        write_shard(str(synthetic / f"fineweb_{'val' if i == 0 else 'train'}_{i:06d}.bin"), np.arange(3000) % 50)
    (synthetic / "meta.json").write_text(json.dumps({"entropy_nats_per_token": 1.0}))
    with pytest.raises(DataError) as e:
        find_shards(str(synthetic), "train")
    assert "fineweb_train_000002.bin" in str(e.value)
    assert f"python data/synthetic.py --out {synthetic} --if-needed" in str(e.value)
    os.remove(synthetic / "meta.json")  # no generator's meta.json: FineWeb's download is the fix
    with pytest.raises(DataError) as e:
        find_shards(str(synthetic), "val")
    assert "python data/cached_fineweb10B.py" in str(e.value) and "missing" in str(e.value)
