"""`vllm.endpoint_plugins` entry point: with an API key, every route needs it except the open probes.

vLLM's own key check guards only some path prefixes (/v1, /v2, /inference, /cohere): `POST /invocations`
ran chat completions without a key, and `/tokenize`, `/scale_elastic_ep` and the docs answered too. This
guard turns the rule around: a request carries the key (`Authorization: Bearer KEY`) or gets 401, whatever
its path and method, so a route that a later vLLM adds is guarded from its first release. Only `OPEN_PATHS`
answer without the key. Browsers' CORS preflights never reach the guard: vLLM's CORS middleware sits outside
it and answers them itself.
"""

from __future__ import annotations

from argparse import Namespace

from fastapi import FastAPI
from starlette.datastructures import Headers, State
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from vllm import envs
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from .plugin import AUTH_PLUGIN_NAME, OPEN_PATHS


class KeyGuard(AuthenticationMiddleware):
    """vLLM's constant-time key check, applied to every path but `OPEN_PATHS`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/") or "/"
        if path in OPEN_PATHS or self.verify_token(Headers(scope=scope)):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": "Unauthorized"})
        return await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)


def server_keys(args: Namespace) -> list[str]:
    """The keys vLLM itself would accept: --api-key, else $VLLM_API_KEY (what `anomaly-assistant serve` sets)."""
    return [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]


class AuthPlugin:
    name = AUTH_PLUGIN_NAME
    required_tasks = None  # every server, whatever it serves

    def attach_router(self, app: FastAPI) -> None:
        if keys := server_keys(app.state.args):
            app.add_middleware(KeyGuard, tokens=keys)

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        """Nothing to set up: the guard is middleware."""
