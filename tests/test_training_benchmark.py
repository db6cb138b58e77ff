"""The training benchmark runs (on CPU it measures the tiny model through the same code path)."""

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_training.py"


def test_benchmark_prints_a_table(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_training", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    if torch.cuda.is_available():
        table = bench.main(["--steps", "2", "--warmup", "1", "--cases", "lora-0.5b"])
        assert "| lora-0.5b |" in table
        return
    table = bench.main(["--steps", "2", "--warmup", "1"])
    header, rule, row = table.splitlines()[1:4]
    assert "step (s)" in header and "tokens/s" in header and "peak reserved (GB)" in header
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "lora-tiny (cpu)" and float(cells[5]) > 0 and float(cells[8]) > 0
    assert int(cells[4].replace(",", "")) > 0  # labelled answer tokens
