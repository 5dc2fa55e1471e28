"""tools/gpu_check.py on a machine without CUDA: every GPU check says "skipped: no CUDA", exit 0.

The script is issue 15's one prepared GPU check; CI has no GPU, so this pins the part CI can see:
it runs end to end, writes its JSON record, and skips rather than crashes or passes vacuously.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path only")
def test_gpu_check_skips_every_check_without_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    expected = {"env", "lm_step", "te_norm_init", "rollout_pad", "fp8_shapes", "ckpt_spec", "decode_cost",
                "tests_gpu"}
    assert set(record) == expected
    for name, result in record.items():
        assert result["status"] == "SKIP", (name, result)
        assert result["reason"] == "skipped: no CUDA", (name, result)
    assert proc.stdout.count("[SKIP]") == len(expected)
