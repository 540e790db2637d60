"""A GGUF on a web server (https://, or hf://owner/repo/file) judged from its header alone: HTTP
Range requests feed gguf_model's own parser, so a 400 GB model costs a few MB of traffic.

- `RangeFile` is a read-only file object whose reads are Range GETs; the parser asks only for
  what it walks (skipped arrays are never fetched) and never past gguf_model.MAX_HEADER_BYTES.
- A split model's other shards follow from the first's name (`-00001-of-0000N.gguf`).
- What was fetched is cached under cache_root()/headers/ by URL with the server's validator (ETag,
  else Last-Modified). A later read sends one HEAD per shard and, when the validator and the size
  still match, replays the cached bytes through the parser: no GET at all.
- `HF_TOKEN` is sent as a Bearer token (to the endpoint's host only, not to the CDN it redirects
  to); `HF_ENDPOINT` replaces https://huggingface.co.
Standard library only (urllib): a handful of Range GETs and a HEAD need no HTTP client library.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from cputune.core import checks
from cputune.model import gguf_model as gm
from cputune.core.errors import ConfigError, GGUFError, ModelError, NetworkError, WriteError
from cputune.core.fsutil import atomic_write_bytes, cache_root, open_regular
from cputune.core.units import is_ascii_int

SCHEMES = ("https://", "http://", "hf://")
DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 30.0
# The first request of a file asks for this much; each next one for twice the last, up to what the
# parser asks (gguf_model.CHUNK_BYTES): a header of 40 KB costs one small request, one of 20 MB
# (a DeepSeek vocabulary) about as many requests as 1 MiB chunks would.
FIRST_FETCH_BYTES = 64 << 10
CACHE_VERSION = 1
USER_AGENT = "cputune (GGUF header reader)"
DOWNLOAD_HINT = "download it first (a file, or every shard of a split model), then pass its path"


def is_url(model: str) -> bool:
    return model.lower().startswith(SCHEMES)


class Url(str):
    """A model's address as the user gave it (hf://... or https://...). Where a Path is expected
    for naming (`.name` in labels and messages) it stands in; it is not a path to open."""

    @property
    def name(self) -> str:
        return unquote(_split(self, self).path.rstrip("/").rsplit("/", 1)[-1])

    def with_name(self, name: str) -> Url:
        head, _, _ = self.rpartition("/")
        return Url(f"{head}/{quote(name)}")


def _split(address: str, label: str):
    """urlsplit(address), its port checked too; ModelError naming `label` for one it cannot
    parse (`https://[::1/x.gguf`: urlsplit's ValueError 'Invalid IPv6 URL')."""
    try:
        address.encode()
    except UnicodeEncodeError:  # a byte that is not UTF-8 on the command line (\udcff)
        raise ModelError(f"{checks.shown(address)} holds a byte that is not UTF-8 text",
                         hint="write the address in UTF-8, or percent-encode the byte (%FF)") from None
    try:
        parts = urlsplit(address)
        parts.port  # noqa: B018 - parsed only when asked: ':abc' or ':99999' raise here
    except ValueError as e:
        raise ModelError(f"{label} is not a valid web address ({e})",
                         hint="write https://HOST/PATH/FILE.gguf or hf://OWNER/REPO/FILE.gguf") from None
    return parts


def _check_http(address: str, label: str) -> None:
    """An http:// or https:// address with a host: urllib would open file:// and ftp:// too."""
    parts = _split(address, label)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ModelError(f"{label} " + ("names no host" if parts.scheme.lower() in ("http", "https")
                                        else "is not an http:// or https:// address"),
                         hint="write https://HOST/PATH/FILE.gguf or hf://OWNER/REPO/FILE.gguf")


def http_url(url: str, env: Mapping[str, str] = os.environ) -> str:
    """The URL to fetch: hf://owner/repo/path/file.gguf is {HF_ENDPOINT}/owner/repo/resolve/main/
    path/file.gguf (huggingface_hub's hf_hub_url, revision main); an http(s) URL is itself.
    ModelError for an address that is neither, or that cannot be parsed; HF_ENDPOINT must be an
    http(s) address itself (file:///etc would make urllib read local files)."""
    if not url.lower().startswith("hf://"):
        _check_http(url, url)
        return _ascii(url, url)
    parts = url[len("hf://"):].split("/", 2)
    if len(parts) < 3 or not all(parts) or not parts[2].endswith(".gguf"):
        raise ModelError(f"{url} is not a Hugging Face file address",
                         hint="write hf://OWNER/REPO/FILE.gguf (FILE may hold folders)")
    endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    try:
        _check_http(endpoint, f"HF_ENDPOINT {endpoint!r}")
    except ModelError as e:
        raise ModelError(e.message, hint="set HF_ENDPOINT to an https:// address, or unset it for "
                         f"{DEFAULT_ENDPOINT}") from None
    full = f"{endpoint}/{parts[0]}/{parts[1]}/resolve/main/{parts[2]}"
    _check_http(full, url)
    return _ascii(full, url)


def _ascii(address: str, label: str) -> str:
    """The address as http.client can send it: non-ASCII, spaces and controls in the path and
    query percent-encoded (as UTF-8, what a browser does; '%' is kept, so an encoded address stays as it is); a host that is not ASCII is a ModelError (its punycode is
    the user's to give: `xn--...`)."""
    parts = _split(address, label)
    if not parts.netloc.isascii():
        raise ModelError(f"{label}: the host name {checks.shown(parts.hostname)} is not ASCII",
                         hint="write the host in its ASCII (xn--...) form")
    safe = "/%:@!$&'()*+,;=~"
    return urlunsplit((parts.scheme, parts.netloc, quote(parts.path, safe=safe),
                       quote(parts.query, safe=safe + "?"), ""))


def shard_urls(url: str) -> list[Url]:
    """Every shard's address of a split model named by any shard; [url] for one file."""
    u = Url(url)
    return [u.with_name(n) for n in gm.shard_names(u.name)]


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Follow redirects (urllib's loop detection included), keeping Authorization only when the
    redirect stays on the same host: the Hugging Face endpoint answers a file with a 302 to a CDN
    URL that carries its own signature, and the token must not travel there."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and req.has_header("Authorization") \
                and urlsplit(newurl).netloc == urlsplit(req.full_url).netloc:
            new.add_header("Authorization", req.get_header("Authorization"))
        return new


_OPENER = urllib.request.build_opener(_SameHostAuth)


@dataclass(slots=True)
class _Client:
    """How one model's requests are made: its token, timeout, and the count of bytes received."""

    env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = TIMEOUT_S
    bytes_received: int = 0
    requests: int = 0

    @property
    def token(self) -> str | None:
        return self.env.get("HF_TOKEN") or None

    def open(self, url: str, method: str = "GET", headers: Mapping[str, str] = {}):
        """The response to `method` on `url` (hf:// resolved); NetworkError naming `url` otherwise."""
        label = url  # errors name the address as the user wrote it (hf://...)
        req = urllib.request.Request(http_url(url, self.env), method=method,
                                     headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                                              **headers})
        if self.token:
            # Unredirected: _SameHostAuth copies it only to a redirect on the same host.
            req.add_unredirected_header("Authorization", f"Bearer {self.token}")
        self.requests += 1
        try:
            return _OPENER.open(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            e.close()
            raise _http_error(label, e.code, e.reason, self.token is not None) from None
        except TimeoutError:
            raise _timeout(label, self.timeout_s) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _timeout(label, self.timeout_s) from None
            raise NetworkError(f"cannot reach {urlsplit(req.full_url).netloc} for {label}: {e.reason}",
                               hint="check the address and the network (a proxy is taken from "
                                    "https_proxy/http_proxy)") from None
        except (http.client.HTTPException, OSError) as e:
            raise NetworkError(f"{label}: the connection failed ({e or type(e).__name__})",
                               hint="try again; if it persists, download the file") from None

    def body(self, label: str, resp, n: int) -> bytes:
        """Up to n bytes of a response's body, and the response closed."""
        try:
            data = resp.read(n)
        except TimeoutError:
            raise _timeout(label, self.timeout_s) from None
        except (http.client.HTTPException, OSError) as e:
            raise NetworkError(f"{label}: the connection broke while reading ({e or type(e).__name__})",
                               hint="try again") from None
        finally:
            resp.close()
        self.bytes_received += len(data)
        return data


def _http_error(label: str, code: int, reason: str, token: bool) -> NetworkError:
    if 300 <= code < 400:  # urllib gives up on a loop (4 visits to one URL, or 10 redirects)
        return NetworkError(f"{label}: the server redirects in a loop (HTTP {code})",
                            hint="open the address in a browser to see where it leads")
    if code in (404, 410):
        return NetworkError(f"{label}: no such file on the server (HTTP {code})",
                            hint="check the address; on Hugging Face also the repository, the file's "
                                 "folder and, for a split model, the shard names (-00001-of-0000N)")
    if code in (401, 403):
        return NetworkError(f"{label}: access denied (HTTP {code})",
                            hint="the token in HF_TOKEN lacks access to this repository" if token else
                            "a gated or private repository needs a token: set HF_TOKEN")
    return NetworkError(f"{label}: the server answered HTTP {code} {reason}".rstrip(),
                        hint="try again later, or download the file")


def _timeout(label: str, timeout_s: float) -> NetworkError:
    return NetworkError(f"{label}: no answer within {timeout_s:g} s",
                        hint="the server or the network is slow or down: try again")


def _no_range(label: str, length: str | None) -> NetworkError:
    size = f" of {gm._size_text(int(length))}" if is_ascii_int(length) else ""
    return NetworkError(f"{label}: the server ignores Range requests (it answered with the whole "
                        f"file{size}), so the header cannot be read alone",
                        hint=DOWNLOAD_HINT)


def _content_range(label: str, value: str | None, start: int) -> int:
    """The total size from `Content-Range: bytes START-END/TOTAL` (RFC 9110 14.4), checking START."""
    try:
        unit, _, rest = (value or "").partition(" ")
        span, _, total = rest.partition("/")
        first = span.partition("-")[0]
        if unit != "bytes" or not is_ascii_int(first) or int(first) != start or not is_ascii_int(total):
            raise ValueError
        return int(total)
    except ValueError:
        raise NetworkError(f"{label}: the server answered a Range request with Content-Range {value!r} "
                           f"(bytes {start}- were asked for)", hint=DOWNLOAD_HINT) from None


@dataclass(slots=True)
class _Entry:
    """What is known of one remote file: its size and validator, and the bytes fetched of it."""

    url: str
    size: int
    validator: str | None
    segments: dict[int, bytes] = field(default_factory=dict)  # offset -> bytes

    def lookup(self, pos: int, n: int) -> bytes | None:
        """Up to n bytes at pos from the fetched bytes; None when none are held there."""
        for off, data in self.segments.items():
            if off <= pos < off + len(data):
                return data[pos - off:pos - off + n]
        return None


class RangeFile(io.RawIOBase):
    """A read-only, seekable file object over one remote file: read(n) at the position is served
    from the bytes already fetched, else by one `Range: bytes=POS-END` GET (If-Range with the
    validator, so a file replaced meanwhile is an error, not a mix of two files)."""

    def __init__(self, entry: _Entry, client: _Client, label: str):
        super().__init__()
        self.entry, self.client, self.label, self.pos = entry, client, label, 0
        self.fetched = False  # whether any read went to the network
        self.window = 2 * FIRST_FETCH_BYTES  # the first request was _open_entry's

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.entry.size}[whence]
        self.pos = base + pos
        return self.pos

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes at the position: what the cached bytes hold there, else one request for
        at most the current window (short reads, as a raw file's may be)."""
        n = self.entry.size - self.pos if n < 0 else min(n, self.entry.size - self.pos)
        if n <= 0:
            return b""
        data = self.entry.lookup(self.pos, n)
        if data is None:
            ask = min(n, self.window)
            self.window *= 2
            data = self._fetch(self.pos, ask)
            self.entry.segments[self.pos] = data
            self.fetched = True
        self.pos += len(data)
        return data

    def _fetch(self, pos: int, n: int) -> bytes:
        headers = {"Range": f"bytes={pos}-{pos + n - 1}"}
        if (self.entry.validator or "").startswith('"'):  # RFC 9110 13.1.5: a strong ETag only
            headers["If-Range"] = self.entry.validator
        resp = self.client.open(self.entry.url, headers=headers)
        if resp.status != 206:
            length = resp.headers.get("Content-Length")
            resp.close()  # never read the body: it is the whole file
            if "If-Range" in headers:
                raise NetworkError(f"{self.label} changed on the server while its header was read",
                                   hint="run the command again")
            raise _no_range(self.label, length)
        total = _content_range(self.label, resp.headers.get("Content-Range"), pos)
        if total != self.entry.size:
            resp.close()
            raise NetworkError(f"{self.label} changed on the server while its header was read",
                               hint="run the command again")
        data = self.client.body(self.label, resp, n)
        if len(data) < n:
            raise NetworkError(f"{self.label}: the server sent {len(data):,} of {n:,} bytes asked for",
                               hint="try again")
        return data


def _open_entry(url: str, client: _Client) -> tuple[_Entry, bytes, str]:
    """The first GET of a file not in the cache: its size, validator and first bytes."""
    first = FIRST_FETCH_BYTES
    resp = client.open(url, headers={"Range": f"bytes=0-{first - 1}"})
    kind = resp.headers.get("Content-Type") or ""
    if resp.status != 206:
        length = resp.headers.get("Content-Length")
        resp.close()
        if "html" in kind.lower():
            raise _web_page(url)
        raise _no_range(url, length)
    size = _content_range(url, resp.headers.get("Content-Range"), 0)
    validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
    data = client.body(url, resp, min(first, size))
    return _Entry(url, size, validator, {0: data} if data else {}), data, kind


def _web_page(url: str, start: bytes | None = None) -> GGUFError:
    starts = f" (it starts with {start[:4]!r}, not b'GGUF')" if start is not None else " (the server sent a web page)"
    return GGUFError(f"{url} is not a GGUF file{starts}",
                     hint="the address is a web page, not the file: on Hugging Face use the file's "
                          "download address (/resolve/main/, not /blob/main/), or hf://OWNER/REPO/FILE.gguf")


def _head(url: str, client: _Client) -> tuple[int | None, str | None]:
    resp = client.open(url, method="HEAD")
    resp.close()
    length = resp.headers.get("Content-Length")
    return (int(length) if is_ascii_int(length) else None,
            resp.headers.get("ETag") or resp.headers.get("Last-Modified"))


# --------------------------------------------------------------------------------------------
# the header cache: one file per URL, a JSON line then the fetched bytes


def cache_dir() -> Path:
    return cache_root() / "headers"


def _cache_path(folder: Path, url: str) -> Path:
    """One file per address fetched (an hf:// name at another HF_ENDPOINT is another file)."""
    return folder / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".gguf-header")


def _load(path: Path, url: str) -> _Entry | None:
    """A cached entry, or None for none, another URL's, another format's or a damaged one."""
    try:
        fd, _ = open_regular(path)  # never a FIFO or a device in its place
    except ConfigError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            head = json.loads(f.readline(1 << 20))
            blob = f.read(gm.MAX_HEADER_BYTES)
        if not isinstance(head, dict) or head.get("version") != CACHE_VERSION or head.get("url") != url:
            return None
        size, validator = head["size"], head["validator"]
        if not (isinstance(size, int) and size >= 0 and (validator is None or isinstance(validator, str))):
            return None
        segments, at = {}, 0
        for off, n in head["segments"]:
            if not (isinstance(off, int) and isinstance(n, int) and off >= 0 and n >= 0):
                return None
            segments[off] = blob[at:at + n]
            at += n
        if at != len(blob):
            return None
        return _Entry(url, size, validator, segments)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _save(path: Path, entry: _Entry, where: str) -> None:
    segs = sorted(entry.segments.items())
    head = {"version": CACHE_VERSION, "url": where, "size": entry.size, "validator": entry.validator,
            "segments": [[off, len(b)] for off, b in segs]}
    try:
        atomic_write_bytes(path, json.dumps(head).encode() + b"\n" + b"".join(b for _, b in segs),
                           make_parents=True)
    except WriteError:
        pass  # a cache that cannot be written (read-only home, full disk) costs the next call a re-read


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteRead:
    """A remote model's profile and what reading it cost."""

    profile: gm.ModelProfile
    requests: int  # HTTP requests sent (a HEAD per cached shard, else Range GETs)
    bytes_received: int  # body bytes received
    from_cache: bool  # every shard's header came from the cache


def _read_shard(url: Url, client: _Client, folder: Path) -> tuple[gm.RawGGUF, bool]:
    where = http_url(url, client.env)
    path = _cache_path(folder, where)
    entry = _load(path, where)
    cached = False
    if entry is not None:
        try:
            size, validator = _head(url, client)
        except NetworkError:  # no HEAD here (405), or a hiccup: the Range GET below says which
            size = validator = None
        cached = entry.validator is not None and validator == entry.validator and size == entry.size
        entry.url = str(url)
    if not cached:
        entry, first, kind = _open_entry(str(url), client)
        if "html" in kind.lower() or first.lstrip()[:1] == b"<":  # the parser would only say "not GGUF"
            raise _web_page(str(url), first)
    f = RangeFile(entry, client, str(url))
    raw = gm.read_raw_from(f, entry.size, url)
    if entry.validator and (f.fetched or not cached):
        _save(path, entry, where)
    return raw, cached and not f.fetched


def read_model(url: str, env: Mapping[str, str] = os.environ, *, timeout_s: float = TIMEOUT_S,
               cache: Path | None = None) -> RemoteRead:
    """The ModelProfile of a remote GGUF (any shard of a split model names all of it), read from
    its headers with Range requests; NetworkError for what the server does wrong, GGUFError for
    what the header does."""
    http_url(url, env)  # the address checked once, before any shard's name is made from it
    client = _Client(env=env, timeout_s=timeout_s)
    folder = cache or cache_dir()
    results = [_read_shard(u, client, folder) for u in shard_urls(url)]
    raw, n = gm.merge_shards([r for r, _ in results])
    return RemoteRead(gm.profile_of(raw, n), client.requests, client.bytes_received,
                      all(c for _, c in results))
