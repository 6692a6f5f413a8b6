"""tools/bench.py --size small runs on the CPU and prints its tables."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_small_on_cpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--size", "small",
                           "--device", "cpu", "--iters", "1", "--warmup", "0", "--train"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "optimizer step over 24 block matrices" in out
    for rule in ("muon", "aurora"):
        for path in ("reference", "fast"):
            assert re.search(rf"^{rule}\s+{path}\s+\d+\.\d\d\s+\d+\.\d\d$", out, re.M), out
    assert re.search(r"^aurora/muon: fast \d\.\d{3}  reference \d\.\d{3}$", out, re.M)
    assert re.search(r"^fast/reference: aurora \d\.\d{3}  muon \d\.\d{3}$", out, re.M)
    assert re.search(r"^aurora\s+\d+\.\d\d\s+\d+\.\d\d\s+n/a$", out, re.M)  # no MFU without a peak
    assert "aurora - muon:" in out


def test_gpu_ablation_script_smoke_on_cpu(tmp_path):
    """tools/gpu_ablation.sh end to end with the tiny preset (smallest shapes), so a GPU session can
    trust it; it runs tools/ablate.py end to end (a run per optimizer, table, figures)."""
    import tarfile
    env = dict(os.environ, PRESET="tiny", VOCAB="1024", SHARD_TOKENS="200000", PYTEST="0",
               DATA=str(tmp_path / "data"), CUDA_VISIBLE_DEVICES="",
               TRAIN_FLAGS="--n-layer 1 --d-model 64 --head-dim 16 --val-tokens 4096 --diag-tokens 4096")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_ablation.sh"), str(out), "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "ablate.txt").read_text()
    for name in ("muon", "normuon", "aurora"):
        assert re.search(rf"^\| {name} \| \d+\.\d{{5}} \|", table, re.M), table
    with tarfile.open(out / "ablation.tar.gz") as tar:
        names = tar.getnames()
        for png in ("val_loss.png", "dead.png"):
            assert tar.extractfile(f"ablation_tiny/{png}").read()[:4] == b"\x89PNG", png
        table_md = tar.extractfile("ablation_tiny/ablation.md").read().decode()
    assert all(f"| {name} | " in table_md for name in ("muon", "normuon", "aurora")), table_md
    assert sum(n.endswith(".jsonl") for n in names) == 3
