"""The app's event handlers: one streamed chat turn, opacity changes, new uploads and resets.

Events run with `preprocess=False`, so uploads arrive as Gradio file records and the project's own
`load_image` is the only decoder: corrupt, non-image and oversized files get its clear `ImageError`
message instead of a decoder traceback from inside Gradio. Any other failure is shown as one line too,
with the traceback in the app's log.

A session keeps only what the panel shows, at display size, and the chat text: a 64-megapixel upload
costs it about 4 MB, not 450 MB. Later turns read the image again from Gradio's upload cache (the engine
finds its encoding in its own cache by the pixels' digest).

A product profile chosen in the "Product profile" picker (`NO_PROFILE`: none) goes into `engine.analyze`; it
is part of what a session is about, so choosing another one starts a new conversation with a fresh verdict. A
profile and a reference upload together are refused with a message (`PROFILE_AND_REFERENCE`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import gradio as gr
from PIL import Image

from ..engine import Conversation, Engine, agreeing_stream
from ..errors import AssistantError, one_line
from ..image_io import ImageError, load_image, load_references
from ..prompts import INSPECTION_QUESTION
from .views import (
    Preview,
    chat_history,
    domain_notice,
    make_preview,
    overlay,
    profile_notice,
    regions,
    verdict_label,
)

T = TypeVar("T")
NO_IMAGE = "Upload an image to inspect first (the “Image to inspect” box)."
NO_PROFILE = "(none)"  # the picker's value for "no profile": no profile name can start with "("
PROFILE_AND_REFERENCE = (
    "Choose either a normal reference image or a product profile, not both: remove the reference upload, or set "
    "“Product profile” to none."
)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Session:
    """One browser tab's chat: the uploads it is about, the messages so far and the verdict panel."""

    uploads: tuple[str, str | None]  # cache paths of the query and reference uploads (content-addressed)
    messages: tuple[dict[str, str], ...]  # finished turns, as in `Conversation.messages`
    preview: Preview
    profile: str | None = None  # the product profile the verdict was decided with


def chosen_profile(choice: str | None) -> str | None:
    """The picker's value as a profile name (None: no profile)."""
    return None if choice in (None, "", NO_PROFILE) else choice


def _upload_path(upload: dict | None) -> str | None:
    return upload["path"] if upload else None


def _panel(session: Session, opacity: float, folder: Path) -> tuple:
    """Verdict label, domain notice, heatmap overlay and ROI boxes, the images as PNG files in `folder`.

    Files, not PIL images: a turn sends its panel twice (when the answer starts and with the final outputs),
    and Gradio re-encodes a PIL output into its cache in place each time, so a browser still fetching the
    first copy could get a half-rewritten file; a file Gradio copies once and then finds in its cache.
    """
    heatmap, rois = folder / "heatmap.png", folder / "rois.png"
    overlay(session.preview, opacity).save(heatmap, format="PNG")
    base, annotations = regions(session.preview)
    base.save(rois, format="PNG")
    verdict = session.preview.verdict
    notice = domain_notice(verdict)
    if session.profile is not None:
        notice += f"\n\n{profile_notice(session.profile, verdict)}"
    return verdict_label(verdict), notice, str(heatmap), (str(rois), annotations)


def _conversation(uploads: tuple[str, str | None], messages: list[dict[str, str]]) -> Conversation:
    """The conversation about these uploads, the images read from Gradio's upload cache."""
    image, reference = uploads
    try:
        return Conversation(load_image(image, "image"), load_references([reference] if reference else []), messages)
    except ImageError as error:
        raise gr.Error(f"Cannot use this upload: {error}", print_exception=False) from error


def unlock_question() -> gr.Textbox:
    return gr.Textbox(interactive=True)


def clear_chat() -> tuple:
    """Outputs chat, label, domain notice, overlay, boxes, session: all empty, the uploads and question kept."""
    return [], None, "", None, None, None


def reset() -> tuple:
    """clear_chat's outputs, then the question, image and reference boxes: everything empty."""
    return *clear_chat(), "", None, None


def _user_error(error: Exception) -> gr.Error:
    """A user-facing error as it is (an endpoint that is down, say); anything else as one line, traced in the log."""
    if isinstance(error, AssistantError):
        return gr.Error(str(error), print_exception=False)
    logger.exception("unexpected error in the app")
    return gr.Error(f"Something went wrong: {one_line(error)} (details in the app's log)", print_exception=False)


@contextlib.contextmanager
def _shown_as_one_line() -> Iterator[None]:
    """Any failure inside becomes one message for the user (`_user_error`); a gr.Error passes as it is."""
    try:
        yield
    except gr.Error:
        raise
    except Exception as error:
        raise _user_error(error) from error


def reported(handler: Callable[..., T]) -> Callable[..., T]:
    """An event handler (streaming or not) whose failures reach the user as one message, never raw exception text."""
    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def stream(*args, **kwargs):
            with _shown_as_one_line():
                yield from handler(*args, **kwargs)

        return stream

    @functools.wraps(handler)
    def call(*args, **kwargs):
        with _shown_as_one_line():
            return handler(*args, **kwargs)

    return call


class ChatHandlers:
    """Handlers bound to one engine; the session lives in gr.State, one per browser tab or API client."""

    def __init__(self, engine: Engine, max_new_tokens: int = 256):
        self.engine = engine
        self.max_new_tokens = max_new_tokens

    def _start(self, conversation: Conversation, uploads: tuple[str, str | None], profile: str | None) -> Session:
        """A new session: the decided verdict (with the product profile, if one is chosen), kept only as the panel
        shows it."""
        if profile is None:  # the two-argument call: any Engine, profiles or not
            verdict = self.engine.analyze(conversation.image, conversation.references)
        else:
            verdict = self.engine.analyze(conversation.image, conversation.references, profile=profile)
        return Session(uploads, (), make_preview(conversation.image, verdict), profile)

    @reported
    def chat(
        self,
        question: str,
        image: dict | None,
        reference: dict | None,
        opacity: float,
        profile: str | None,
        session: Session | None,
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Answer one question, streamed; outputs: chat, question box, label, domain notice, overlay, boxes, session.

        The question box is emptied and locked while the answer streams (`unlock_question` follows every
        turn): a second question sent meanwhile would start from the session as it was before this turn.
        A question about the uploads of the current session continues it (the engine reuses the encoded
        image); new uploads or another product profile (`profile`, the picker's value) start a new conversation
        with a fresh verdict. Answers agree with the verdict (`engine.agreeing_stream`): a follow-up may discuss
        it, not flip it. The session is only replaced by the last yield, so a failed turn leaves it as it was.
        That last yield repeats every output: API clients receive only the final tuple, and `gr.skip()`
        placeholders would reach them as-is.
        """
        question = (question or "").strip() or INSPECTION_QUESTION
        uploads = (_upload_path(image), _upload_path(reference))
        profile = chosen_profile(profile)
        if uploads[0] is None:
            raise gr.Error(NO_IMAGE, print_exception=False)
        if profile is not None and uploads[1] is not None:
            raise gr.Error(PROFILE_AND_REFERENCE, print_exception=False)
        continues = session is not None and session.uploads == uploads and session.profile == profile
        conversation = _conversation(uploads, [*session.messages] if continues else []).ask(question)
        if continues:
            turn = session
        else:
            progress(None, desc="Analysing the image…")
            turn = self._start(conversation, uploads, profile)
        skip, locked = gr.skip(), gr.Textbox(value="", interactive=False)
        folder = Path(tempfile.mkdtemp(prefix="anomaly-assistant-panel-"))  # this turn's panel files
        try:
            panel = _panel(turn, opacity, folder)
            yield chat_history(conversation, uploads[0], pending=""), locked, *panel, skip
            answer = ""
            anomalous = turn.preview.verdict.anomalous
            for chunk in agreeing_stream(self.engine, conversation, anomalous, self.max_new_tokens):
                answer += chunk
                yield chat_history(conversation, uploads[0], pending=answer), skip, skip, skip, skip, skip, skip
            conversation.answer(answer.strip())
            finished = replace(turn, messages=tuple(conversation.messages))
            yield chat_history(conversation, uploads[0]), locked, *panel, finished
        finally:  # Gradio has copied the files into its cache by the time the generator is resumed
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    @reported
    def reblend(opacity: float, session: Session | None) -> Image.Image | dict:
        """The heatmap overlay at a new opacity (nothing to redraw before the first answer)."""
        return gr.skip() if session is None else overlay(session.preview, opacity)

    @staticmethod
    @reported
    def new_uploads(image: dict | None, reference: dict | None) -> tuple:
        """A new image starts a new chat; a file that cannot be used is reported right away."""
        for upload, name in ((image, "image"), (reference, "reference")):
            if upload is not None:
                try:
                    load_image(upload["path"], name)
                except ImageError as error:
                    gr.Warning(f"Cannot use this upload: {error}")
        return clear_chat()
