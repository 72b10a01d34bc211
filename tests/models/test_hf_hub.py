"""Weights from the Hugging Face Hub (``hf-hub:ORG/NAME`` names, ``source="hf-hub"``): the real huggingface_hub
client against a local server that answers its resolve API as the Hub does (no internet), its cache, offline mode
and the failures, each one line naming the repository."""
import hashlib
import importlib
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import sequencer
from sequencer import SequencerError, cli
from sequencer.tools.benchmark import BenchmarkSettings, run_benchmark

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # what X-Repo-Commit says: the repositories' one commit


class _Hub:
    """``/{repo}/resolve/{revision}/{file}`` as hf_hub_download reads it (huggingface_hub's file_download.py):
    HEAD and GET answer with X-Repo-Commit and an ETag; a weights file (LFS on the Hub) redirects to a second
    server, the CDN, and carries X-Linked-Etag (its sha256) and X-Linked-Size; errors carry X-Error-Code
    (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound). ``requests`` logs (method, path) of both."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.answer(self, send_body=False)

            def do_GET(self):
                hub.answer(self, send_body=True)

            def log_message(self, *args):
                pass

        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
        # the CDN under another host name: huggingface_hub follows a redirect on the Hub's host (some versions
        # compare the name only, not the port) but reads a redirect elsewhere as a CDN's
        self.url = f"http://127.0.0.1:{self.servers[0].server_address[1]}"
        self.cdn_url = f"http://localhost:{self.servers[1].server_address[1]}"

    def answer(self, request, send_body: bool):
        self.requests.append((request.command, request.path))
        blob = re.fullmatch(r"/blobs/([0-9a-f]{64})", request.path)
        if blob and blob[1] in self.blobs:
            return _send(request, 200, {}, self.blobs[blob[1]], send_body)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", request.path)
        repo_id = resolve[1] if resolve else None
        if repo_id not in self.repos:
            return _send(request, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if repo_id in self.gated:
            return _send(request, 401, {"X-Error-Code": "GatedRepo",
                                        "X-Error-Message": f"Access to model {repo_id} is restricted."})
        if unquote(resolve[2]) not in ("main", COMMIT):
            return _send(request, 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        data = self.repos[repo_id].get(unquote(resolve[3]))
        if data is None:
            return _send(request, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        if not resolve[3].endswith((".safetensors", ".bin")):  # a small file, in git: its blob's sha1 as ETag
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            return _send(request, 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}, data, send_body)
        sha256 = hashlib.sha256(data).hexdigest()
        self.blobs[sha256] = data
        return _send(request, 302, {"X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{sha256}"',
                                    "X-Linked-Size": str(len(data)), "Location": f"{self.cdn_url}/blobs/{sha256}"})

    def weight_downloads(self) -> int:
        return sum(method == "GET" and path.startswith("/blobs/") for method, path in self.requests)

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


def _send(request, status: int, headers: dict, body: bytes = b"", send_body: bool = True):
    request.send_response(status)
    for key, value in {**headers, "Content-Length": str(len(body))}.items():
        request.send_header(key, value)
    request.end_headers()
    if send_body and body:
        request.wfile.write(body)


def _hub_environment(mp: pytest.MonkeyPatch, **env):
    """Set huggingface_hub's environment as a user would before starting Python: it reads HF_ENDPOINT,
    HF_HUB_OFFLINE, HF_HOME... once, at import (huggingface_hub.constants), so that module is read again, the
    copies other modules made of its values (0.x: ``from .constants import HUGGINGFACE_CO_URL_TEMPLATE``) are
    refreshed, and its HTTP sessions (0.x: made offline or not) are made afresh."""
    for key, value in env.items():
        mp.setenv(key, value) if value is not None else mp.delenv(key, raising=False)
    import huggingface_hub.constants as constants
    import huggingface_hub.utils
    importlib.reload(constants)
    settings = {k: v for k, v in vars(constants).items() if k.isupper()}
    for name, module in list(sys.modules.items()):
        if name.startswith("huggingface_hub.") and module is not constants:
            for key in settings.keys() & vars(module).keys():
                setattr(module, key, settings[key])
    getattr(huggingface_hub.utils, "reset_sessions", lambda: None)()


@pytest.fixture
def hub(tmp_path):
    """The local Hub, huggingface_hub pointed at it (HF_ENDPOINT) with an empty cache of its own (HF_HOME);
    afterwards the environment and huggingface_hub's reading of it are as they were."""
    server = _Hub()
    with pytest.MonkeyPatch.context() as mp:
        _hub_environment(mp, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=None,
                         HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None, HF_TOKEN=None,
                         HF_HUB_DISABLE_TELEMETRY="1")
        server.cache = tmp_path / "hf" / "hub"
        server.environment = lambda **env: _hub_environment(mp, **env)
        try:
            yield server
        finally:
            mp.undo()
            _hub_environment(mp)
            server.close()


TINY_ARGS = dict(layers=[2, 1, 2, 1], embed_dims=[16, 32, 32, 32], hidden_sizes=[4, 8, 8, 8], num_classes=10)
LABELS = [f"c{i}" for i in range(10)]


def _config(architecture: str = "sequencer2d_s", **model_args) -> bytes:
    """A config.json in the layout timm's push_to_hub writes."""
    return json.dumps({
        "architecture": architecture, "num_classes": 10, "num_features": 32, "label_names": LABELS,
        "model_args": model_args or TINY_ARGS,
        "pretrained_cfg": {"tag": "test", "custom_load": False, "input_size": [3, 28, 28], "fixed_input_size": False,
                           "interpolation": "bilinear", "crop_pct": 0.9, "crop_mode": "center",
                           "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "num_classes": 10,
                           "first_conv": "stem.proj", "classifier": "head.fc"}}).encode()


@pytest.fixture
def tiny_repo(hub, tmp_path, randomize):
    """Repository test/tiny: a tiny Sequencer2d-S in timm's key layout as model.safetensors, with its config.json;
    returns the weights as a local file too."""
    model = randomize(sequencer.create_model("sequencer2d_s", **TINY_ARGS), seed=3)
    data = safetensors_bytes(model.state_dict(), metadata={"format": "pt"})
    hub.repos["test/tiny"] = {"config.json": _config(), "model.safetensors": data}
    (tmp_path / "tiny.safetensors").write_bytes(data)
    return tmp_path / "tiny.safetensors"


def _cached_weights(hub) -> list[str]:
    """The weights in huggingface_hub's cache ("REPO/FILE") and any partial download."""
    snapshots = [p for p in hub.cache.glob("models--*/snapshots/*/*")]
    return sorted([p.parts[-4].removeprefix("models--").replace("--", "/") + "/" + p.name for p in snapshots
                   if p.name != "config.json"] + [str(p) for p in hub.cache.rglob("*.incomplete")])


def test_hf_hub_model_loads_as_checkpoint_path_then_from_the_cache_and_offline(hub, tiny_repo):
    x = torch.randn(2, 3, 28, 28)
    reference = sequencer.create_model("sequencer2d_s", checkpoint_path=str(tiny_repo), **TINY_ARGS).eval()
    model = sequencer.create_model("hf-hub:test/tiny", pretrained=True).eval()
    assert torch.equal(model(x), reference(x))
    # the repository's config: architecture, arguments, preprocessing and label names
    cfg = model.pretrained_cfg
    assert (cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"], cfg["input_size"]) == \
           ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.9, "bilinear", (3, 28, 28))
    assert (cfg["label_names"], cfg["hf_hub_id"], cfg["source"]) == (LABELS, "test/tiny", "hf-hub")
    # the model rebuilds from its name and arguments alone (a training checkpoint's arch and model_kwargs)
    assert model.model_name == "sequencer2d_s" and model.num_classes == 10
    rebuilt = sequencer.create_model(model.model_name, **model.model_kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert hub.weight_downloads() == 1
    # a registry name takes the Hub copy named by its cfg's hf_hub_id with source="hf-hub" (timm's convention)
    again = sequencer.create_model("sequencer2d_s", pretrained=True, **TINY_ARGS,
                                   pretrained_cfg_overlay=dict(source="hf-hub", hf_hub_id="test/tiny")).eval()
    assert torch.equal(again(x), reference(x))
    assert hub.weight_downloads() == 1  # from huggingface_hub's cache
    # HF_HUB_OFFLINE=1 with a warm cache: no request at all
    hub.environment(HF_HUB_OFFLINE="1")
    seen = len(hub.requests)
    offline = sequencer.create_model("hf-hub:test/tiny", pretrained=True).eval()
    assert torch.equal(offline(x), reference(x)) and len(hub.requests) == seen


def test_our_released_models_name_timms_hub_copies():
    for name in ("sequencer2d_s", "sequencer2d_m", "sequencer2d_l"):
        assert sequencer.models.get_model_entry(name).pretrained_cfg["hf_hub_id"] == f"timm/{name}.in1k"
    assert "hf_hub_id" not in sequencer.models.get_model_entry("sequencer2d_s_add").pretrained_cfg


def _one_line_error(name: str, **kwargs) -> str:
    with pytest.raises(SequencerError) as e:
        sequencer.create_model(name, pretrained=True, **kwargs)
    assert "\n" not in str(e.value) and name in str(e.value)
    return str(e.value)


def test_failures_are_one_line_naming_the_repository(hub, tiny_repo, monkeypatch):
    weights = hub.repos["test/tiny"]["model.safetensors"]
    hub.repos.update({"test/resnet": {"config.json": _config("resnet50"), "model.safetensors": weights},
                      "test/no-weights": {"config.json": _config()},
                      "test/no-config": {"model.safetensors": weights},
                      "test/gated": {"config.json": _config(), "model.safetensors": weights},
                      "test/other-model": {"config.json": _config(**dict(TINY_ARGS, layers=[1, 1, 1, 1])),
                                           "model.safetensors": weights}})
    hub.gated.add("test/gated")
    assert "names architecture 'resnet50', which is not a sequencer model" in _one_line_error("hf-hub:test/resnet")
    assert "has no weights (model.safetensors or pytorch_model.bin)" in _one_line_error("hf-hub:test/no-weights")
    assert "has no config.json" in _one_line_error("hf-hub:test/no-config")
    assert "is a gated repository" in _one_line_error("hf-hub:test/gated")
    assert f"no such repository on {hub.url}" in _one_line_error("hf-hub:test/missing")
    assert "has no revision 'v2'" in _one_line_error("hf-hub:test/tiny@v2")
    assert "does not fit model 'sequencer2d_s'" in _one_line_error("hf-hub:test/other-model")
    assert "`source='hf-hub'` without an `hf_hub_id`" in \
        _one_line_error("sequencer2d_s_add", pretrained_cfg_overlay=dict(source="hf-hub"))
    assert hub.weight_downloads() == 1  # only the weights that did not fit were fetched; none for the rest
    hub.environment(HF_HUB_OFFLINE="1")
    assert "HF_HUB_OFFLINE is set and config.json is not in the Hugging Face cache" in \
        _one_line_error("hf-hub:test/tiny")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    hub.environment(HF_HUB_OFFLINE=None, HF_ENDPOINT=closed)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub retries unreachable hosts
    assert f"could not reach {closed}" in _one_line_error("hf-hub:test/tiny")
    # test/other-model's (complete) weights only: the other failures left nothing half-written
    assert _cached_weights(hub) == ["test/other-model/model.safetensors"]


def test_cli_validate_defaults_to_the_hub_weights(hub, tiny_repo, tmp_path, capsys):
    from PIL import Image
    for i, label in enumerate(LABELS):
        (tmp_path / "data" / "validation" / label).mkdir(parents=True)
        Image.new("RGB", (32, 32), (25 * i, 128, 255 - 25 * i)).save(tmp_path / "data" / "validation" / label / "a.png")
    results = tmp_path / "results.json"
    assert cli.main(["validate", str(tmp_path / "data"), "--model", "hf-hub:test/tiny", "-j", "0",
                     "--results-file", str(results)]) == 0
    report = json.loads(results.read_text())
    assert (report["model"], report["checkpoint"], report["count"]) == ("hf-hub:test/tiny", "pretrained", 10)
    assert hub.weight_downloads() == 1
    # an export names the registered architecture and the repository's arguments: it rebuilds without the Hub
    assert cli.main(["export", "--model", "hf-hub:test/tiny", "--pretrained", "--output", str(tmp_path / "m.safetensors")]) == 0
    meta = sequencer.models.read_checkpoint(tmp_path / "m.safetensors")["__metadata__"]
    assert meta["arch"] == "sequencer2d_s" and json.loads(meta["model_kwargs"])["layers"] == TINY_ARGS["layers"]
    # benchmark --compare-timm: timm's Sequencer2d of the registered architecture, with the same weights
    report = run_benchmark(BenchmarkSettings(model="hf-hub:test/tiny", pretrained=True, compare_timm=True,
                                             batch_size=2, num_warmup=0, num_iter=1, memory_iter=0, gemm_size=64))
    ours = next(r for r in report["results"] if r["impl"] == "ours")
    assert report["model"] == "hf-hub:test/tiny" and ours["max_rel_diff_vs_timm"] < 1e-4
    assert cli.main(["predict", str(tmp_path / "data" / "validation" / "c3"), "--model", "hf-hub:test/missing"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "hf-hub:test/missing: no such repository" in error[0]
