"""`EndpointEngine`: the Engine interface over any OpenAI-compatible chat server (our vLLM server, a hosted model).

Chat goes through the official `openai` client, whose retries with exponential backoff cover transient
failures (connection errors, 408/409/429/5xx); `analyze` calls our server's `/inspect` route, which plain chat
servers lack (with a product profile's name when one is given: the server's checkpoint holds the profiles, which
`profiles()` lists from `GET /profiles`). Every failure becomes an `EndpointError` naming the URL, so a run stops
with a reason, not a traceback.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import openai
from PIL import Image
from pydantic import ValidationError

from .card import ModelCard
from .engine import Conversation
from .errors import AssistantError
from .image_io import ImageInput, load_image, load_references
from .verdict import Verdict

TOP_LOGPROBS = 20  # the most the OpenAI API returns; a choice outside them gets no probability mass

T = TypeVar("T")
U = TypeVar("U")


class EndpointError(AssistantError, RuntimeError):
    """The endpoint is down, refused, timed out or answered something unusable."""


def data_url(image: Image.Image) -> str:
    """PNG (lossless) as a data URL: the server sees exactly the pixels the local model would."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """OpenAI chat messages with the same content, order and reference intro as the local chat template.

    No system message: the server's chat template adds its own. Images ride in the first user turn as data
    URLs (references first, the query last); later turns are plain text.
    """
    images = iter(conversation.images)
    messages = []
    for turn in conversation.chat():
        parts = [
            {"type": "image_url", "image_url": {"url": data_url(next(images))}} if part["type"] == "image" else part
            for part in turn["content"]
        ]
        text_only = len(parts) == 1 and parts[0]["type"] == "text"
        messages.append({"role": turn["role"], "content": parts[0]["text"] if text_only else parts})
    return messages


def choice_distribution(top_logprobs: Sequence[tuple[str, float]], choices: Sequence[str]) -> dict[str, float]:
    """P(each choice) from a first token's top (token, logprob) pairs, renormalised over the choices.

    A token matches a choice when equal to it up to leading whitespace (" Yes" counts as "Yes"). If no choice is
    among them the endpoint gives no evidence, and the choices get equal probabilities.
    """
    mass = dict.fromkeys(choices, 0.0)
    for token, logprob in top_logprobs:
        token = token.lstrip()
        if token in mass:
            mass[token] += math.exp(logprob)
    total = sum(mass.values())
    return {c: m / total for c, m in mass.items()} if total > 0 else dict.fromkeys(choices, 1 / len(choices))


def continuation_options(conversation: Conversation) -> dict[str, Any]:
    """vLLM's chat options that continue the conversation's unfinished answer (`answer_prefix`), if it has one."""
    if not conversation.answer_prefix:
        return {}
    return {"continue_final_message": True, "add_generation_prompt": False}


class EndpointEngine:
    """Greedy (temperature 0) chat, streaming, choice probabilities and expert analysis over HTTP."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 300.0,
        max_retries: int = 3,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",  # local servers ignore the key
            timeout=timeout,
            max_retries=max_retries,
        )

    @contextmanager
    def _errors(self, not_found: str | None = None) -> Iterator[None]:
        try:
            yield
        except openai.APITimeoutError as error:
            raise EndpointError(
                f"{self.base_url}: no answer within {self.timeout:g} s ({self.max_retries} retries)"
            ) from error
        except openai.APIConnectionError as error:
            cause = error.__cause__ or error
            raise EndpointError(f"cannot reach {self.base_url} ({cause}); is the server running?") from error
        except openai.NotFoundError as error:
            raise EndpointError(
                not_found
                or f"{self.base_url}: HTTP 404 ({error.message}); check the URL and the model name {self.model!r}"
            ) from error
        except openai.APIStatusError as error:
            raise EndpointError(f"{self.base_url} answered HTTP {error.status_code}: {error.message}") from error

    def _map(self, function: Callable[[T], U], items: Sequence[T]) -> list[U]:
        """Apply `function` with up to `concurrency` requests in flight; results keep the input order."""
        if len(items) <= 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(function, items))

    def _chat(self, conversation: Conversation, **options: Any):
        with self._errors():
            response = self.client.chat.completions.create(
                model=self.model,
                messages=to_messages(conversation),
                temperature=0,
                extra_body=continuation_options(conversation) or None,
                **options,
            )
        if not response.choices:
            raise EndpointError(f"{self.base_url} returned no choices for model {self.model!r}")
        return response.choices[0]

    # -- the Engine interface -------------------------------------------------------------------------
    def complete(self, conversations: Sequence[Conversation], max_new_tokens: int = 256) -> list[str]:
        """Greedy answers (an `answer_prefix` included), requested concurrently."""
        return self._map(
            lambda c: c.answer_prefix + (self._chat(c, max_tokens=max_new_tokens).message.content or ""),
            conversations,
        )

    def stream(self, conversation: Conversation, max_new_tokens: int = 256) -> Iterator[str]:
        """Yield the answer's text as the server sends it (server-sent events); stopping early closes the stream."""
        with self._errors():
            chunks = self.client.chat.completions.create(
                model=self.model,
                messages=to_messages(conversation),
                temperature=0,
                max_tokens=max_new_tokens,
                stream=True,
                extra_body=continuation_options(conversation) or None,
            )
            if conversation.answer_prefix:
                yield conversation.answer_prefix
            with chunks:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content

    def choice_probabilities(
        self, conversations: Sequence[Conversation], choices: Sequence[str]
    ) -> list[dict[str, float]]:
        """P(first generated token is each choice) from the top-20 logprobs (`choice_distribution`)."""
        if len(set(choices)) != len(choices):
            raise ValueError(f"choices {list(choices)} are not distinct")

        def distribution(conversation: Conversation) -> dict[str, float]:
            choice = self._chat(conversation, max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
            content = choice.logprobs.content if choice.logprobs else None
            if not content:
                raise EndpointError(
                    f"{self.base_url} returned no logprobs for model {self.model!r}: this endpoint cannot score choices"
                )
            return choice_distribution([(c.token, c.logprob) for c in content[0].top_logprobs], choices)

        return self._map(distribution, conversations)

    def _optional_get(self, route: str) -> object | None:
        """The JSON of one of our server's GET routes; None when the endpoint has no such route (HTTP 404)."""
        try:
            with self._errors():
                return self.client.get(route, cast_to=object)
        except EndpointError as error:
            if isinstance(error.__cause__, openai.NotFoundError):
                return None
            raise

    def model_card(self) -> ModelCard | None:
        """The served model's card from our server's `GET {base_url}/model-card`; None if it has none, or the
        endpoint is not our server (a plain chat server lacks the route)."""
        payload = self._optional_get("/model-card")
        if payload is None:
            return None
        try:
            return ModelCard.model_validate(payload)
        except ValidationError as error:
            raise EndpointError(
                f"{self.base_url}/model-card returned an invalid card: {error.errors()[0]['msg']}"
            ) from None

    def profiles(self) -> list[tuple[str, str]] | None:
        """(name, description) of the served checkpoint's product profiles from our server's
        `GET {base_url}/profiles`; None if the endpoint has no such route (a plain chat server, an older one)."""
        payload = self._optional_get("/profiles")
        if payload is None:
            return None
        try:
            return [(str(item["name"]), str(item.get("description", ""))) for item in payload["data"]]
        except (TypeError, KeyError) as error:
            raise EndpointError(f"{self.base_url}/profiles returned an invalid list: {error!r}") from None

    def analyze(
        self, image: ImageInput, references: Sequence[ImageInput] = (), profile: str | None = None
    ) -> Verdict:
        """The decided verdict from our server's `POST {base_url}/inspect` (no reasoning generated); `profile` is
        the name of one of the served checkpoint's product profiles (refused by the server with a reason when it
        is unknown, was made with another model, or comes with references)."""
        image = load_image(image, "image")
        references = load_references(references)
        body = {
            "model": self.model,
            "image_url": data_url(image),
            "reference_urls": [data_url(r) for r in references],
            "question": None,
            "max_tokens": 0,
        }
        if profile is not None:  # only when asked for: a server that predates profiles sees the request it knows
            body["profile"] = profile
        not_found = (
            f"{self.base_url}/inspect: HTTP 404: this endpoint serves chat only (no /inspect route; expert scores and "
            f"heatmaps need our server), or it does not serve the model {self.model!r}"
        )
        with self._errors(not_found=not_found):
            payload = self.client.post("/inspect", body=body, cast_to=object)
        try:
            verdict = Verdict.model_validate(payload)
        except ValidationError as error:
            raise EndpointError(
                f"{self.base_url}/inspect returned an invalid verdict: {error.errors()[0]['msg']}"
            ) from error
        if profile is not None and verdict.reference_distance is None:
            raise EndpointError(
                f"{self.base_url}/inspect ignored the profile {profile!r}: this server predates product profiles"
            )
        return verdict
