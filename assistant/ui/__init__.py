"""The Gradio chat app: `build_demo(engine)` makes the Blocks, `launch(demo)` serves them (see app.py)."""

from .backend import Backend, load_backend
from .blocks import build_demo, launch

__all__ = ["Backend", "build_demo", "launch", "load_backend"]
