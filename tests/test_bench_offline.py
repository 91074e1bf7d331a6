"""profiling/bench_offline.py: the FLOP count against a hand count, and one tiny real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "profiling") not in sys.path:
    sys.path.insert(0, str(ROOT / "profiling"))

import bench_offline as bo  # noqa: E402

from runtime.model.config import ModelConfig  # noqa: E402


def test_workload_flops_matches_a_hand_count(default_model_dir: Path) -> None:
    cfg = ModelConfig.from_dir(default_model_dir)  # SmolLM2-135M: 30 layers, 576 wide, 9/3 heads
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    per_layer = 576 * 960 + 576 * 576 + 3 * 576 * 1536  # qkv, o, gate/up/down weights
    fed = 4 + 3 - 1  # 4 prompt tokens, 3 output tokens
    attn = 4 * 9 * 64 * 30 * sum(range(1, fed + 1))  # each query over keys up to itself
    expected = 2 * (2 * per_layer * 30 * fed + attn + 2 * 576 * 49152 * 3)
    assert bo.workload_flops(cfg, 2, 4, 3) == expected


@pytest.mark.slow
def test_tiny_run_reports_ratios_per_round(tmp_path: Path, default_model_dir: Path) -> None:
    out = tmp_path / "offline.json"
    cmd = [sys.executable, str(ROOT / "profiling" / "bench_offline.py"), "--requests", "2"]
    cmd += ["--prompt-len", "16", "--output-len", "4", "--hf-batches", "2"]
    cmd += ["--hf-serial-requests", "1", "--repeats", "2", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rounds = [(r["round"], r["name"].split(" ")[0]) for r in data["results"]]
    assert rounds == [
        (0, "nurserve"),
        (0, "transformers"),
        (1, "nurserve"),
        (1, "transformers"),
    ] + [(0, "transformers")]
    assert all(r["speed_before_gflops"] > 0 and r["output_tokens"] > 0 for r in data["results"])
    assert len(data["ratios"]["best static batch"]) == 2
    assert len(data["ratios"]["transformers one at a time"]) == 1
    # greedy, fp32 on both sides, 4 tokens: the same tokens as transformers
    assert all(a["identical"] == a["compared"] for a in data["agreement"].values())
