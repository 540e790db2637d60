"""A GGUF judged over HTTP from its header alone, against a real Range-capable server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.engine import serve
from cputune.model import remote, synth
from cputune.cli import cli
from cputune.core.errors import GGUFError, ModelError, NetworkError
from cputune.model.resolve import bench_target, looks_like_path, resolve

SHAPE = synth.Shape("llama", n_layer=4, n_embd=512, n_ff=1408, n_head=8, n_head_kv=4, n_vocab=4000)
RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


class Handler(BaseHTTPRequestHandler):
    """Static files from server.root with Range (206), ETag, If-Range and Content-Length, as a CDN
    serves them; server.mode 'no-range' answers every GET 200 with the whole body. /loop
    redirects to itself, /slow/... answers after server.delay_s, /page.gguf is an HTML page."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool):
        srv = self.server
        srv.log.append((self.command, self.path, self.headers.get("Range")))
        srv.auth.append(self.headers.get("Authorization"))
        path = self.path
        if path == "/loop":
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if path.startswith("/slow/"):
            time.sleep(srv.delay_s)
            path = path[len("/slow"):]
        if path.startswith("/hop/"):  # a redirect to the same file on another host name
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", f"http://localhost:{srv.server_port}{path[len('/hop'):]}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if path == "/page.gguf":
            page = b"<!doctype html><html><body>a model card</body></html>"
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            return self.wfile.write(page) if body else None
        f = srv.root / path.lstrip("/").split("/")[-1] if ".." not in path else None
        if f is None or not f.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        st = f.stat()
        size, etag = st.st_size, f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        start, end = 0, size - 1
        m = RANGE_RE.match(self.headers.get("Range") or "")
        ranged = m is not None and srv.mode != "no-range" and self.headers.get("If-Range", etag) == etag
        if ranged:
            start = int(m.group(1))
            end = min(int(m.group(2) or size - 1), size - 1)
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "none" if srv.mode == "no-range" else "bytes")
        self.end_headers()
        if not body:
            return
        with f.open("rb") as fh:
            fh.seek(start)
            left = end - start + 1
            try:
                while left:
                    chunk = fh.read(min(left, 64 << 10))
                    self.wfile.write(chunk)
                    srv.sent += len(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading: what it did not take is not counted


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, mode: str = "range"):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.mode, self.delay_s = root, mode, 0.0
        self.log: list[tuple[str, str, str | None]] = []
        self.auth: list[str | None] = []
        self.sent = 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_port}/{name}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("served")
    paths = synth.write_model(d / "m.gguf", SHAPE, seed=3, n_shards=3)
    assert [p.name for p in paths] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return paths


def _serve(root: Path, mode: str = "range"):
    srv = Server(root, mode)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return srv, t


@pytest.fixture
def server(shards):
    srv, t = _serve(shards[0].parent)
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "cputune" / "headers"


def inspect_json(arg: str) -> dict:
    r = CliRunner().invoke(cli, ["inspect", "--json", arg], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def failing(*args: str) -> str:
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    return r.output


def without_paths(doc: dict) -> dict:
    doc = dict(doc)
    doc["model"] = {k: v for k, v in doc["model"].items() if k != "path"}
    return doc


def test_inspect_of_a_url_equals_the_local_files_and_reads_a_few_percent(server, shards, cache):
    url = server.url(shards[0].name)
    here = inspect_json(str(shards[0]))
    there = inspect_json(url)
    assert without_paths(there) == without_paths(here)
    assert there["model"]["path"] == url and there["model"]["n_shards"] == 3
    total = sum(p.stat().st_size for p in shards)
    assert there["model"]["file_bytes"] == total
    assert server.sent < 0.05 * total, (server.sent, total)
    gets = [p for method, p, _ in server.log if method == "GET"]
    assert {p.rsplit("/", 1)[-1] for p in gets} == {p.name for p in shards}
    assert all(rng for method, _, rng in server.log if method == "GET")  # never a whole-file GET
    assert len(list(cache.iterdir())) == 3

    # Again: one HEAD per shard (does the cached ETag still hold?), no body bytes at all.
    server.log.clear()
    sent = server.sent
    assert inspect_json(url) == there
    assert [m for m, _, _ in server.log] == ["HEAD"] * 3 and server.sent == sent


def test_any_shard_names_the_model_and_the_library_says_what_it_cost(server, shards, cache):
    r = remote.read_model(server.url(shards[1].name))
    assert r.profile.n_shards == 3 and not r.from_cache
    assert r.requests >= 3 and 0 < r.bytes_received < 0.05 * r.profile.file_bytes
    again = remote.read_model(server.url(shards[1].name))
    assert again.from_cache and again.requests == 3 and again.bytes_received == 0
    assert again.profile == r.profile


def test_a_changed_file_is_read_again(server, shards, cache, tmp_path):
    d = tmp_path / "site"
    d.mkdir()
    one = synth.write_model(d / "one.gguf", SHAPE, seed=4)[0]
    server.root = d
    first = remote.read_model(server.url("one.gguf"))
    synth.write_model(d / "one.gguf", synth.Shape("llama", n_layer=2, n_embd=256, n_ff=512, n_head=4,
                                                       n_head_kv=2, n_vocab=1000), seed=5)
    os.utime(one, ns=(1, 1))  # a new ETag even within the same clock tick
    second = remote.read_model(server.url("one.gguf"))
    assert not second.from_cache and (first.profile.n_layer, second.profile.n_layer) == (4, 2)


def test_hf_addresses_follow_hf_endpoint_and_send_the_token(server, shards, cache, monkeypatch, tmp_path):
    # {HF_ENDPOINT}/{owner}/{repo}/resolve/main/{file}: the test server serves by file name.
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert remote.http_url("hf://org/model-GGUF/Q4/m.gguf") == \
        f"http://127.0.0.1:{server.server_port}/org/model-GGUF/resolve/main/Q4/m.gguf"
    doc = inspect_json(f"hf://org/model-GGUF/{shards[0].name}")
    assert doc["model"]["path"] == f"hf://org/model-GGUF/{shards[0].name}"
    assert without_paths(doc) == without_paths(inspect_json(str(shards[0])))
    assert server.log[0][1] == f"/org/model-GGUF/resolve/main/{shards[0].name}"
    assert set(server.auth) == {"Bearer hf_secret"}
    # A redirect to another host (a CDN) does not carry the token along.
    server.auth.clear()
    remote.read_model(f"http://127.0.0.1:{server.server_port}/hop/{shards[0].name}",
                      {"HF_TOKEN": "hf_secret"}, cache=tmp_path / "c2")
    assert server.auth[0] == "Bearer hf_secret" and server.auth[1] is None


def test_a_bad_hf_address_is_a_model_error():
    with pytest.raises(ModelError, match="not a Hugging Face file address"):
        remote.http_url("hf://org/only-a-repo")


def test_an_address_http_client_cannot_send_is_encoded_or_refused(server, shards, cache):
    """Non-ASCII or a space in the path is percent-encoded as UTF-8 (the server gets the file); a
    host that is not ASCII, or a byte that is not UTF-8 (argv's \udcff), is one ModelError."""
    assert remote.http_url("https://h/é dir/x.gguf", {}) == "https://h/%C3%A9%20dir/x.gguf"
    assert remote.http_url("https://h/%C3%A9/x.gguf?a=1&b=2", {}) == "https://h/%C3%A9/x.gguf?a=1&b=2"
    with pytest.raises(ModelError, match="is not ASCII"):
        remote.http_url("https://hé.example/x.gguf", {})
    with pytest.raises(ModelError, match="not UTF-8"):
        remote.http_url("https://h/\udcff.gguf", {})
    out = failing("inspect", server.url("\udcff.gguf"))
    assert "not UTF-8" in out and "Traceback" not in out


@pytest.mark.parametrize("value", ["bytes 0-65535/-5", "bytes 0-65535/\u00b2", "bytes \u00b2-1/100",
                                   "bytes 0-1/" + "9" * 5000, None])
def test_a_content_range_that_is_not_ascii_numbers_is_a_network_error(value):
    with pytest.raises(NetworkError, match="Content-Range"):
        remote._content_range("https://h/x.gguf", value, 0)


def test_a_missing_file_and_a_missing_shard_are_404s(server, shards, cache, tmp_path):
    out = failing("inspect", server.url("nothing.gguf"))
    assert "Error: " + server.url("nothing.gguf") + ": no such file on the server (HTTP 404)" in out
    assert "hint:" in out
    d = tmp_path / "partial"
    d.mkdir()
    shutil.copy(shards[0], d / shards[0].name)
    server.root = d
    with pytest.raises(NetworkError, match=r"m-00002-of-00003\.gguf: no such file on the server"):
        remote.read_model(server.url(shards[0].name))


def test_a_server_without_range_support_is_refused_before_the_body_is_read(shards, cache, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    f = big / "big.gguf"
    shutil.copy(shards[0], f)
    with f.open("r+b") as fh:
        fh.truncate(256 << 20)  # sparse: a large file whose whole body must not travel
    srv, t = _serve(big, mode="no-range")
    try:
        out = failing("inspect", srv.url("big.gguf"))
        assert "the server ignores Range requests (it answered with the whole file of 268.4 MB)" in out
        assert "hint: download it first" in out
        time.sleep(0.2)
        assert srv.sent < (256 << 20) // 4
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


def test_a_web_page_is_not_a_gguf(server, cache):
    with pytest.raises(GGUFError, match=r"is not a GGUF file \(the server sent a web page\)") as e:
        remote.read_model(server.url("page.gguf"))
    assert "/resolve/main/, not /blob/main/" in e.value.hint


def test_a_timeout_and_a_redirect_loop_are_one_line_each(server, shards, cache):
    server.delay_s = 1.0
    with pytest.raises(NetworkError, match=r"no answer within 0.2 s"):
        remote.read_model(server.url("slow/" + shards[0].name), timeout_s=0.2)
    server.delay_s = 0.0
    out = failing("inspect", server.url("loop"))
    assert "the server redirects in a loop (HTTP 302)" in out


def test_an_oversized_header_stops_after_the_first_request(server, cache, tmp_path):
    # A key whose string claims 300 MiB: past gguf_model's 256 MiB cap, so nothing past the first
    # request is fetched (the file itself is 1 GiB, sparse).
    d = tmp_path / "huge"
    d.mkdir()
    f = d / "huge.gguf"
    key = b"general.name"
    head = b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (1).to_bytes(8, "little")
    head += len(key).to_bytes(8, "little") + key + (8).to_bytes(4, "little") + (300 << 20).to_bytes(8, "little")
    f.write_bytes(head)
    with f.open("r+b") as fh:
        fh.truncate(1 << 30)
    server.root = d
    with pytest.raises(GGUFError, match="corrupt header"):
        remote.read_model(server.url("huge.gguf"))
    assert server.sent <= remote.FIRST_FETCH_BYTES


def test_a_url_is_a_file_for_every_command_but_those_that_run_it(server, shards, cache):
    url = server.url(shards[0].name)
    assert looks_like_path(url) and looks_like_path("hf://a/b/c.gguf")
    r = resolve(url)
    assert r.source == "file" and str(r.files[0].path) == url and r.files[0].path.name == shards[0].name
    assert r.files[0].label == f"{shards[0].name} (+2 shards)"
    for call in (lambda: resolve(url, catalog=False), lambda: bench_target(url, None, None, None, Path("x"))):
        with pytest.raises(ModelError, match="is a URL, and this command runs the model") as e:
            call()
        assert e.value.hint.startswith("download it first")
    with pytest.raises(ModelError, match="is a URL, and this command runs the model"):
        serve.resolve_model(serve.ServeRequest(None, model=url))  # what `cputune serve --model URL` asks


def test_predict_and_select_take_a_url(server, shards, cache):
    url = server.url(shards[0].name)
    for args in (["predict", "--model", url, "--hardware", "epyc-9655-2s"],
                 ["select", "--model", url, "--hardware", "epyc-9655-2s"]):
        here = CliRunner().invoke(cli, [*args[:2], str(shards[0]), *args[3:], "--json"], catch_exceptions=False)
        there = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
        assert here.exit_code == 0 and there.exit_code == 0, there.output
        strip = lambda text: text.replace(url, "P").replace(str(shards[0]), "P")
        assert json.loads(strip(there.output)) == json.loads(strip(here.output))


@pytest.mark.parametrize("head", [b"[]", b"5", b'"x"', b"[" * 100000])
def test_a_damaged_header_cache_entry_is_read_again_not_a_crash(server, shards, cache, head):
    """A cache file whose JSON line is a list, a number or absurdly deep is ignored: the header is
    fetched again (GETs, not only HEADs) and the entry rewritten."""
    url = server.url(shards[0].name)
    first = remote.read_model(url)
    for f in cache.iterdir():
        f.write_bytes(head + b"\n")
    server.log.clear()
    again = remote.read_model(url)
    assert again.profile == first.profile and not again.from_cache
    assert "GET" in [m for m, _, _ in server.log]


@pytest.mark.parametrize("arg, env, message", [
    ("https://[::1/x.gguf", {}, r"https://\[::1/x.gguf is not a valid web address \(Invalid IPv6 URL\)"),
    ("http://127.0.0.1:port/x.gguf", {}, "is not a valid web address"),
    ("http:///x.gguf", {}, "http:///x.gguf names no host"),
    ("hf://o/r/f.gguf", {"HF_ENDPOINT": "http://[::1"}, r"HF_ENDPOINT 'http://\[::1' is not a valid web address"),
    ("hf://o/r/f.gguf", {"HF_ENDPOINT": "file:///etc"}, "HF_ENDPOINT 'file:///etc' is not an http:// or https://"),
    ("hf://o/r/f.gguf", {"HF_ENDPOINT": "ftp://127.0.0.1"}, "is not an http:// or https://"),
    ("hf://o/r/", {}, "^hf://o/r/ is not a Hugging Face file address"),
])
def test_an_address_that_cannot_be_fetched_is_a_model_error_before_any_request(arg, env, message,
                                                                                monkeypatch, cache):
    """Each of these fails before a socket is opened (no server runs here): the URL parsed once,
    only http(s) allowed (urllib would read file:///etc), the address named as the user gave it."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ModelError, match=message):
        remote.read_model(arg)
    out = failing("inspect", arg)
    assert out.startswith("Error: ") and len(out.strip().splitlines()) == 2, out  # error + hint
