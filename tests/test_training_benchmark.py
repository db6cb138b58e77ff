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


def test_data_pipeline_benchmark_prints_its_table(monkeypatch, capsys):
    path = SCRIPT.with_name("bench_data_pipeline.py")
    spec = importlib.util.spec_from_file_location("bench_data_pipeline", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_data_pipeline", bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "GPU_TOKENS_PER_SECOND", 10**9)  # no waiting for the simulated GPU step
    assert bench.main(["--images", "3", "--sides", "512", "--workers", "0", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| workers |") and [row.split("|")[1].strip() for row in rows[1:3]] == ["0", "1"]
    assert all(float(row.split("|")[3]) > 0 for row in rows[1:3])
