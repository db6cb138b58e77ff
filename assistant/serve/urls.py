"""Which image URLs the server accepts, and their bytes: data URLs by default, http(s) only from allow-listed hosts.

A server that fetches any URL a client names can be made to reach what only it can reach (loopback
services, the private network, cloud metadata at 169.254.169.254): server-side request forgery. So by
default the server reads images only from base64 `data:` URLs. Fetching is opt-in (`serve
--allow-image-domain HOST[:PORT]`, which becomes vLLM's `--allowed-media-domains`): the URL's host (and port,
when the entry names one) must be on the list, every address the host resolves to must be a public one unless
that address is itself on the list, and redirects are not followed. `file://` and other schemes are always
refused, and so are URLs with user info or backslashes, which URL parsers read differently.

The URL is parsed with urllib3, the parser of the HTTP client that fetches it, and the URL fetched is the
one rebuilt from the checked parts. No vLLM import here: the same rules serve the chat route (through
`media.py`) and `/v1/inspect`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from urllib3.exceptions import LocationParseError
from urllib3.util import Url, parse_url

from ..image_io import ImageError

Fetch = Callable[[str], bytes]  # url -> body; raises on network failure
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 addresses spelled as IPv6 by NAT64 gateways


class ImageUrlError(ImageError):
    """An image URL the server will not or cannot read (answered with 400 and this reason)."""


def data_url_bytes(url: str, name: str = "image") -> bytes:
    """The payload of `data:[<type>];base64,<data>`; anything else is an `ImageUrlError` naming what is wrong."""
    header, comma, payload = url.partition(",")
    if not (header[:5].lower() == "data:" and comma):
        raise ImageUrlError(f"{name}: expected a base64 data URL (data:image/png;base64,...)")
    if not header.lower().endswith(";base64"):
        raise ImageUrlError(f"{name}: only base64 data URLs are accepted (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ImageUrlError(f"{name}: invalid base64 ({error})") from error


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def is_public(address: str) -> bool:
    """A globally routable address, and so is the IPv4 address an IPv6 form wraps (mapped, 6to4, Teredo, NAT64)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        wrapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if wrapped is None and ip in NAT64:
            wrapped = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        return wrapped is None or wrapped.is_global
    return True


@dataclass(frozen=True)
class AllowedHost:
    host: str
    port: int | None  # None: any port

    @classmethod
    def parse(cls, entry: str) -> AllowedHost:
        parts = parse_url("//" + entry.strip())
        return cls((parts.host or "").lower().strip("[]"), parts.port)


@dataclass(frozen=True)
class ImageUrlPolicy:
    """The hosts (names or IP addresses, optionally with a port) whose http(s) image URLs the server may fetch."""

    allowed: tuple[AllowedHost, ...] = ()
    resolve: Callable[[str, int], list[str]] = _resolve

    @classmethod
    def from_domains(cls, domains: Sequence[str] | None, **kwargs) -> ImageUrlPolicy:
        return cls(tuple(AllowedHost.parse(domain) for domain in domains or () if domain.strip()), **kwargs)

    def _listed(self, host: str, port: int | None = None) -> bool:
        return any(entry.host == host and entry.port in (None, port) for entry in self.allowed)

    def check(self, url: str, name: str = "image") -> str:
        """The URL to fetch (rebuilt from its checked parts), or an `ImageUrlError` saying why it is refused."""
        if "\\" in url:
            raise ImageUrlError(f"{name}: a URL with a backslash is refused (parsers disagree on its host)")
        try:
            parts = parse_url(url)
        except LocationParseError as error:
            raise ImageUrlError(f"{name}: not a valid URL ({error})") from error
        scheme = (parts.scheme or "").lower()
        if scheme == "file":
            raise ImageUrlError(f"{name}: file:// URLs are refused; send the image as a base64 data URL")
        if scheme not in ("http", "https"):
            raise ImageUrlError(f"{name}: unsupported URL scheme {scheme or '(none)'!r}; send a base64 data URL")
        host = (parts.host or "").lower().strip("[]")
        if not host:
            raise ImageUrlError(f"{name}: the URL has no host")
        if parts.auth is not None:
            raise ImageUrlError(f"{name}: a URL with user info (user@host) is refused")
        if not self.allowed:
            raise ImageUrlError(
                f"{name}: this server does not fetch image URLs; send a base64 data URL "
                "(or start it with --allow-image-domain HOST)"
            )
        port = parts.port or (443 if scheme == "https" else 80)
        if not self._listed(host, port):
            raise ImageUrlError(f"{name}: {host}:{port} is not on this server's image allow-list")
        try:
            addresses = self.resolve(host, port)
        except (OSError, UnicodeError) as error:
            raise ImageUrlError(f"{name}: cannot resolve {host!r} ({error})") from error
        for address in addresses:
            if not is_public(address) and not self._listed(address.split("%")[0], port):
                raise ImageUrlError(
                    f"{name}: {host!r} resolves to the non-public address {address}; "
                    "allow-list that address too if the server should fetch from it"
                )
        return Url(scheme, None, parts.host, parts.port, parts.path, parts.query).url

    def image_bytes(self, url: str, fetch: Fetch, name: str = "image") -> bytes:
        """The bytes behind an accepted image URL; a failed fetch is an `ImageUrlError` with its reason."""
        if url[:5].lower() == "data:":
            return data_url_bytes(url, name)
        checked = self.check(url, name)
        try:
            return fetch(checked)
        except ImageError:
            raise
        except Exception as error:  # any network or HTTP failure is the URL's problem, reported to the client
            raise ImageUrlError(f"{name}: cannot fetch {checked} ({type(error).__name__}: {error})") from error
