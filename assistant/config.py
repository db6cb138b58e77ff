"""Configuration of the assistant: LLaVA-OneVision plus the anomaly expert and the ROI tokenizer.

The expert and ROI settings are plain dataclasses so they can be read, validated and documented on their
own; the transformers config stores them as dicts so `save_pretrained` writes everything into one
`config.json` next to the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from transformers import AutoConfig, LlavaOnevisionConfig

SUSPICION_ADVERBS = ("slightly", "moderately", "highly")


@dataclass
class ExpertConfig:
    """Look-Twice Feature Matching + Visual Token Selector (Anomaly-OV)."""

    # Indices into the vision tower's `hidden_states` (0 = embeddings), i.e. Anomaly-OV's encoder layers
    # 6/12/18/24 of SigLIP-so400m. Tiny test towers use small indices.
    feature_layers: list[int] = field(default_factory=lambda: [7, 13, 19, 25])
    embedding_dim: int = 512
    class_dim: int = 512
    attention_dim: int = 512
    predictor_dim: int = 512
    pooled_side: int = 2  # 2x2 selected tokens per crop
    temperature: float = 100.0
    # The score picks the adverb of "with {adverb} suspicious features: ": below low -> "slightly",
    # below high -> "moderately", else "highly" (Anomaly-OV's strict comparisons).
    suspicion_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.7])
    # Platt scaling of the expert logit for the user-facing score: sigmoid(scale * logit + shift),
    # fitted on a validation split (`anomaly-assistant eval calibrate`); the identity until then.
    score_scale: float = 1.0
    score_shift: float = 0.0
    # Calibrated score at or above which the verdict says "anomalous".
    decision_threshold: float = 0.5

    def __post_init__(self) -> None:
        low, high = self.suspicion_thresholds
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f"suspicion_thresholds must satisfy 0 <= low <= high <= 1, got {self.suspicion_thresholds}"
            )
        if self.pooled_side < 1:
            raise ValueError("pooled_side must be >= 1")


@dataclass
class RoiConfig:
    """Expert-guided region-of-interest tokens (Triad)."""

    enabled: bool = True
    max_boxes: int = 4  # fixed number of ROI crops per query image (keeps token counts static)
    threshold_ratio: float = 0.9  # binarise the map at min + ratio * (max - min)
    merge_overlap: float = 0.1  # merge boxes whose intersection / smaller area exceeds this
    pool: int = 2  # average pooling of each ROI crop's token grid
    newline: bool = False  # image_newline after every pooled row (Triad's 0-shot setting has none)
    source_max_side: int = 1024  # ROI crops are cut from the image scaled so its long side is at most this
    map_source: Literal["expert", "external"] = "expert"  # "external": maps come with the inputs (e.g. CLIP)

    def __post_init__(self) -> None:
        if self.max_boxes < 1:
            raise ValueError("max_boxes must be >= 1 (disable ROI tokens with enabled=False)")
        if not 0.0 < self.threshold_ratio < 1.0:
            raise ValueError("threshold_ratio must be in (0, 1)")
        if self.map_source not in ("expert", "external"):
            raise ValueError(f"map_source must be 'expert' or 'external', got {self.map_source!r}")


class AssistantConfig(LlavaOnevisionConfig):
    """LLaVA-OneVision config extended with the anomaly expert, ROI tokens and the suspicion phrase.

    The phrase "with {adverb} suspicious features:" is stored as token ids so the model (and the vLLM
    plugin) can write the chosen adverb's embeddings without a tokenizer at run time.
    """

    model_type = "anomaly_assistant"

    expert: dict | None = None
    roi: dict | None = None
    phrase_prefix_ids: list | None = None  # tokens of "with"
    adverb_token_ids: list | None = None  # three equal-length id lists: slightly, moderately, highly
    phrase_suffix_ids: list | None = None  # tokens of " suspicious features:"
    image_mean: list | None = None  # normalisation of ROI crops, copied from the image processor
    image_std: list | None = None

    def __post_init__(self, **kwargs):
        self.expert = asdict(ExpertConfig(**(self.expert or {})))
        self.roi = asdict(RoiConfig(**(self.roi or {})))
        self.phrase_prefix_ids = list(self.phrase_prefix_ids or [])
        self.phrase_suffix_ids = list(self.phrase_suffix_ids or [])
        self.adverb_token_ids = [list(ids) for ids in (self.adverb_token_ids or [[], [], []])]
        if len(self.adverb_token_ids) != len(SUSPICION_ADVERBS):
            raise ValueError("adverb_token_ids needs one id list per adverb (slightly, moderately, highly)")
        if len({len(ids) for ids in self.adverb_token_ids}) != 1:
            raise ValueError("adverb_token_ids must all have the same length (pad when tokenizing)")
        self.image_mean = list(self.image_mean or [0.5, 0.5, 0.5])
        self.image_std = list(self.image_std or [0.5, 0.5, 0.5])
        super().__post_init__(**kwargs)

    @property
    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(**self.expert)

    @property
    def roi_config(self) -> RoiConfig:
        return RoiConfig(**self.roi)

    @property
    def crop_size(self) -> int:
        return self.vision_config.image_size

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size


AutoConfig.register(AssistantConfig.model_type, AssistantConfig)
