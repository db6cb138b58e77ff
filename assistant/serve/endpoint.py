"""`vllm.endpoint_plugins` entry point: POST /v1/inspect, the full Verdict beside chat completions,
GET /v1/model-card, what the served model is (`card.ModelCard`; 404 when its checkpoint has none), and
GET /v1/profiles, the product profiles enrolled in the served checkpoint (`anomaly-assistant enroll NAME --images DIR
--model CKPT`): `{"object": "list", "data": [{"name": ..., "description": ...}]}`, empty when it has none.

An inspect request names at most one profile (`profile`), instead of `reference_urls`: an unknown profile, one
made with another model, or a profile with references is refused with 400 and the reason (`param: "profile"`).

vLLM's API server loads it only when its name is in VLLM_PLUGINS (`anomaly-assistant serve` sets that).
The route sits inside vLLM's middleware, so the server's key guards it like every route (`auth.py`), its
images are read under the chat route's URL policy (`media.read_image`), and exceptions become vLLM's JSON
errors (a bad image -> 400 with the reason, one over the size limit -> 413, an unknown model -> 404).
"""

# No `from __future__ import annotations`: FastAPI reads the handler's annotations to find the body.

import asyncio
import os
from argparse import Namespace
from pathlib import Path

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import State
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.exceptions import VLLMNotFoundError, VLLMValidationError

from ..card import ModelCard
from ..config import AssistantConfig
from ..profiles import ProfileError, check_one_source, describe_profiles
from ..prompts import INSPECTION_QUESTION
from ..verdict import Verdict
from .analysis import analysis_engine
from .inspection import ServerEngine
from .media import read_image
from .plugin import INSPECT_PLUGIN_NAME
from .urls import ImageUrlPolicy

DEVICE_ENV = "ASSISTANT_INSPECT_DEVICE"  # where the image side runs (default: cuda if available, else cpu)


class InspectRequest(BaseModel):
    model: str | None = None
    image_url: str = Field(description="the query image as a data URL (data:image/png;base64,...) or an allowed URL")
    reference_urls: list[str] = Field(default_factory=list, description="normal images of the same object, likewise")
    question: str | None = Field(None, description=f"default: {INSPECTION_QUESTION!r}")
    max_tokens: int = Field(256, ge=0, description="length of the reasoning; 0 = the expert's analysis only")
    profile: str | None = Field(
        None,
        description="the name of a product profile enrolled in the served checkpoint (GET /v1/profiles), whose normal "
        "images and threshold then decide; instead of reference_urls",
    )


class Inspector:
    """The names this server answers to and, from the first request on, its `ServerEngine`."""

    def __init__(
        self,
        chat: OpenAIServingChat,
        model_path: str,
        config: AssistantConfig,
        names: list[str],
        dtype: torch.dtype,
        policy: ImageUrlPolicy,
        max_images: int,
    ):
        self.chat = chat
        self.model_path = model_path
        self.config = config  # vLLM's, with the server's --hf-overrides (`serve --set`) applied
        self.names = names
        self.dtype = dtype
        self.policy = policy
        self.max_images = max_images  # the chat route's --limit-mm-per-prompt, checked before anything is read
        self.card = ModelCard.load(model_path) if Path(model_path).is_dir() else None
        self._engine: ServerEngine | None = None
        self._loading = asyncio.Lock()

    async def engine(self) -> ServerEngine:
        """Loaded on first use, so a server that only chats never holds the extra image side."""
        async with self._loading:
            if self._engine is None:
                device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
                analyst = await asyncio.to_thread(analysis_engine, self.model_path, self.config, self.dtype, device)
                self._engine = ServerEngine(analyst, self.chat, self.names[0], asyncio.get_running_loop())
        return self._engine

    def profiles(self) -> list[dict[str, str]]:
        """Name and description of each profile in the served checkpoint's folder (read afresh: a profile enrolled
        while the server runs is listed; a damaged one says why)."""
        if not Path(self.model_path).is_dir():
            return []
        return [{"name": name, "description": text} for name, text in describe_profiles(self.model_path)]

    async def verdict(self, request: InspectRequest) -> Verdict:
        if request.model is not None and request.model not in self.names:
            raise VLLMNotFoundError(f"The model `{request.model}` does not exist.")
        try:
            check_one_source(request.reference_urls, request.profile)  # before any image is read
        except ProfileError as error:
            raise VLLMValidationError(str(error), parameter="profile") from error
        if 1 + len(request.reference_urls) > self.max_images:
            raise VLLMValidationError(
                f"At most {self.max_images} image(s) may be provided in one request "
                f"(the query and {len(request.reference_urls)} references were sent)",
                parameter="reference_urls",
            )
        engine = await self.engine()

        def run() -> Verdict:  # decoding and the vision pass stay off the event loop
            image = read_image(request.image_url, self.policy, name="image").media
            references = [
                read_image(url, self.policy, name=f"reference {i + 1}").media
                for i, url in enumerate(request.reference_urls)
            ]
            question = request.question or INSPECTION_QUESTION
            try:
                return engine.verdict(image, references, question, request.max_tokens, profile=request.profile)
            except ProfileError as error:  # unknown, damaged or another model's: the client's to fix
                raise VLLMValidationError(str(error), parameter="profile") from error

        return await asyncio.to_thread(run)


class InspectPlugin:
    name = INSPECT_PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        @router.post("/v1/inspect")
        async def inspect_image(body: InspectRequest, raw_request: Request) -> Response:
            verdict = await raw_request.app.state.anomaly_inspector.verdict(body)
            return Response(verdict.model_dump_json(), media_type="application/json")

        @router.get("/v1/model-card")
        async def model_card(raw_request: Request) -> Response:
            card = raw_request.app.state.anomaly_inspector.card
            if card is None:
                raise VLLMNotFoundError("the served checkpoint has no model card (model_card.json)")
            return Response(card.model_dump_json(), media_type="application/json")

        @router.get("/v1/profiles")
        async def profiles(raw_request: Request) -> JSONResponse:
            listed = await asyncio.to_thread(raw_request.app.state.anomaly_inspector.profiles)
            return JSONResponse({"object": "list", "data": listed})

        app.include_router(router)

    async def init_state(self, engine_client: EngineClient, state: State, args: Namespace) -> None:
        names = list(args.served_model_name or [args.model])
        state.anomaly_inspector = Inspector(
            state.openai_serving_chat,
            args.model,
            engine_client.model_config.hf_config,
            names,
            engine_client.model_config.dtype,
            ImageUrlPolicy.from_domains(args.allowed_media_domains),
            engine_client.model_config.multimodal_config.get_limit_per_prompt("image"),
        )
