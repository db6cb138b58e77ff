"""Which engine the app talks to: an in-process model (the default) or a served OpenAI-compatible endpoint.

With no model given and no demo model installed, the app still starts on a tiny random model, so every
part of the UI works; `notice` then says plainly that its verdicts and answers mean nothing.

`profiles` are the product profiles the backend can use, read once at start: the checkpoint folder's
(`profiles.profile_names`), or what the project's server lists (`GET /v1/profiles`); none for the tiny random
model, a plain chat server or an endpoint that was unreachable at start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..card import ModelCard, unknown_card, untrained_card
from ..config import Settings
from ..defaults import MODEL_ENV, default_model_path, resolve_model
from ..engine import Engine, LocalEngine
from ..errors import UsageError
from ..factory import tiny_assistant
from ..profiles import profile_names
from .examples import Example, model_examples

NO_WEIGHTS_NOTICE = (
    "**No trained weights found: this app is running a tiny random model.** Its verdicts, heatmaps, boxes and "
    "answers are random and mean nothing. Start it with `python app.py --model PATH` (or set "
    f"`{MODEL_ENV}`) to use a trained checkpoint; docs/app.md explains where the demo model comes from."
)


@dataclass(frozen=True)
class Backend:
    engine: Engine
    description: str  # shown under the title, so users know what answers them
    notice: str | None = None  # a warning the UI must show prominently
    card: ModelCard | None = None  # what the model is; shown in the header
    examples: list[Example] = field(default_factory=list)  # the model's own examples (else drawn ones)
    profiles: tuple[str, ...] = ()  # names of the product profiles the engine can use


def load_backend(
    model: str | None = None,
    endpoint: str | None = None,
    served_model: str | None = None,
    api_key: str | None = None,
    device: str | None = None,
    settings: Settings | None = None,
) -> Backend:
    """--endpoint, else --model / $ANOMALY_ASSISTANT_MODEL / the demo model, else the tiny random model.

    A model the user named but that is not there is an error (`UsageError`), never a silent fallback.
    The endpoint must be the project's server (`anomaly-assistant serve`): the verdict comes from its
    /inspect route, which plain chat servers lack (their error then says so in the UI).
    """
    if endpoint:
        if not served_model:
            raise UsageError("--endpoint needs --served-model NAME, the model name the server serves")
        from ..client import EndpointEngine, EndpointError  # needs the openai client: imported only when asked for

        engine = EndpointEngine(endpoint, served_model, api_key=api_key)
        profiles: tuple[str, ...] = ()
        try:
            card = engine.model_card()
        except EndpointError:  # down for now: the app starts, and each question reports the endpoint's state
            card = unknown_card(f"{served_model} (model card unavailable: the endpoint was unreachable at start)")
        else:
            try:
                profiles = tuple(name for name, _ in engine.profiles() or ())  # None: not our server, or older
            except EndpointError:  # answered the card but not the list: offer no profiles
                pass
        return Backend(engine, f"served model `{served_model}` at {endpoint}", card=card, profiles=profiles)
    if model is None and not os.environ.get(MODEL_ENV) and default_model_path() is None:
        model, processor = tiny_assistant()
        if settings:
            model.config.apply_settings(settings)
        engine = LocalEngine(model, processor)
        card = untrained_card("tiny random assistant", "A tiny random model: no trained weights were found.")
        return Backend(engine, "in-process tiny random model (no trained weights)", NO_WEIGHTS_NOTICE, card)
    path = resolve_model(model)
    engine = LocalEngine.from_pretrained(path, device=device, settings=settings)
    card = ModelCard.load(path)
    description = f"in-process model `{path}` on {engine.device}"
    examples = model_examples(path, card)
    return Backend(engine, description, card=card, examples=examples, profiles=tuple(profile_names(path)))
