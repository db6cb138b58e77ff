"""The server's image URL policy: data URLs by default, allow-listed public hosts only, never file:// (no vLLM)."""

from __future__ import annotations

import base64

import pytest

from assistant.serve.urls import ImageUrlError, ImageUrlPolicy, data_url_bytes, is_public

PNG = b"\x89PNG fake bytes"
PUBLIC = "93.184.216.34"


def policy(*domains: str, table: dict[str, list[str]] | None = None) -> ImageUrlPolicy:
    table = {"images.example.com": [PUBLIC], "cdn.example.com": [PUBLIC], **(table or {})}

    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("Name or service not known")
        return table[host]

    return ImageUrlPolicy.from_domains(domains, resolve=resolve)


def never_fetch(url: str) -> bytes:
    raise AssertionError(f"fetched {url}")


def test_data_urls_decode_and_malformed_ones_say_what_is_wrong():
    assert data_url_bytes("data:image/png;base64," + base64.b64encode(PNG).decode()) == PNG
    assert data_url_bytes("DATA:image/png;BASE64," + base64.b64encode(PNG).decode()) == PNG
    cases = {
        "data:image/png,rawbytes": "only base64 data URLs",
        "data:image/png;base64,%%%": "invalid base64",
        "data:image/png;base64": "expected a base64 data URL",
    }
    for url, reason in cases.items():
        with pytest.raises(ImageUrlError, match=reason):
            data_url_bytes(url)


def test_by_default_no_url_is_fetched():
    default = ImageUrlPolicy.from_domains(None)
    for url, reason in {
        "https://example.com/part.png": "does not fetch image URLs",
        "http://127.0.0.1:8000/v1/models": "does not fetch image URLs",
        "file:///etc/passwd": "file:// URLs are refused",
        "FILE:///etc/passwd": "file:// URLs are refused",
        "ftp://example.com/a.png": "unsupported URL scheme 'ftp'",
        "part.png": "unsupported URL scheme",
        "http://[::1/a.png": "not a valid URL",
    }.items():
        with pytest.raises(ImageUrlError, match=reason):
            default.image_bytes(url, never_fetch)
    assert default.image_bytes("data:;base64," + base64.b64encode(PNG).decode(), never_fetch) == PNG


def test_allow_listed_public_hosts_are_fetched_by_the_url_rebuilt_from_the_checked_parts():
    allowed = policy("images.example.com")
    fetched = []
    url = "HTTPS://IMAGES.example.com/a.png?size=1#top"
    assert allowed.image_bytes(url, lambda u: fetched.append(u) or PNG) == PNG
    assert fetched == ["https://images.example.com/a.png?size=1"]
    with pytest.raises(ImageUrlError, match="cdn.example.com:443 is not on this server's image allow-list"):
        allowed.image_bytes("https://cdn.example.com/a.png", never_fetch)
    with pytest.raises(ImageUrlError, match="file:// URLs are refused"):
        allowed.image_bytes("file://images.example.com/etc/passwd", never_fetch)


def test_urls_that_parsers_read_differently_are_refused():
    """requests' parser reads the host of `http://169.254.169.254\\@images.example.com/` as the metadata address."""
    allowed = policy("images.example.com")
    for url, reason in {
        "http://169.254.169.254\\@images.example.com/a.png": "backslash",
        "http://127.0.0.1\\@images.example.com/a.png": "backslash",
        "http://user:pass@images.example.com/a.png": "user info",
        "http://169.254.169.254@images.example.com/a.png": "user info",
    }.items():
        with pytest.raises(ImageUrlError, match=reason):
            allowed.image_bytes(url, never_fetch)


def test_a_port_on_the_list_opens_that_port_only():
    allowed = policy("images.example.com:8443")
    assert allowed.image_bytes("https://images.example.com:8443/a.png", lambda u: PNG) == PNG
    for url in ("https://images.example.com/a.png", "http://images.example.com:8444/a.png"):
        with pytest.raises(ImageUrlError, match="not on this server's image allow-list"):
            allowed.image_bytes(url, never_fetch)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "::1", "fd00::1", "fe80::1%eth0", "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1",
    ],
)  # fmt: skip
def test_an_allowed_name_that_resolves_to_a_non_public_address_is_refused(address):
    """DNS pointing an allowed name at the metadata service or the LAN, in any spelling, gets nothing fetched."""
    allowed = policy("images.example.com", table={"images.example.com": [PUBLIC, address]})
    with pytest.raises(ImageUrlError, match="non-public address"):
        allowed.image_bytes("http://images.example.com/a.png", never_fetch)
    assert not is_public(address)


def test_public_addresses_in_ipv6_forms_stay_public():
    assert all(is_public(a) for a in (PUBLIC, "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::1"))


def test_a_non_public_address_is_fetched_only_when_it_is_allow_listed_itself():
    allowed = policy("127.0.0.1:9000", "[::1]:9000", table={"127.0.0.1": ["127.0.0.1"], "::1": ["::1"]})
    assert allowed.image_bytes("http://127.0.0.1:9000/a.png", lambda u: PNG) == PNG
    assert allowed.image_bytes("http://[::1]:9000/a.png", lambda u: PNG) == PNG
    for url in ("http://localhost:9000/a.png", "http://127.0.0.1:8000/v1/models"):
        with pytest.raises(ImageUrlError, match="not on this server's image allow-list"):
            allowed.image_bytes(url, never_fetch)


def test_unresolvable_and_unreachable_urls_are_the_clients_problem():
    allowed = policy("gone.example.com", "images.example.com")
    with pytest.raises(ImageUrlError, match="cannot resolve 'gone.example.com'"):
        allowed.image_bytes("http://gone.example.com/a.png", never_fetch)

    def refuse(url: str) -> bytes:
        raise ConnectionRefusedError("Connection refused")

    with pytest.raises(ImageUrlError, match="cannot fetch .*ConnectionRefusedError"):
        allowed.image_bytes("http://images.example.com/a.png", refuse)
