"""The app's event handlers: one streamed chat turn, opacity changes, new uploads and resets.

Events run with `preprocess=False`, so uploads arrive as Gradio file records and the project's own
`load_image` is the only decoder: corrupt, non-image and oversized files get its clear `ImageError`
message instead of a decoder traceback from inside Gradio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

import gradio as gr
from PIL import Image

from ..engine import Analysis, Conversation, Engine
from ..errors import AssistantError
from ..image_io import ImageError, load_image
from ..prompts import INSPECTION_QUESTION
from .views import Preview, chat_history, make_preview, overlay, regions, verdict_label

T = TypeVar("T")
NO_IMAGE = "Upload an image to inspect first (the “Image to inspect” box)."


@dataclass(frozen=True)
class Session:
    """One browser tab's chat: the uploads it is about, the conversation so far and the expert's view."""

    uploads: tuple[str, str | None]  # cache paths of the query and reference uploads (content-addressed)
    conversation: Conversation
    analysis: Analysis
    preview: Preview


def _upload_path(upload: dict | None) -> str | None:
    return upload["path"] if upload else None


def _panel(session: Session, opacity: float) -> tuple:
    """Verdict label, heatmap overlay and ROI boxes."""
    return verdict_label(session.analysis), overlay(session.preview, opacity), regions(session.preview)


def unlock_question() -> gr.Textbox:
    return gr.Textbox(interactive=True)


def clear_chat() -> tuple:
    """Outputs chat, label, overlay, boxes, session: all empty, the uploads and the typed question kept."""
    return [], None, None, None, None


def reset() -> tuple:
    """clear_chat's outputs, then the question, image and reference boxes: everything empty."""
    return *clear_chat(), "", None, None


class ChatHandlers:
    """Handlers bound to one engine; the session lives in gr.State, one per browser tab or API client."""

    def __init__(self, engine: Engine, max_new_tokens: int = 256):
        self.engine = engine
        self.max_new_tokens = max_new_tokens

    def _start(self, uploads: tuple[str, str | None], question: str) -> Session:
        image, reference = uploads
        try:
            conversation = Conversation.start(image, question, [reference] if reference else [])
        except ImageError as error:
            raise gr.Error(f"Cannot use this upload: {error}", print_exception=False) from error
        analysis = _reported(lambda: self.engine.analyze(conversation.image, conversation.references))
        return Session(uploads, conversation, analysis, make_preview(conversation.image, analysis))

    def chat(
        self,
        question: str,
        image: dict | None,
        reference: dict | None,
        opacity: float,
        session: Session | None,
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Answer one question, streamed; outputs: chat, question box, label, overlay, boxes, session.

        The question box is emptied and locked while the answer streams (`unlock_question` follows every
        turn): a second question sent meanwhile would start from the session as it was before this turn.
        A question about the uploads of the current session continues it (the engine reuses the encoded
        image); new uploads start a new conversation with a fresh analysis. The session is only replaced
        by the last yield, so a failed turn leaves it as it was. That last yield repeats every output:
        API clients receive only the final tuple, and `gr.skip()` placeholders would reach them as-is.
        """
        question = (question or "").strip() or INSPECTION_QUESTION
        uploads = (_upload_path(image), _upload_path(reference))
        if uploads[0] is None:
            raise gr.Error(NO_IMAGE, print_exception=False)
        if session is not None and session.uploads == uploads:
            conversation = replace(session.conversation, messages=list(session.conversation.messages)).ask(question)
            turn = replace(session, conversation=conversation)
        else:
            progress(None, desc="Analysing the image…")
            turn = self._start(uploads, question)
        conversation, skip, locked = turn.conversation, gr.skip(), gr.Textbox(value="", interactive=False)
        yield chat_history(conversation, uploads[0], pending=""), locked, *_panel(turn, opacity), skip
        answer = ""
        for chunk in _reported_stream(self.engine.stream(conversation, self.max_new_tokens)):
            answer += chunk
            yield chat_history(conversation, uploads[0], pending=answer), skip, skip, skip, skip, skip
        conversation.answer(answer.strip())
        yield chat_history(conversation, uploads[0]), locked, *_panel(turn, opacity), turn

    @staticmethod
    def reblend(opacity: float, session: Session | None) -> Image.Image | dict:
        """The heatmap overlay at a new opacity (nothing to redraw before the first answer)."""
        return gr.skip() if session is None else overlay(session.preview, opacity)

    @staticmethod
    def new_uploads(image: dict | None, reference: dict | None) -> tuple:
        """A new image starts a new chat; a file that cannot be used is reported right away."""
        for upload, name in ((image, "image"), (reference, "reference")):
            if upload is not None:
                try:
                    load_image(upload["path"], name)
                except ImageError as error:
                    gr.Warning(f"Cannot use this upload: {error}")
        return clear_chat()


def _reported(work: Callable[[], T]) -> T:
    """Run engine work, showing user-facing errors (an endpoint that is down, say) as a message, not a traceback."""
    try:
        return work()
    except AssistantError as error:
        raise gr.Error(str(error), print_exception=False) from error


def _reported_stream(chunks: Iterator[str]) -> Iterator[str]:
    """`_reported` for a streamed answer, keeping it streamed."""
    try:
        yield from chunks
    except AssistantError as error:
        raise gr.Error(str(error), print_exception=False) from error
