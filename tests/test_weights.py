"""SAM checkpoints: lookup, checksum, resumable download from a local HTTP server, safe loading, size checks.

All weights here are RANDOM (saved in the official format); none are pretrained.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from b2p.errors import B2PError
from b2p.teach.weights import (
    SAM_CHECKPOINTS,
    CheckpointSpec,
    detect_model_type,
    load_sam,
    load_state_dict,
    resolve_checkpoint,
    save_random_checkpoint,
    weights_dir,
)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_random_checkpoint("test_tiny", tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="session")
def vit_b_ckpt(tmp_path_factory) -> Path:
    """A real-size ViT-B state dict with random weights, saved as the official file is (375 MB)."""
    return save_random_checkpoint("vit_b", tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth")


# --- a local HTTP server that honours Range and can cut a response short ------------------------------


class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_after: int | None = None  # close the connection after this many body bytes (once)
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append({"path": name, "range": rng})
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    n, server.cut_after = server.cut_after, None
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tiny_ckpt):
    s = _Server({"sam_test_tiny.pth": tiny_ckpt.read_bytes()})
    yield s
    s.close()


def _spec(server: _Server, prefix: str | None = None, name: str = "sam_test_tiny.pth") -> dict[str, CheckpointSpec]:
    digest = hashlib.sha256(server.files[name]).hexdigest()
    return {"test_tiny": CheckpointSpec("test_tiny", name, server.url + name, prefix or digest[:6])}


# --- official table ---------------------------------------------------------------------------------------


def test_official_table_uses_file_name_hash_prefixes():
    assert SAM_CHECKPOINTS["vit_b"].url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert SAM_CHECKPOINTS["vit_l"].sha256_prefix == "0b3195"
    assert SAM_CHECKPOINTS["vit_h"].file_name == "sam_vit_h_4b8939.pth"


def test_weights_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("B2P_WEIGHTS_DIR", raising=False)
    assert weights_dir() == Path("weights")
    monkeypatch.setenv("B2P_WEIGHTS_DIR", str(tmp_path))
    assert weights_dir() == tmp_path
    assert weights_dir(tmp_path / "x") == tmp_path / "x"


# --- download -----------------------------------------------------------------------------------------------


def test_download_installs_verified_file(server, tmp_path, tiny_ckpt):
    r = resolve_checkpoint("test_tiny", weights_folder=tmp_path, specs=_spec(server), progress=False)
    assert r.path == tmp_path / "sam_test_tiny.pth"
    assert r.path.read_bytes() == tiny_ckpt.read_bytes()
    assert r.sha256 == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert not (tmp_path / "sam_test_tiny.pth.part").exists()
    assert load_sam("test_tiny", r.path) is not None  # what was downloaded loads
    # second time: found in the folder, no new request
    n = len(server.requests)
    r2 = resolve_checkpoint("test_tiny", weights_folder=tmp_path, specs=_spec(server), progress=False)
    assert r2.source == "weights folder" and len(server.requests) == n


def test_interrupted_download_resumes_with_range(server, tmp_path, tiny_ckpt):
    size = len(server.files["sam_test_tiny.pth"])
    server.cut_after = size // 3
    with pytest.raises(B2PError, match="run again to resume"):
        resolve_checkpoint("test_tiny", weights_folder=tmp_path, specs=_spec(server), progress=False)
    part = tmp_path / "sam_test_tiny.pth.part"
    assert part.stat().st_size == size // 3
    assert not (tmp_path / "sam_test_tiny.pth").exists()  # nothing half-installed

    r = resolve_checkpoint("test_tiny", weights_folder=tmp_path, specs=_spec(server), progress=False)
    assert server.requests[-1]["range"] == f"bytes={size // 3}-"
    assert r.path.read_bytes() == tiny_ckpt.read_bytes()
    assert not part.exists()


def test_checksum_mismatch_is_refused_and_leaves_nothing(server, tmp_path):
    with pytest.raises(B2PError, match="checksum"):
        resolve_checkpoint("test_tiny", weights_folder=tmp_path, specs=_spec(server, prefix="000000"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_offline_message_names_file_and_folder(tmp_path):
    # a port nothing listens on: what an air-gapped machine sees
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    specs = {"test_tiny": CheckpointSpec("test_tiny", "sam_x_abcdef.pth", f"http://127.0.0.1:{port}/sam_x_abcdef.pth", "abcdef")}
    with pytest.raises(B2PError) as e:
        resolve_checkpoint("test_tiny", weights_folder=tmp_path / "w", specs=specs, progress=False)
    msg = str(e.value)
    assert str(tmp_path / "w" / "sam_x_abcdef.pth") in msg and "offline" in msg
    assert not (tmp_path / "w" / "sam_x_abcdef.pth").exists()


def test_no_download_names_official_file(tmp_path):
    with pytest.raises(B2PError) as e:
        resolve_checkpoint("vit_h", weights_folder=tmp_path, download=False)
    assert "sam_vit_h_4b8939.pth" in str(e.value) and "https://dl.fbaipublicfiles.com/segment_anything/" in str(e.value)


def test_corrupt_file_in_weights_folder_fails_checksum(tmp_path):
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"not the real file")
    with pytest.raises(B2PError, match="checksum mismatch"):
        resolve_checkpoint("vit_b", weights_folder=tmp_path, download=False)


# --- loading ------------------------------------------------------------------------------------------------


def test_missing_and_corrupt_checkpoints(tmp_path, tiny_ckpt):
    with pytest.raises(B2PError, match="not found"):
        resolve_checkpoint("vit_b", checkpoint=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    for seed in range(40):  # junk bytes fail inside the unpickler in many ways (IndexError, KeyError, ...): each one clear error
        junk.write_bytes(np.random.default_rng(seed).integers(0, 256, 1000, dtype=np.uint8).tobytes())
        with pytest.raises(B2PError, match="could not be read"):
            load_sam("test_tiny", junk)
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(tiny_ckpt.read_bytes()[:5000])
    with pytest.raises(B2PError, match="could not be read"):
        load_sam("test_tiny", truncated)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(B2PError, match="not a SAM state dict"):
        load_sam("test_tiny", other)


class _Evil:
    marker: str = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_loading_never_runs_pickled_code(tmp_path):
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"x": evil}, f)
    with pytest.raises(B2PError):
        load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_unknown_model_type():
    with pytest.raises(B2PError, match="unknown SAM model"):
        resolve_checkpoint("vit_x")


def test_real_size_vit_b_loads_through_official_path(vit_b_ckpt, tmp_path):
    """A random-weight ViT-B saved like sam_vit_b_01ec64.pth, found in the weights folder under the official
    name (with the table's hash prefix replaced by this file's) and loaded by the code users run."""
    digest = hashlib.sha256(vit_b_ckpt.read_bytes()).hexdigest()
    (tmp_path / "sam_vit_b_01ec64.pth").symlink_to(vit_b_ckpt)
    specs = {"vit_b": CheckpointSpec("vit_b", "sam_vit_b_01ec64.pth", "http://127.0.0.1:9/unused", digest[:6])}
    r = resolve_checkpoint("vit_b", weights_folder=tmp_path, specs=specs, download=False)
    assert r.source == "weights folder" and r.sha256 == digest
    model = load_sam("vit_b", r.path)
    assert model.image_encoder.patch_embed.proj.weight.shape[0] == 768
    assert len(model.image_encoder.blocks) == 12
    sd = torch.load(vit_b_ckpt, weights_only=True)
    assert detect_model_type(sd) == "vit_b"
    assert torch.equal(model.mask_decoder.iou_prediction_head.layers[0].weight, sd["mask_decoder.iou_prediction_head.layers.0.weight"])


def test_vit_b_given_as_vit_l_is_refused_naming_true_size(vit_b_ckpt):
    with pytest.raises(B2PError) as e:
        load_sam("vit_l", vit_b_ckpt)
    msg = str(e.value)
    assert "is a vit_b checkpoint, not vit_l" in msg and "--sam-model vit_b" in msg


def test_tiny_checkpoint_is_not_mistaken_for_official(tiny_ckpt):
    with pytest.raises(B2PError, match="is a test_tiny checkpoint, not vit_b"):
        load_sam("vit_b", tiny_ckpt)


def test_mirror_env_keeps_official_names_and_checksums(monkeypatch, tmp_path):
    monkeypatch.setenv("B2P_SAM_BASE_URL", "http://127.0.0.1:9/mirror/")
    with pytest.raises(B2PError) as e:
        resolve_checkpoint("vit_b", weights_folder=tmp_path, progress=False)
    assert "http://127.0.0.1:9/mirror/sam_vit_b_01ec64.pth" in str(e.value)
    assert list(tmp_path.iterdir()) == []
