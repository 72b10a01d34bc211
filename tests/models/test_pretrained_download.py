"""pretrained=True: the real download code against a local HTTP server (no internet), file:// URLs, failures."""
import contextlib
import hashlib
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from timm.models.sequencer import checkpoint_filter_fn as timm_release_filter

import sequencer
from sequencer import SequencerError
from sequencer.models.hub import download_weights
from sequencer.models.loading import to_release_layout


class _Server:
    """Serves ``files`` (path -> bytes) on 127.0.0.1; ``short`` paths announce more bytes than they send."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.short: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if self.path in server.short else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def release_file(tmp_path, tiny_kwargs, randomize):
    """A tiny model saved in the authors' release layout; returns (model, bytes)."""
    model = randomize(sequencer.create_model("sequencer2d_s", **tiny_kwargs), seed=5).eval()
    path = tmp_path / "release.pth"
    release = to_release_layout(model.state_dict())
    # the file really is in the release layout: timm's own filter of that layout reads it back to the model
    timm_view = timm_release_filter(dict(release), model)
    assert timm_view.keys() == model.state_dict().keys()
    assert all(torch.equal(timm_view[k], v) for k, v in model.state_dict().items())
    torch.save(release, path)
    return model, path.read_bytes()


def _pretrained(url, tiny_kwargs, **cfg):
    return sequencer.create_model("sequencer2d_s", pretrained=True, pretrained_cfg_overlay=dict(url=url, **cfg),
                                  **tiny_kwargs).eval()


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_download_into_hub_cache_then_reuse(server, hub_dir, release_file, tiny_kwargs):
    reference, data = release_file
    server.files["/weights/sequencer2d_s.pth"] = data
    url = server.url + "/weights/sequencer2d_s.pth"
    model = _pretrained(url, tiny_kwargs)
    assert _same_weights(model, reference)
    cached = hub_dir / "checkpoints" / "sequencer2d_s.pth"
    assert cached.read_bytes() == data
    assert [p.name for p in cached.parent.iterdir()] == ["sequencer2d_s.pth"]  # no partial files left
    _pretrained(url, tiny_kwargs)
    assert server.requests == ["/weights/sequencer2d_s.pth"]  # the second load came from the cache


def test_known_sha256_is_verified(server, hub_dir, release_file, tiny_kwargs):
    reference, data = release_file
    server.files["/good.pth"] = server.files["/bad.pth"] = data
    good = hashlib.sha256(data).hexdigest()
    assert _same_weights(_pretrained(server.url + "/good.pth", tiny_kwargs, sha256=good), reference)
    with pytest.raises(SequencerError, match=r"/bad\.pth failed their sha256 check"):
        _pretrained(server.url + "/bad.pth", tiny_kwargs, sha256="0" * 64)
    assert not (hub_dir / "checkpoints" / "bad.pth").exists()
    # a cached file that does not match the digest (another tool's of the same name, or tampered with) is kept
    # beside it for its owner, and the weights are downloaded afresh
    (hub_dir / "checkpoints" / "good.pth").write_bytes(b"tampered")
    assert download_weights(server.url + "/good.pth", sha256=good, progress=False).read_bytes() == data
    kept = hub_dir / "checkpoints" / f"good.pth.{hashlib.sha256(b'tampered').hexdigest()[:8]}.rejected"
    assert kept.read_bytes() == b"tampered"


def test_unreachable_url_names_it_and_suggests_checkpoint_path(hub_dir, tiny_kwargs):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.pth"
    with pytest.raises(SequencerError) as e:
        _pretrained(url, tiny_kwargs)
    message = str(e.value)
    assert url in message and "checkpoint_path" in message and "\n" not in message
    assert not list((hub_dir / "checkpoints").iterdir())


def test_http_error_and_cut_short_download(server, hub_dir, release_file, tiny_kwargs):
    with pytest.raises(SequencerError, match=r"/missing\.pth \(HTTP 404"):
        _pretrained(server.url + "/missing.pth", tiny_kwargs)
    server.files["/short.pth"] = release_file[1]
    server.short.add("/short.pth")
    with pytest.raises(SequencerError, match=r"short\.pth"):
        _pretrained(server.url + "/short.pth", tiny_kwargs)
    assert not list((hub_dir / "checkpoints").iterdir())


def test_a_download_failed_or_done_leaves_no_socket_or_thread_behind(server, hub_dir, monkeypatch):
    """The library is a guest: a failed download's error, held by the caller (a notebook's last error, a sweep's
    list of failures), held the response's socket open; the progress bar's first use (shown or not) started tqdm's
    monitor thread, which ran until the process exited."""
    import tqdm

    if tqdm.tqdm.monitor is not None:  # one an earlier test left: a bar's first use would reuse it, not start one
        tqdm.tqdm.monitor.exit()
        monkeypatch.setattr(tqdm.tqdm, "monitor", None)
    server.files["/w.pth"] = b"weights"
    sockets, threads = _sockets(), set(threading.enumerate())
    with pytest.raises(SequencerError, match="HTTP 404") as failed:
        download_weights(server.url + "/missing.pth", progress=False)
    assert download_weights(server.url + "/w.pth", progress=False).read_bytes() == b"weights"
    deadline = time.monotonic() + 2  # the server's threads close their side and end on their own
    while (_sockets() - sockets or set(threading.enumerate()) - threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (_sockets() - sockets, set(threading.enumerate()) - threads) == (set(), set()), failed.value


def _sockets() -> set[str]:
    """This process's open sockets, as /proc names them (Linux; elsewhere none)."""
    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ()
    found = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
    return {name for name in found if name.startswith("socket:")}


def test_an_unusable_cached_file_is_set_aside_not_used_or_deleted(server, hub_dir, release_file, tiny_kwargs):
    server.files["/corrupt.pth"] = release_file[1][:-100] + b"\0" * 100  # right length, broken content
    with pytest.raises(SequencerError, match=r"unusable \(set aside as corrupt\.pth\.[0-9a-f]{8}\.rejected\)"):
        _pretrained(server.url + "/corrupt.pth", tiny_kwargs)
    assert not (hub_dir / "checkpoints" / "corrupt.pth").exists()
    (kept,) = (hub_dir / "checkpoints").glob("corrupt.pth.*.rejected")
    assert kept.read_bytes() == server.files["/corrupt.pth"]  # not destroyed: it may be another tool's file
    server.files["/corrupt.pth"] = release_file[1]  # a later run downloads afresh and works
    assert _same_weights(_pretrained(server.url + "/corrupt.pth", tiny_kwargs), release_file[0])


def test_file_url(tmp_path, hub_dir, release_file, tiny_kwargs):
    source = tmp_path / "served" / "sequencer2d_x.pth"
    source.parent.mkdir()
    source.write_bytes(release_file[1])
    model = _pretrained(source.as_uri(), tiny_kwargs)
    assert _same_weights(model, release_file[0])
    assert (hub_dir / "checkpoints" / "sequencer2d_x.pth").is_file()


def test_a_cfg_file_is_read_before_the_url_as_timm_reads_it(tmp_path, server, hub_dir, release_file, tiny_kwargs):
    """timm's ``pretrained_cfg_overlay=dict(file=...)``: that file's weights, not the url's (a cached release
    loaded in its place would be another model), and nothing downloaded."""
    (tmp_path / "mine.pth").write_bytes(release_file[1])
    server.files["/sequencer2d_s.pth"] = b"not these"
    model = _pretrained(server.url + "/sequencer2d_s.pth", tiny_kwargs, file=str(tmp_path / "mine.pth"))
    assert _same_weights(model, release_file[0]) and server.requests == []


def test_model_without_released_weights(hub_dir):
    with pytest.raises(SequencerError, match="no pretrained weights are published for 'sequencer2d_s_add'"):
        sequencer.create_model("sequencer2d_s_add", pretrained=True)


def test_release_urls_point_at_the_authors_release():
    for name in ("sequencer2d_s", "sequencer2d_m", "sequencer2d_l"):
        url = sequencer.models.get_model_entry(name).pretrained_cfg["url"]
        assert url == f"https://github.com/okojoalg/sequencer/releases/download/weights/{name}.pth"
