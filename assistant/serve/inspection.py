"""The full Verdict from a running vLLM server, by the same `engine.inspect` the in-process backend uses.

`ServerEngine` is an `Engine` whose analysis comes from the image side loaded in the API-server process
(`analysis.py`) and whose answers go through the server's own chat-completions handler, so the
reasoning has exactly the tokens a chat client (`assistant.client.EndpointEngine`) gets for the same conversation.
A product profile is named in the request and read from the served checkpoint's `profiles/` folder
(`ImageAnalyzer.profile`; one made with another model is refused with `profiles.ProfileError`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from http import HTTPStatus

import torch
from PIL import Image
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import GracefulHTTPError

from ..client import continuation_options, to_messages
from ..engine import Conversation, ImageAnalyzer, choice_token_ids, inspect, whole_characters, yes_probability
from ..profiles import check_one_source
from ..verdict import Verdict


class ServerEngine:
    """`analyze` on the image side (P(Yes) from the server's LLM), `complete` and `choice_probabilities` through
    chat completions on the server's event loop."""

    def __init__(self, analyst: ImageAnalyzer, chat: OpenAIServingChat, model: str, loop: asyncio.AbstractEventLoop):
        self.analyst = analyst
        self.chat = chat
        self.model = model
        self.loop = loop

    def analyze(
        self, image: Image.Image, references: Sequence[Image.Image] = (), profile: str | None = None
    ) -> Verdict:
        """The decided verdict; a `profile` (by name) is resolved before the LLM is asked anything."""
        check_one_source(references, profile)
        chosen = None if profile is None else self.analyst.profile(profile)
        return self.analyst.decide(image, references, yes_probability(self, image, references), chosen)

    def _run(self, coroutines: list) -> list:
        """Blocking: call it from a worker thread, never from the event loop it waits on."""
        futures = [asyncio.run_coroutine_threadsafe(coroutine, self.loop) for coroutine in coroutines]
        return [future.result() for future in futures]

    def complete(self, conversations: Sequence[Conversation], max_new_tokens: int = 256) -> list[str]:
        return self._run([self._answer(c, max_new_tokens) for c in conversations])

    def choice_probabilities(
        self, conversations: Sequence[Conversation], choices: Sequence[str]
    ) -> list[dict[str, float]]:
        return self._run([self._choices(c, choices) for c in conversations])

    async def _chat(self, conversation: Conversation, **options):
        request = ChatCompletionRequest(
            model=self.model,
            messages=to_messages(conversation),  # exactly what a chat client sends
            temperature=0.0,
            **continuation_options(conversation),
            **options,
        )
        response = await self.chat.create_chat_completion(request)
        if isinstance(response, ErrorResponse):
            raise GracefulHTTPError(response.error.message, HTTPStatus(response.error.code))
        return response.choices[0]

    async def _answer(self, conversation: Conversation, max_new_tokens: int) -> str:
        choice = await self._chat(conversation, max_tokens=max_new_tokens, return_token_ids=True)
        # Decoded from the token ids like LocalEngine does, then cut like every backend (`whole_characters`).
        text = self.analyst.processor.tokenizer.decode(choice.token_ids, skip_special_tokens=True)
        return conversation.answer_prefix + whole_characters(text)

    async def _choices(self, conversation: Conversation, choices: Sequence[str]) -> dict[str, float]:
        """Exact: vLLM's logprobs of the choices' first tokens (`logprob_token_ids`), as `LocalEngine` computes
        them, not the top 20 a plain OpenAI client gets."""
        ids = choice_token_ids(self.analyst.processor.tokenizer, choices)
        choice = await self._chat(
            conversation, max_tokens=1, logprobs=True, logprob_token_ids=ids, return_tokens_as_token_ids=True
        )
        logprobs = {c.token: c.logprob for c in choice.logprobs.content[0].top_logprobs} if choice.logprobs else {}
        missing = [choice for choice, i in zip(choices, ids) if f"token_id:{i}" not in logprobs]
        if missing:
            raise GracefulHTTPError(f"vLLM returned no logprob for {missing}", HTTPStatus.INTERNAL_SERVER_ERROR)
        values = torch.tensor([logprobs[f"token_id:{i}"] for i in ids], dtype=torch.float64).softmax(0)
        return dict(zip(choices, values.tolist()))

    def verdict(
        self,
        image: Image.Image,
        references: Sequence[Image.Image],
        question: str,
        max_new_tokens: int,
        profile: str | None = None,
    ) -> Verdict:
        """`engine.inspect`; with max_new_tokens == 0 the decided verdict alone (no reasoning, no defect name)."""
        if max_new_tokens > 0:
            return inspect(self, image, references, question, max_new_tokens, profile=profile)
        return self.analyze(image, references, profile)
