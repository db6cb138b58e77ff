"""Does the demo model's heatmap point at the defect? Held-out local textile defects, peak vs speck.

The textile images carry image labels only, so the speck's position is found independently of the model
(`data.textile.speck_position`: the strongest high-frequency energy in the image). For every held-out local
defect the table reports how far the heatmap's peak lies from that point, the share of peaks within a few
radii (by chance, within 16 px of a 250 x 250 image: about 1%), and whether an ROI box contains the speck
(boxes are drawn only for flagged images, so also among those).

    python benchmarks/demo_localization.py                 # the bundled demo model, all 100 held-out specks
    python benchmarks/demo_localization.py --model DIR --limit 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.defaults import default_model_path  # noqa: E402
from assistant.engine import LocalEngine  # noqa: E402
from assistant.image_io import load_image  # noqa: E402
from data.textile import speck_position, split_paths  # noqa: E402

RADII = (8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out local defects")
    args = parser.parse_args()
    engine = LocalEngine.from_pretrained(args.model or default_model_path(), device="cpu")
    distances, in_box, flagged = [], [], []
    for path in tqdm(split_paths("test")["local_defect"][: args.limit], desc="local defects"):
        image = load_image(path)
        analysis = engine.analyze(image)
        y, x = speck_position(image)
        peak_y, peak_x = np.unravel_index(int(np.asarray(analysis.heatmap).argmax()), analysis.heatmap.shape)
        distances.append(float(np.hypot(peak_y - y, peak_x - x)))
        in_box.append(any(box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1 for box in analysis.boxes))
        flagged.append(analysis.anomalous)
    distances, in_box, flagged = np.array(distances), np.array(in_box), np.array(flagged)
    height, width = analysis.heatmap.shape
    print(f"\n{len(distances)} held-out local defects, heatmap {width}x{height} px\n")
    print("| measure | value |\n|---|---|")
    print(f"| median distance peak -> speck (px) | {np.median(distances):.1f} |")
    for radius in RADII:
        print(f"| peak within {radius} px of the speck | {np.mean(distances <= radius):.0%} |")
    print(f"| an ROI box contains the speck | {np.mean(in_box):.0%} |")
    if flagged.any():
        print(
            f"| ... of the flagged ones | {np.mean(in_box[flagged]):.0%} "
            f"({in_box[flagged].sum()} of {flagged.sum()}) |"
        )
    print(f"| verdict says anomalous | {np.mean(flagged):.0%} |")


if __name__ == "__main__":
    main()
