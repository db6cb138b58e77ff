"""Drives the server's profile surfaces (`GET /v1/profiles`, `profile` on `POST /v1/inspect`) and prints what they
answered, as JSON.

Executed by tests/test_profiles_surfaces.py with the serving interpreter (vLLM is not installed in the main
environment): `python tests/serve_profile_checks.py CHECKPOINT OTHER_CHECKPOINT IMAGE`. No engine is started:
the plugin's routes run in a FastAPI app with vLLM's own exception handlers, the image side is the server's
(`analysis.analysis_engine`), and the LLM's P(Yes) is fixed at 0.5 (the chat handler is vLLM's engine).
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace

import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

from assistant.checkpoint import checkpoint_config
from assistant.client import data_url
from assistant.image_io import load_image
from assistant.serve import endpoint, inspection
from assistant.serve.urls import ImageUrlPolicy

YES_PROBABILITY = 0.5


def fixed_choices(self, conversations, choices):
    return [{choice: YES_PROBABILITY if choice == "Yes" else 1 - YES_PROBABILITY for choice in choices}] * len(
        conversations
    )


def served(path: str) -> TestClient:
    app = FastAPI()
    init_exception_handler(app)
    endpoint.InspectPlugin().attach_router(app)
    app.state.args = Namespace(log_error_stack=False)  # what vLLM's error handlers read
    app.state.anomaly_inspector = endpoint.Inspector(
        None, path, checkpoint_config(path), ["tiny"], torch.float32, ImageUrlPolicy.from_domains(None), 4
    )
    return TestClient(app)


def answer(response) -> dict:
    body = response.json()
    if response.status_code != 200:
        return {"status": response.status_code, "message": body["error"]["message"], "param": body["error"]["param"]}
    fields = ("anomalous", "score", "reference_distance", "in_domain", "expert_score")
    return {"status": 200, **{key: body[key] for key in fields}}


def main(path: str, other: str, image_path: str) -> None:
    inspection.ServerEngine.choice_probabilities = fixed_choices
    image = data_url(load_image(image_path))
    report = {"schema": endpoint.InspectRequest.model_json_schema()["properties"]["profile"]}
    with served(path) as client:
        report["profiles"] = client.get("/v1/profiles").json()
        inspect = {
            "profile": {"image_url": image, "profile": "parts", "max_tokens": 0},
            "no profile": {"image_url": image, "max_tokens": 0},
            "unknown": {"image_url": image, "profile": "nope", "max_tokens": 0},
            "bad name": {"image_url": image, "profile": "../up", "max_tokens": 0},
            "with references": {"image_url": image, "reference_urls": [image], "profile": "parts", "max_tokens": 0},
        }
        report["inspect"] = {case: answer(client.post("/v1/inspect", json=body)) for case, body in inspect.items()}
    with served(other) as client:
        body = {"image_url": image, "profile": "parts", "max_tokens": 0}
        report["inspect"]["other model"] = answer(client.post("/v1/inspect", json=body))
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
