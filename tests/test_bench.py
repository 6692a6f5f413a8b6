"""tools/bench.py --size small runs on the CPU and prints its tables."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_small_on_cpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--size", "small",
                           "--device", "cpu", "--iters", "2", "--warmup", "1", "--train"],
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
