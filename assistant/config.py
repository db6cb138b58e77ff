"""Configuration of the assistant: LLaVA-OneVision plus the anomaly expert and the ROI tokenizer.

The expert, ROI and decision settings are typed sub-configs (pydantic models, unknown keys rejected) held by
`AssistantConfig` as objects and written into the one `config.json` next to the weights. They are frozen:
a run changes them only through `Settings` (`AssistantConfig.apply_settings`), the one override path that the
CLI (`--set roi.enabled=false`), the app, the server and the training YAML (`model.settings`) share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_serializer, model_validator
from transformers import AutoConfig, LlavaOnevisionConfig

from .errors import AssistantError

SUSPICION_ADVERBS = ("slightly", "moderately", "highly")


class SettingsError(AssistantError, ValueError):
    """An expert/ROI/decision setting that does not exist or has a wrong value, named by its key path."""


def validation_message(error: ValidationError, prefix: str = "") -> str:
    """pydantic's first error as one line: `roi.max_boxes: Input should be greater than or equal to 1`."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


class _SubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertConfig(_SubConfig):
    """Look-Twice Feature Matching + Visual Token Selector (Anomaly-OV)."""

    # Indices into the vision tower's `hidden_states` (0 = embeddings), i.e. Anomaly-OV's encoder layers
    # 6/12/18/24 of SigLIP-so400m. Tiny test towers use small indices.
    feature_layers: list[int] = Field(default_factory=lambda: [7, 13, 19, 25], min_length=1)
    embedding_dim: int = Field(512, ge=1)
    class_dim: int = Field(512, ge=1)
    attention_dim: int = Field(512, ge=1)
    predictor_dim: int = Field(512, ge=1)
    pooled_side: int = Field(2, ge=1)  # 2x2 selected tokens per crop
    # The suspicion phrase and the expert's tokens go into the LLM input (Anomaly-OV). Off: the LLM reads stock
    # LLaVA-OneVision's image tokens (an LLM never tuned with them), the expert still makes the verdict.
    tokens: bool = True
    temperature: float = 100.0
    # The score picks the adverb of "with {adverb} suspicious features: ": below low -> "slightly",
    # below high -> "moderately", else "highly" (Anomaly-OV's strict comparisons).
    suspicion_thresholds: list[float] = Field(default_factory=lambda: [0.3, 0.7], min_length=2, max_length=2)

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> ExpertConfig:
        low, high = self.suspicion_thresholds
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f"suspicion_thresholds must satisfy 0 <= low <= high <= 1, got {self.suspicion_thresholds}"
            )
        return self


PROBABILITY_EPS = 1e-6  # P(Yes) is clipped to [eps, 1 - eps] before its logit (fitting and scoring alike)


def logit(probability: float) -> float:
    p = min(max(probability, PROBABILITY_EPS), 1.0 - PROBABILITY_EPS)
    return math.log(p / (1.0 - p))


def sigmoid(x: float) -> float:
    """Without overflow for any finite x (math.exp(-x) overflows past x = -709)."""
    return 0.5 * (1.0 + math.tanh(0.5 * x))


class DecisionConfig(_SubConfig):
    """The one decision per image: a calibrated fusion of the expert's logit and the LLM's P(Yes).

    score = sigmoid(expert_weight * expert_logit + llm_weight * logit(P(Yes)) + bias), anomalous = score >=
    threshold. P(Yes) is the language model's probability of "Yes" (against "No") as the first answer token to
    the fixed detection question (`prompts.DETECTION_QUESTION`). The weights are a logistic regression fitted on
    a labelled validation split (`anomaly-assistant eval calibrate --write`); until then the score is the
    expert's raw sigmoid (weights 1, 0, 0) and `fitted_on` is None, i.e. not calibrated.
    """

    expert_weight: float = 1.0
    llm_weight: float = 0.0
    bias: float = 0.0
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    fitted_on: str | None = None  # what the weights were fitted on (data, split, image count)

    def score(self, expert_logit: float, yes_probability: float | None) -> float:
        """The fused, calibrated probability that the image is anomalous (no LLM term without P(Yes))."""
        llm = 0.0 if yes_probability is None else self.llm_weight * logit(yes_probability)
        return sigmoid(self.expert_weight * expert_logit + llm + self.bias)

    @property
    def calibrated(self) -> bool:
        return self.fitted_on is not None


class ReferenceConfig(_SubConfig):
    """Few-shot: normal references (images given with the query, or an enrolled profile) drive the verdict.

    The query's patches are compared with the normal patches (`references.PatchBank`: nearest-neighbour cosine
    distance d at the expert's feature levels), and the evidence enters by one rule (`references.fuse`):
        image logit = expert logit + weight * max(0, largest patch d - shift)
        patch map   = (1 - map_weight) * LTFM map + map_weight * sigmoid(image logit) * d / largest patch d
    so the verdict's score, decision, heatmap and boxes follow the references, and the decision's calibration
    (`decision`) applies to the fused expert logit unchanged. Without references both are exactly Anomaly-OV's.
    `weight` and `shift` are fitted on a labelled validation split with references drawn from normal training
    images (`anomaly-assistant eval calibrate --shots K --write`); `fitted_on` says where (None: defaults).
    `neighbourhood` 3 suits SigLIP's 27 x 27 patch grid (PatchCore's window); a coarse grid wants 1.
    `prompt` is how a reference image reads in the LLM input, a choice the LLM is trained with (docs/few_shot.md):
    "base" its padded square crop's tokens and one newline (LLaVA-OneVision's multi-image form), "expert" those
    followed by its own suspicion phrase, global token and crop tokens, as a query's (Anomaly-OV's multi-image form;
    with `expert.tokens` off there are no expert tokens, so both read as "base").
    """

    weight: float = Field(20.0, ge=0.0)
    shift: float = Field(0.3, ge=0.0)  # distances up to this are what normal images' patches show
    map_weight: float = Field(0.5, ge=0.0, le=1.0)
    neighbourhood: int = Field(3, ge=1)  # local averaging window of the patch grid before matching (odd)
    max_patches: int = Field(16384, ge=1)  # memory-bank bound per scale (whole-image crops, tiles)
    prompt: Literal["base", "expert"] = "base"
    fitted_on: str | None = None

    @model_validator(mode="after")
    def _odd_window(self) -> ReferenceConfig:
        if self.neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be odd (a window centred on the patch), got {self.neighbourhood}")
        return self


class RoiConfig(_SubConfig):
    """Expert-guided region-of-interest tokens (Triad)."""

    enabled: bool = True
    # ROI crops per query image, one where the image fits in one crop (`layout.roi_box_count`: counts stay static);
    # disable ROI tokens with enabled=false
    max_boxes: int = Field(4, ge=1)
    threshold_ratio: float = Field(0.9, gt=0.0, lt=1.0)  # binarise the map at min + ratio * (max - min)
    merge_overlap: float = 0.1  # merge boxes whose intersection / smaller area exceeds this
    pool: int = Field(2, ge=1)  # average pooling of each ROI crop's token grid
    # where a box's tokens come from: "crops" re-encodes every box crop (Triad's rule, what checkpoints without this
    # key were trained with), "tiles" pools the AnyRes tiles' features already computed (no second vision pass),
    # "auto" re-encodes a box only where its crop samples the source at least `reencode_gain` times finer than the
    # tiles do (a source finer than the tile canvas). An LLM reads the kind it was trained with (README, ROI cost).
    tokens_from: Literal["auto", "tiles", "crops"] = "crops"
    reencode_gain: float = Field(1.5, ge=1.0)
    newline: bool = False  # image_newline after every pooled row (Triad's 0-shot setting has none)
    source_max_side: int = Field(1024, ge=1)  # ROI crops are cut from the image scaled so its long side is at most this
    map_source: Literal["expert", "external"] = "expert"  # "external": maps come with the inputs (e.g. CLIP)


TOKEN_PARTS = ("base", "expert", "roi")  # the runs of image tokens an LLM may read (`layout`)


def token_part_fields(parts: Sequence[str], expert: Mapping | None = None, roi: Mapping | None = None) -> dict:
    """The `expert` and `roi` sub-config fields (given ones kept) that make the LLM read exactly `parts`: the
    inverse of `AssistantConfig.token_parts`."""
    return {
        "expert": {**(expert or {}), "tokens": "expert" in parts},
        "roi": {**(roi or {}), "enabled": "roi" in parts},
    }


SUB_CONFIGS: dict[str, type[_SubConfig]] = {
    "expert": ExpertConfig,
    "roi": RoiConfig,
    "decision": DecisionConfig,
    "reference": ReferenceConfig,
}
# Keys of checkpoints written before the decision had its own section: expert.<old> -> decision.<new>.
MOVED_TO_DECISION = {"score_scale": "expert_weight", "score_shift": "bias", "decision_threshold": "threshold"}


def _changes_model(kind: type[_SubConfig], name: str) -> type[BaseModel]:
    """`kind` with every field optional (None = unchanged) but its types and bounds kept; unknown keys rejected."""
    fields = {
        name: (Optional[Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation], None)
        for name, info in kind.model_fields.items()
    }
    return create_model(name, __module__=__name__, __config__=ConfigDict(extra="forbid", frozen=True), **fields)


ExpertChanges = _changes_model(ExpertConfig, "ExpertChanges")
RoiChanges = _changes_model(RoiConfig, "RoiChanges")
DecisionChanges = _changes_model(DecisionConfig, "DecisionChanges")
ReferenceChanges = _changes_model(ReferenceConfig, "ReferenceChanges")


class Settings(BaseModel):
    """Changes to the expert/ROI/decision sub-configs for one run: `Settings(roi={"enabled": False})`.

    Keys, types and bounds are checked when the settings are made (errors name the key path, e.g.
    `roi.max_boxs`); rules across fields (ordered thresholds) when they are applied to a checkpoint's config.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    expert: ExpertChanges = Field(default_factory=ExpertChanges)
    roi: RoiChanges = Field(default_factory=RoiChanges)
    decision: DecisionChanges = Field(default_factory=DecisionChanges)
    reference: ReferenceChanges = Field(default_factory=ReferenceChanges)

    def changes(self, name: str) -> dict[str, Any]:
        """The fields of sub-config `name` this run sets."""
        return getattr(self, name).model_dump(exclude_none=True)

    @field_serializer("expert", "roi", "decision", "reference")
    def _only_changes(self, section: BaseModel) -> dict[str, Any]:
        return section.model_dump(exclude_none=True)  # saved with a training config: what was set, nothing else

    def __bool__(self) -> bool:
        return any(self.changes(name) for name in SUB_CONFIGS)

    @classmethod
    def parse(cls, assignments: Iterable[str]) -> Settings:
        """`["roi.enabled=false", "decision.threshold=0.4"]` (values read as YAML scalars or lists)."""
        changes: dict[str, dict[str, Any]] = {}
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            section, dot, field = key.strip().partition(".")
            if not sep or not dot or not field or not text.strip():
                raise SettingsError(f"{assignment!r}: expected SECTION.KEY=VALUE, e.g. roi.enabled=false")
            if section == "expert" and field in MOVED_TO_DECISION:
                raise SettingsError(f"{key.strip()}: moved to decision.{MOVED_TO_DECISION[field]}")
            changes.setdefault(section, {})[field] = yaml.safe_load(text)
        return cls.checked(changes)

    @classmethod
    def checked(cls, changes: dict[str, Any]) -> Settings:
        """`Settings(**changes)` with a one-line `SettingsError` naming the key path."""
        try:
            return cls.model_validate(changes)
        except ValidationError as error:
            raise SettingsError(validation_message(error)) from None


class AssistantConfig(LlavaOnevisionConfig):
    """LLaVA-OneVision config extended with the anomaly expert, ROI tokens and the suspicion phrase.

    The phrase "with {adverb} suspicious features:" is stored as token ids so the model (and the vLLM
    plugin) can write the chosen adverb's embeddings without a tokenizer at run time.
    """

    model_type = "anomaly_assistant"

    expert: ExpertConfig | dict | None = None
    roi: RoiConfig | dict | None = None
    decision: DecisionConfig | dict | None = None
    reference: ReferenceConfig | dict | None = None
    phrase_prefix_ids: list | None = None  # tokens of "with"
    adverb_token_ids: list | None = None  # three equal-length id lists: slightly, moderately, highly
    phrase_suffix_ids: list | None = None  # tokens of " suspicious features:"
    image_mean: list | None = None  # normalisation of ROI crops, copied from the image processor
    image_std: list | None = None
    # Images whose long side exceeds this are shrunk to it before AnyRes (the official Anomaly-OV rule, training
    # and evaluation alike); None keeps every size. `AssistantProcessor.model_size`.
    max_image_side: int | None = 1024
    # The token parts (TOKEN_PARTS) the LLM was trained to read; None: not recorded (checkpoints made before it
    # was, trained with what they enable). Switching on a part outside it warns (`untrained_token_parts`).
    llm_token_parts: list | None = None

    def __post_init__(self, **kwargs):
        moved = self.__dict__.pop("_moved_decision", None)  # an older checkpoint's decision keys (`__setattr__`)
        if self.decision is None and moved:
            self.decision = moved
        for name, kind in SUB_CONFIGS.items():
            if getattr(self, name) is None:
                setattr(self, name, kind())
        self.phrase_prefix_ids = list(self.phrase_prefix_ids or [])
        self.phrase_suffix_ids = list(self.phrase_suffix_ids or [])
        self.adverb_token_ids = [list(ids) for ids in (self.adverb_token_ids or [[], [], []])]
        if len(self.adverb_token_ids) != len(SUSPICION_ADVERBS):
            raise ValueError("adverb_token_ids needs one id list per adverb (slightly, moderately, highly)")
        if len({len(ids) for ids in self.adverb_token_ids}) != 1:
            raise ValueError("adverb_token_ids must all have the same length (pad when tokenizing)")
        if self.llm_token_parts is not None:
            self.llm_token_parts = list(self.llm_token_parts)
            unknown = set(self.llm_token_parts) - set(TOKEN_PARTS)
            if unknown or "base" not in self.llm_token_parts:
                raise ValueError(f"llm_token_parts must include 'base' and name only {TOKEN_PARTS}, got {unknown}")
        self.image_mean = list(self.image_mean or [0.5, 0.5, 0.5])
        self.image_std = list(self.image_std or [0.5, 0.5, 0.5])
        super().__post_init__(**kwargs)

    def __setattr__(self, key: str, value: Any) -> None:
        """A dict given for `expert` or `roi` changes the current sub-config's fields (validated as a whole).

        So every route to a change is the same one: `apply_settings`, transformers' `config.update` and vLLM's
        `--hf-overrides '{"roi": {"enabled": false}}'` (which sets the attribute).
        """
        kind = SUB_CONFIGS.get(key)
        if key == "expert" and isinstance(value, dict) and MOVED_TO_DECISION.keys() & value.keys():
            value = dict(value)
            moved = {new: value.pop(old) for old, new in MOVED_TO_DECISION.items() if old in value}
            if (moved.get("expert_weight", 1.0), moved.get("bias", 0.0)) != (1.0, 0.0):
                moved["fitted_on"] = "an older checkpoint's Platt scaling of the expert alone"
            if isinstance(self.__dict__.get("decision"), DecisionConfig):
                self.decision = moved  # a change after construction (`config.update`, `--hf-overrides`)
            else:
                self.__dict__["_moved_decision"] = moved  # applied in `__post_init__`, once `decision` is set
        if kind is not None and value is not None and not isinstance(value, kind):
            current = self.__dict__.get(key)
            base = current.model_dump() if isinstance(current, kind) else {}
            try:
                value = kind.model_validate({**base, **dict(value)})
            except ValidationError as error:
                raise SettingsError(validation_message(error, key)) from None
        super().__setattr__(key, value)

    def apply_settings(self, settings: Settings) -> None:
        """Change the expert/ROI/decision sub-configs for this run."""
        for name in SUB_CONFIGS:
            if settings.changes(name):
                setattr(self, name, settings.changes(name))

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for name in SUB_CONFIGS:
            output[name] = getattr(self, name).model_dump()
        return output

    @property
    def token_parts(self) -> list[str]:
        """The token parts this configuration gives the LLM."""
        return ["base"] + ["expert"] * self.expert.tokens + ["roi"] * self.roi.enabled

    def untrained_token_parts(self) -> list[str]:
        """Parts switched on that the LLM never read in training (it sees embeddings it cannot interpret)."""
        trained = self.llm_token_parts
        return [] if trained is None else [part for part in self.token_parts if part not in trained]

    @property
    def crop_size(self) -> int:
        return self.vision_config.image_size

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size


AutoConfig.register(AssistantConfig.model_type, AssistantConfig)
