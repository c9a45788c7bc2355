"""The ONNX layer: export a PyTorch student to ONNX (export.py), run it in ONNX Runtime and time it
(runtime.py), check it against PyTorch (parity.py), and quantize it to int8 (quantize.py).

Submodules are imported on use (torch and onnxruntime are heavy); e.g.
`from compress.onnx.export import export_onnx`."""
from __future__ import annotations

__all__ = ["export", "parity", "quantize", "runtime"]
