"""The CPU training path: NHWC layout, the fast class map, foreach EMA and bfloat16 where the CPU has it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from b2p.student import train as train_mod
from b2p.student.model import StudentConfig, build_model, class_map
from b2p.student.train import EMA, cpu_layout, cpu_native_bf16, train_student
from test_student import taught, tiny_params  # noqa: F401 (fixture)


def test_class_map_is_the_argmax_with_ties_to_the_first_class():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 7, generator=g)
    x[0, 3, 2, 2] = x[0, 1, 2, 2] = x[0, :, 2, 2].max() + 1  # a tie between classes 1 and 3
    assert torch.equal(class_map(x, 1), x.argmax(1)) and int(class_map(x, 1)[0, 2, 2]) == 1
    assert torch.equal(class_map(x[1], 0), x[1].argmax(0))


def test_channels_last_forward_equals_the_plain_layout():
    cfg = StudentConfig(
        num_classes=3, backbone="dinov2_s", dinov2_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, patch_size=8, image_size=32), taps=[0, 1, 2], decoder_dim=32, decoder="lite",
        context="strip", refine=True, adaptation="frozen",
    )
    torch.manual_seed(0)
    model = build_model(cfg, weights="random").eval()
    x = torch.randn(2, 3, 48, 64)
    cpu = torch.device("cpu")
    with torch.no_grad():
        ref = model(x)
        feats = model.backbone_features(x)
        nhwc = model.to(memory_format=torch.channels_last)(cpu_layout(x, cpu), cpu_layout(feats, cpu))
    assert cpu_layout(x, cpu).is_contiguous(memory_format=torch.channels_last)
    for k in ("fine", "binary"):
        assert torch.allclose(ref[k], nhwc[k], atol=1e-4), k


def test_foreach_ema_follows_its_formula():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9, warmup=False)
    before = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for b, pe, p in zip(before, ema.model.parameters(), model.parameters()):
        assert torch.allclose(pe, 0.9 * b + 0.1 * p)


def test_cpu_native_bf16_reads_the_cpu_flags():
    assert cpu_native_bf16("processor: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    assert cpu_native_bf16("flags : avx512f avx512_bf16\n")
    assert not cpu_native_bf16("flags : fpu sse avx2 avx512f avx512bw\n")
    assert not cpu_native_bf16("model name : amx_bf16 in a name is not a flag\n")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_is_used_only_where_the_cpu_has_it(taught, tmp_path: Path, monkeypatch, native):  # noqa: F811
    path, teach, _ = taught
    monkeypatch.setattr(train_mod, "cpu_native_bf16", lambda: native)
    m = train_student([path], teach, tmp_path / "m", tiny_params(epochs=2, adaptation="frozen", cpu_bf16=True, device="cpu"), progress=False)
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert saved["precision"] == m["precision"] == ("bfloat16 autocast" if native else "float32")
    assert all(v is None or v == v for v in saved["final_train"].values())  # finite, not NaN
    # float32 by default, whatever the CPU
    m2 = train_student([path], teach, tmp_path / "m2", tiny_params(epochs=1, adaptation="frozen", device="cpu"), progress=False)
    assert m2["precision"] == "float32"
