"""The full Verdict from a running vLLM server, by the same `engine.inspect` the in-process backend uses.

`ServerEngine` is an `Engine` whose analysis comes from the image side loaded in the API-server process
(`analysis.py`) and whose answers go through the server's own chat-completions handler, so the
reasoning has exactly the tokens a chat client (`assistant.client.EndpointEngine`) gets for the same conversation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from http import HTTPStatus

from PIL import Image
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import GracefulHTTPError

from ..client import to_messages
from ..engine import Conversation, ImageAnalyzer, inspect
from ..verdict import Verdict


class ServerEngine:
    """`analyze` on the image side, `complete` through chat completions on the server's event loop."""

    def __init__(self, analyst: ImageAnalyzer, chat: OpenAIServingChat, model: str, loop: asyncio.AbstractEventLoop):
        self.analyst = analyst
        self.chat = chat
        self.model = model
        self.loop = loop

    def analyze(self, image: Image.Image, references: Sequence[Image.Image] = ()) -> Verdict:
        return self.analyst.analyze(image, references)

    def complete(self, conversations: Sequence[Conversation], max_new_tokens: int = 256) -> list[str]:
        """Blocking: call it from a worker thread, never from the event loop it waits on."""
        futures = [asyncio.run_coroutine_threadsafe(self._answer(c, max_new_tokens), self.loop) for c in conversations]
        return [future.result() for future in futures]

    async def _answer(self, conversation: Conversation, max_new_tokens: int) -> str:
        request = ChatCompletionRequest(
            model=self.model,
            messages=to_messages(conversation),  # exactly what a chat client sends
            max_tokens=max_new_tokens,
            temperature=0.0,
            return_token_ids=True,
        )
        response = await self.chat.create_chat_completion(request)
        if isinstance(response, ErrorResponse):
            raise GracefulHTTPError(response.error.message, HTTPStatus(response.error.code))
        # Decoded like LocalEngine does: vLLM's incremental detokenizer drops a trailing incomplete character.
        return self.analyst.processor.tokenizer.decode(response.choices[0].token_ids, skip_special_tokens=True)

    def verdict(
        self, image: Image.Image, references: Sequence[Image.Image], question: str, max_new_tokens: int
    ) -> Verdict:
        """`engine.inspect`; with max_new_tokens == 0 the analysis alone (no reasoning, no defect name)."""
        if max_new_tokens > 0:
            return inspect(self, image, references, question, max_new_tokens)
        return self.analyze(image, references)
