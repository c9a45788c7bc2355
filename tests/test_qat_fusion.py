"""Attention fusion: ORT's transformer optimizer fuses whole attention blocks on a legacy-exporter graph of the
eager attention path, not on a dynamo graph; the fused legacy graph keeps parity with PyTorch."""
from __future__ import annotations

import pytest

from tests.test_qat import _inputs, _tiny_classifier


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_attention_fusion_by_exporter(tmp_path, exporter):
    from compress.onnx.export import export_onnx, op_counts, optimize_onnx
    from compress.onnx.parity import check_parity

    model = _tiny_classifier()
    attn = model.config._attn_implementation
    raw = export_onnx(model, _inputs(2), tmp_path / "raw.onnx", task="sequence-classification", exporter=exporter)
    assert model.config._attn_implementation == attn  # the eager switch is undone
    fused = tmp_path / "fused.onnx"
    assert optimize_onnx(raw, fused, model_type="bert", num_heads=4, hidden_size=64)
    ops = op_counts(fused)
    if exporter == "legacy":
        assert ops.get("Attention") == 2, ops
        res = check_parity(model, fused, _inputs(8, seed=5), task="sequence-classification", atol=1e-4)
        assert res.ok, res
    else:
        assert "Attention" not in ops and ops.get("SkipLayerNormalization", 0) >= 2, ops


def test_unknown_exporter_is_bad_input(tmp_path):
    from compress.errors import InputError
    from compress.onnx.export import export_onnx

    with pytest.raises(InputError, match="export.exporter"):
        export_onnx(_tiny_classifier(), _inputs(2), tmp_path / "x.onnx", task="sequence-classification",
                    exporter="torchscript")
