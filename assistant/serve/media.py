"""vLLM's media fetching and decoding for the assistant: the URL policy of `urls.py` and the project's own decoder.

vLLM's default media connector fetches any http(s) URL and decodes with its own limits, so a 400-megapixel
bomb or an unreachable URL became a 500 and `file://` a 500 too. This connector (registered as
`plugin.MEDIA_CONNECTOR_NAME`; `serve` selects it through `VLLM_MEDIA_CONNECTOR`) reads images exactly as
every other surface does (`image_io.load_image`), fetches every URL of any modality under the same policy,
and maps what is wrong to the status codes of docs/serving.md.
"""

from __future__ import annotations

import asyncio
from functools import partial
from http import HTTPStatus

from PIL import Image
from vllm import envs
from vllm.connections import HTTPConnection, global_http_connection
from vllm.exceptions import GracefulHTTPError, VLLMError, VLLMValidationError
from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector
from vllm.multimodal.media.base import MediaIO, MediaWithBytes
from vllm.multimodal.media.connector import global_thread_pool

from ..image_io import MAX_BYTES, ImageError, ImageTooLargeError, load_image
from .plugin import MEDIA_CONNECTOR_NAME
from .urls import Fetch, ImageUrlError, ImageUrlPolicy

CHUNK = 1 << 16


def http_error(error: ImageError) -> VLLMError:
    """413 for an image over a size limit, 400 for every other problem with an image or its URL."""
    if isinstance(error, ImageTooLargeError):
        return GracefulHTTPError(str(error), HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return VLLMValidationError(str(error), parameter="image_url")


def fetch_bytes(url: str, connection: HTTPConnection = global_http_connection) -> bytes:
    """GET an allowed URL once (vLLM's fetch timeout; no retries, which would hold a decoding thread for
    minutes on a host that never answers), refusing redirects (they could lead off the allow-list) and
    stopping at the byte limit."""
    with connection.get_response(
        url, stream=True, timeout=envs.VLLM_IMAGE_FETCH_TIMEOUT, allow_redirects=False
    ) as response:
        if response.is_redirect:
            raise ImageUrlError(
                f"image: {url} answered with a redirect ({response.status_code}), which is not followed"
            )
        response.raise_for_status()
        data = bytearray()
        for chunk in response.iter_content(CHUNK):
            data += chunk
            if len(data) > MAX_BYTES:
                raise ImageTooLargeError(f"image: {url} is more than the {MAX_BYTES // 2**20} MiB limit")
        return bytes(data)


def read_image(
    url: str, policy: ImageUrlPolicy, fetch: Fetch = fetch_bytes, name: str = "image"
) -> MediaWithBytes[Image.Image]:
    """The decoded image behind `url` (with its bytes, which vLLM hashes for its caches), or the HTTP error."""
    try:
        data = policy.image_bytes(url, fetch, name)
        return MediaWithBytes(load_image(data, name), data)
    except ImageError as error:
        raise http_error(error) from error


@MEDIA_CONNECTOR_REGISTRY.register(MEDIA_CONNECTOR_NAME)
class AssistantMediaConnector(MediaConnector):
    """Images through `read_image`; any other media URL fetched under the same policy. The allow-list is
    vLLM's `--allowed-media-domains`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = ImageUrlPolicy.from_domains(self.allowed_media_domains)
        self.fetch = partial(fetch_bytes, connection=self.connection)

    def fetch_image(self, image_url: str, *, image_mode: str | None = "RGB") -> MediaWithBytes[Image.Image]:
        return read_image(image_url, self.policy, self.fetch)

    async def fetch_image_async(
        self, image_url: str, *, image_mode: str | None = "RGB"
    ) -> MediaWithBytes[Image.Image]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(global_thread_pool, self.fetch_image, image_url)

    def load_from_url(self, url: str, media_io: MediaIO, *, fetch_timeout: int | None = None):
        try:
            return media_io.load_bytes(self.policy.image_bytes(url, self.fetch, "media"))
        except ImageError as error:
            raise http_error(error) from error

    async def load_from_url_async(self, url: str, media_io: MediaIO, *, fetch_timeout: int | None = None):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(global_thread_pool, partial(self.load_from_url, url, media_io))
