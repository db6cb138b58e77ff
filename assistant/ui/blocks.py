"""The app's layout and wiring: uploads and chat on the left, the verdict panel on the right.

Every event has an `elem_id`-addressable component and a stable API name (`/chat`, `/reblend`, `/reset`),
so the browser test and gradio_client drive exactly what a user sees. `/chat` takes the question, the image, the
reference, the heatmap opacity and the product profile (optional: default none).

The "Product profile" picker (`#profile`) lists the backend's enrolled profiles (`Backend.profiles`, read at
start); it is hidden when there are none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import gradio as gr
from gradio_client.utils import is_http_url_like

from ..card import ModelCard
from ..engine import Engine
from .examples import EXAMPLES_DIR, Example, write_examples
from .handlers import NO_PROFILE, ChatHandlers, clear_chat, reset, unlock_question

TITLE = "Anomaly inspection assistant"
INTRO = (
    "Upload an image of the kind this model knows (its card below says which), optionally a known-good reference "
    "of the same object, and ask about it. The verdict, heatmap and suspicious regions appear on the right; "
    "follow-up questions keep the conversation."
)
NO_CARD = "**No model card:** nothing is known about what this model was trained on; treat its verdicts with care."
MAX_UPLOAD = "20mb"  # bytes per file; image_io.MAX_PIXELS caps the decoded size
URL_REFUSED = "The app takes uploaded image files only, not URLs: download the image and upload it."
SESSION_TTL_S = 3600  # a session idle this long is dropped (its next question starts a new conversation)
CSS = """
#notice, #domain {background: #fff4e5; border: 2px solid #e8a33d; border-radius: 8px; padding: 4px 14px}
#backend {opacity: 0.75}
#heatmap img {width: 100%; height: 100%; object-fit: contain}
"""


def _uploads_only(move: Callable) -> Callable:
    """Gradio's move-to-cache of an input, refusing URLs: given one instead of a file (possible through the
    API), Gradio would download it on the server, and the app makes no requests of its own."""

    def refuse_urls(url_or_file_path: str | Path | None):
        if isinstance(url_or_file_path, str) and is_http_url_like(url_or_file_path):
            raise gr.Error(URL_REFUSED, print_exception=False)
        return move(url_or_file_path)

    return refuse_urls


def _upload(label: str, elem_id: str) -> gr.Image:
    image = gr.Image(type="filepath", label=label, sources=["upload", "clipboard"], height=220, elem_id=elem_id)
    # Instance attributes, not a subclass: Gradio writes a .pyi stub for every Component subclass it meets.
    image.move_resource_to_block_cache = _uploads_only(image.move_resource_to_block_cache)
    image.async_move_resource_to_block_cache = _uploads_only(image.async_move_resource_to_block_cache)
    return image


def build_demo(
    engine: Engine,
    notice: str | None = None,
    backend: str = "",
    max_new_tokens: int = 256,
    card: ModelCard | None = None,
    examples: list[Example] | None = None,
    profiles: Sequence[str] = (),
) -> gr.Blocks:
    """The chat app around `engine`; `notice` is shown as a banner (e.g. that no trained weights were found),
    `card` in the header; `examples` are the model's own (default: parts drawn in code); `profiles` are the
    product profiles the engine can use (the picker is hidden without any)."""
    handlers = ChatHandlers(engine, max_new_tokens)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        if notice:
            gr.Markdown(f"⚠️ {notice}", elem_id="notice")
        gr.Markdown(f"**Model:** {card.headline()}" if card else NO_CARD, elem_id="model-card")
        if card:
            with gr.Accordion("Model card", open=False):
                gr.Markdown(card.markdown())
        if backend:
            gr.Markdown(f"Backend: {backend}", elem_id="backend")
        session = gr.State(None, time_to_live=SESSION_TTL_S)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    image = _upload("Image to inspect", "image")
                    reference = _upload("Normal reference (optional)", "reference")
                profile = gr.Dropdown(
                    choices=[("none", NO_PROFILE), *((name, name) for name in profiles)],
                    value=NO_PROFILE,
                    label="Product profile",
                    info="an enrolled product's normal look decides instead of a reference upload",
                    visible=bool(profiles),
                    interactive=True,
                    elem_id="profile",
                )
                chatbot = gr.Chatbot(
                    label="Chat", height=420, buttons=["copy", "copy_all"], feedback_options=None, elem_id="chatbot"
                )
                question = gr.Textbox(
                    placeholder="Ask about the image, e.g. “Is there a defect? Where?” (Enter sends)",
                    label="Question",
                    show_label=False,
                    submit_btn="Ask",
                    elem_id="question",
                )
                reset_button = gr.Button("Clear all", variant="secondary", elem_id="reset")
            with gr.Column(scale=2):
                label = gr.Label(label="Verdict (anomaly score)", num_top_classes=2, elem_id="verdict")
                domain = gr.Markdown("", elem_id="domain")
                heatmap = gr.Image(
                    label="Anomaly heatmap (blue = normal, red = suspicious)",
                    interactive=False,
                    format="png",
                    buttons=["download", "fullscreen"],
                    height=300,
                    elem_id="heatmap",
                )
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity", elem_id="opacity")
                rois = gr.AnnotatedImage(
                    label="Suspicious regions (ROI boxes)",
                    format="png",
                    buttons=["fullscreen"],
                    height=300,
                    elem_id="rois",
                )
        gr.Examples(
            [[str(e.image), e.reference and str(e.reference), e.question] for e in examples or write_examples()],
            inputs=[image, reference, question],
            label="Examples: click one, then press Ask",
        )

        chat_view = [chatbot, label, domain, heatmap, rois, session]
        question.submit(
            handlers.chat,
            [question, image, reference, opacity, profile, session],
            [chatbot, question, label, domain, heatmap, rois, session],
            api_name="chat",
            preprocess=False,
            concurrency_id="model",
            concurrency_limit=1,  # one model: later questions wait in the queue and see their position
            show_progress="full",
            show_progress_on=[chatbot],
        ).then(unlock_question, None, question, api_visibility="private", show_progress="hidden")
        opacity.release(handlers.reblend, [opacity, session], heatmap, api_name="reblend", show_progress="hidden")
        reset_button.click(reset, None, [*chat_view, question, image, reference], api_name="reset")
        chatbot.clear(clear_chat, None, chat_view, api_visibility="private", show_progress="hidden")
        profile.change(clear_chat, None, chat_view, api_visibility="private", show_progress="hidden")
        for upload in (image, reference):
            upload.change(
                handlers.new_uploads,
                [image, reference],
                chat_view,
                preprocess=False,
                api_visibility="private",
                show_progress="hidden",
            )
    return demo


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    block: bool = True,
    examples: list[Example] | None = None,
) -> str:
    """Serve `demo` with the app's limits and privacy settings; returns the local URL (when not blocking).

    Files are served only from the drawn examples' folder and the model's example files (`examples`)."""
    demo.queue(max_size=64)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        quiet=not block,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[str(EXAMPLES_DIR), *(str(p) for e in examples or [] for p in (e.image, e.reference) if p)],
        show_error=True,
        ssr_mode=False,
        run_history=False,  # inspection photos may be confidential: keep no run log in the browser
        footer_links=["api"],
        css=CSS,
    )
    return url
