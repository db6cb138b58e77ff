"""Published numbers printed beside ours where the protocol is comparable (sources: docs/evaluation.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    model: str
    values: dict[str, float]
    source: str


def _rows(columns: tuple[str, ...], source: str, table: dict[str, tuple[float, ...]]) -> list[Published]:
    return [Published(model, dict(zip(columns, values, strict=True)), source) for model, values in table.items()]


MMAD_COLUMNS = ("Disc", "Cls", "Loc", "Desc", "Anal", "ObjCls", "ObjAnal", "Avg")
MMAD_PAPER = "MMAD paper (ICLR 2025), 1-shot, as reproduced in jam-cc/AD-Copilot README"
MMAD_CSV = "jam-cc/MMAD all_result/answers_1_shot_*_accuracy.csv"
MMAD_1SHOT = _rows(
    MMAD_COLUMNS,
    MMAD_PAPER,
    {
        "Human expert": (95.24, 75.00, 92.31, 83.33, 94.20, 86.11, 80.37, 86.65),
        "GPT-4o": (68.63, 65.80, 55.62, 73.21, 83.41, 94.98, 82.80, 74.92),
        "Qwen2.5-VL-7B": (71.10, 56.02, 60.69, 64.13, 78.26, 91.49, 83.67, 72.19),
        "AnomalyGPT (7B)": (65.57, 27.49, 27.97, 36.86, 32.11, 29.84, 35.82, 36.52),
    },
) + _rows(
    MMAD_COLUMNS,
    MMAD_CSV,
    {
        "Qwen2-VL-7B": (68.90, 57.37, 55.36, 73.65, 80.95, 91.95, 85.47, 73.38),
        "InternVL2-8B": (59.97, 43.85, 47.91, 57.60, 78.10, 74.18, 80.37, 63.14),
    },
)

VISA_DR_COLUMNS = ("Acc", "Prec", "Rec", "F1", "LL ROUGE-L", "LL SBERT", "LL GPT-Score", "CX SBERT", "CX GPT-Score")
VISA_DR = _rows(
    VISA_DR_COLUMNS,
    "Anomaly-OV paper (CVPR 2025) Table 4",
    {
        "GPT-4o": (0.70, 0.83, 0.71, 0.68, 0.24, 0.71, 4.84, 0.81, 6.89),
        "LLaVA-OV-0.5B": (0.54, 0.70, 0.19, 0.28, 0.20, 0.63, 2.54, 0.81, 4.34),
        "LLaVA-OV-7B": (0.71, 0.95, 0.56, 0.63, 0.24, 0.66, 3.57, 0.79, 5.44),
        "Anomaly-OV-0.5B": (0.79, 0.86, 0.83, 0.82, 0.33, 0.72, 3.87, 0.83, 5.67),
        "Anomaly-OV-7B": (0.79, 0.83, 0.86, 0.83, 0.34, 0.73, 4.26, 0.84, 6.34),
    },
)

# The published zero-shot numbers are about these exact category sets; a folder in the same layout with other
# categories (e.g. the demo's textile set) is not comparable.
BENCHMARK_CATEGORIES = {
    "mvtec": frozenset(
        (
            "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush "
            "transistor wood zipper"
        ).split()
    ),
    "visa": frozenset(
        "candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum".split()
    ),
}

ZERO_SHOT_IMAGE_AUROC = _rows(
    ("mvtec", "visa"),
    "Anomaly-OV paper (CVPR 2025) Table 2, zero-shot image AUROC",
    {
        "WinCLIP": (91.8, 78.8),
        "AnomalyCLIP": (91.5, 82.1),
        "AdaCLIP": (89.2, 85.8),
        "Anomaly-OV expert": (94.0, 91.1),
    },
)
