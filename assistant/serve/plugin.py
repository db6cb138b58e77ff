"""`vllm.general_plugins` entry point: teach vLLM our config type and model class.

vLLM calls `register()` in every process it starts (API server, engine core, workers, the registry's
inspection subprocess), possibly more than once, so it is idempotent and cheap: the model module is
registered by name and imported only where vLLM builds or inspects the model.
"""

from __future__ import annotations

ARCHITECTURE = "AssistantForConditionalGeneration"  # `architectures` in our config.json
PLUGIN_NAME = "anomaly_assistant"  # entry-point names in pyproject.toml, listed in VLLM_PLUGINS
INSPECT_PLUGIN_NAME = "anomaly_assistant_inspect"
AUTH_PLUGIN_NAME = "anomaly_assistant_auth"
PLUGIN_NAMES = (PLUGIN_NAME, INSPECT_PLUGIN_NAME, AUTH_PLUGIN_NAME)
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})  # what answers without the API key (auth.py)
MEDIA_CONNECTOR_NAME = "anomaly_assistant"  # VLLM_MEDIA_CONNECTOR: the connector of `media.py`


def register() -> None:
    from vllm import ModelRegistry

    from .. import config  # noqa: F401  (registers the "anomaly_assistant" model type with AutoConfig)
    from . import media  # noqa: F401  (registers the media connector that reads request images)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "assistant.serve.model:AssistantVllmModel")
