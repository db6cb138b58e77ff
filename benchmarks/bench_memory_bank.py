"""Speed and memory of the few-shot comparison: one query image against memory banks of 1k-100k normal patches.

For each shape (the demo's and LLaVA-OneVision-0.5B's: SigLIP-so400m's 27 x 27 patches of width 1152 at four
expert levels) and bank size, the table gives the milliseconds to compare one query image's crops with the
bank (`references.PatchBank.distances`, median of `--repeats`), the bank's memory, and the time the greedy
coreset takes to bound a bank of that size to `--bound` rows (what `enroll` does; `reference.max_patches`).
Random unit features: the cost depends on the shapes only. Run on a quiet machine; torch uses `--threads`.

    python benchmarks/bench_memory_bank.py
    python benchmarks/bench_memory_bank.py --shapes demo --sizes 1000,10000,100000 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.references import PatchBank, greedy_coreset  # noqa: E402

# (crops of a 1024 px query, patches per crop, vision width, expert levels)
SHAPES = {"demo": (5, 64, 192, 4), "anomaly-ov-0.5b": (10, 729, 1152, 4)}


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--sizes", default="1000,10000,100000", help="bank rows (patches) per scale")
    parser.add_argument("--bound", type=int, default=16384, help="coreset bound (reference.max_patches)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| shape | bank patches | bank memory (fp32 / fp16 on disk) | ms per query image | coreset to bound (s) |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        crops, patches, width, levels = SHAPES[shape]
        side = int(patches**0.5)
        query = [torch.randn(crops, patches, width) for _ in range(levels)]
        for size in (int(s) for s in args.sizes.split(",")):
            rows = torch.nn.functional.normalize(torch.randn(size, width * levels), dim=1)
            bank = PatchBank(rows, rows)  # tiles compared with the tile bank, the whole-image crop with the other
            megabytes = 2 * rows.numel() * 4 / 2**20
            milliseconds = timed(lambda: bank.distances(query, [crops], 1), args.repeats)
            coreset = "-"
            if size > args.bound:
                start = time.perf_counter()
                greedy_coreset(rows, args.bound)
                coreset = f"{time.perf_counter() - start:.1f}"
            print(
                f"| {shape} ({crops} crops x {side}x{side}, {levels} x {width}) | {size:,} | "
                f"{megabytes:,.0f} / {megabytes / 2:,.0f} MB | {milliseconds:,.1f} | {coreset} |"
            )


if __name__ == "__main__":
    main()
