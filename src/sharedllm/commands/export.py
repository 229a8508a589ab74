"""sharedllm export: hand an adapter to the HF ecosystem — a PEFT LoRA folder, or a merged transformers checkpoint."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..adapters import get_method
from ..base import load_base
from ..errors import SharedLLMError
from ..log import say
from ..personalise import load_adapted
from .args import add_base_args

HELP = ("export an adapter as a PEFT folder (lora), a merged HF transformers checkpoint (norm, full) or a GGUF "
        "(norm, default base)")


def configure(p) -> None:
    p.add_argument("--adapter", required=True, help="adapter file written by sharedllm")
    p.add_argument("--out", required=True, help="output folder, or .gguf file with --format gguf (must not exist)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: PEFT folder / merged checkpoint; gguf: the default base's GGUF with a norm "
                        "adapter's gains as its norm weights (llama.cpp)")
    add_base_args(p)


def run(args) -> dict:
    out = Path(args.out)
    if out.exists():
        raise SharedLLMError(f"{out}: already exists; choose a new folder")
    base = load_base(args.base, args.device)
    adapted = load_adapted(base, args.adapter)
    if args.format == "gguf":
        return _gguf(args, adapted, out)
    kind = get_method(adapted.method).caps.export
    if kind is None:
        raise SharedLLMError(f"{args.adapter}: a {adapted.method} adapter cannot be exported to a PEFT folder or "
                             "merged into a transformers checkpoint")
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"writing {'PEFT adapter' if kind == 'peft' else 'merged checkpoint'} to {out}")
    adapted.model.save_pretrained(str(tmp), safe_serialization=True)
    if kind == "merged":
        base.tokenizer.save(tmp)
    tmp.rename(out)
    kind = "peft" if kind == "peft" else "transformers"
    return {"out": str(out), "format": kind, "method": adapted.method, "files": sorted(p.name for p in out.iterdir())}


def _gguf(args, adapted, out: Path) -> dict:
    from .. import registry
    from ..gguf_export import write_norm_gguf

    if not get_method(adapted.method).caps.gguf:
        raise SharedLLMError(f"{args.adapter}: --format gguf exports only adapters that live in the base's own "
                             f"tensors (norm; this is {adapted.method})")
    named = registry.resolve(args.base)
    if named is None:
        raise SharedLLMError(f"--format gguf needs a named base (`sharedllm bases`), whose GGUF is the file "
                             f"being patched; {args.base!r} is not one")
    say(f"writing {out}: the base GGUF with this adapter's {len(adapted.params)} norm gains")
    return {**write_norm_gguf(registry.gguf_path(named), adapted.params, out), "method": adapted.method, "files": [out.name]}


def render(r: dict) -> str:
    if r["format"] == "gguf":
        return f"wrote {r['out']} ({r['bytes']:,} bytes, {r['norms']} norms replaced); load it with llama.cpp"
    load = ("PeftModel.from_pretrained(base_model, DIR)" if r["format"] == "peft"
            else "AutoModelForCausalLM.from_pretrained(DIR)")
    return f"wrote {r['format']} folder {r['out']} ({', '.join(r['files'])}); load it with {load}"
