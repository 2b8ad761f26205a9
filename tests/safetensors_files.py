"""Test helper shared by the reader's unit tests and its CUDA tests (which also run without
pytest on a GPU machine, so this module imports torch and fastvllm only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastvllm import weights


def write_ordered(path: Path, items: list[tuple[str, torch.Tensor]]) -> Path:
    """A safetensors file with tensors in exactly this order (save_file would sort them)."""
    header, off = {}, 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": weights.DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, t in items:
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return path
