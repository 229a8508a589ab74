"""A user's norm adapter as a GGUF file llama.cpp loads: the default base's GGUF with the user's gains written
over its RMSNorm weights (which GGUF stores as F32), every other byte unchanged."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np

from .atomic import fsync_dir
from .errors import SharedLLMError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_GGUF_NORM = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    """HF Llama norm tensor name -> llama.cpp's."""
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    m = _LAYER.match(hf_name)
    if not m:
        raise SharedLLMError(f"{hf_name}: no GGUF counterpart known (only Llama-style RMSNorm gains export)")
    return f"blk.{m.group(1)}.{_GGUF_NORM[m.group(2)]}.weight"


def write_norm_gguf(base_gguf: Path, gains: dict, out: Path) -> dict:
    """Copy `base_gguf` to `out` with each gain vector (HF name -> tensor) over its norm's F32 weight."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(base_gguf)).tensors}
    patches = []
    for name, value in gains.items():
        t = tensors.get(gguf_name(name))
        data = np.ascontiguousarray(value.detach().float().cpu().numpy(), dtype="<f4")
        if t is None or t.tensor_type.name != "F32" or t.n_bytes != data.nbytes:
            raise SharedLLMError(f"{base_gguf.name}: tensor {gguf_name(name)} is missing or not F32 of "
                                 f"{data.size} values; this GGUF is not the adapter's base")
        patches.append((int(t.data_offset), data.tobytes()))
    if len(patches) != sum(1 for n in tensors if n.endswith("_norm.weight")):
        raise SharedLLMError(f"{base_gguf.name}: the adapter covers {len(patches)} norms, the GGUF has more")
    tmp = out.with_name(f".{out.name}.part")
    shutil.copyfile(base_gguf, tmp)
    with open(tmp, "r+b") as f:
        for offset, raw in patches:
            f.seek(offset)
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return {"out": str(out), "format": "gguf", "norms": len(patches), "bytes": out.stat().st_size}
