"""sharedllm export: hand an adapter to the HF ecosystem — a PEFT LoRA folder, or a merged transformers checkpoint."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..base import load_base
from ..cli import add_base_args, say
from ..errors import SharedLLMError
from ..personalise import load_adapted

HELP = "export an adapter as a PEFT folder (lora) or a merged HF transformers checkpoint (norm, full)"


def configure(p) -> None:
    p.add_argument("--adapter", required=True, help="adapter file written by sharedllm")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    add_base_args(p)


def run(args) -> dict:
    out = Path(args.out)
    if out.exists():
        raise SharedLLMError(f"{out}: already exists; choose a new folder")
    base = load_base(args.base, args.device)
    adapted = load_adapted(base, args.adapter)
    if adapted.method == "steer":
        raise SharedLLMError(f"{args.adapter}: a steering vector cannot be merged into a transformers checkpoint")
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"writing {'PEFT adapter' if adapted.method == 'lora' else 'merged checkpoint'} to {out}")
    adapted.model.save_pretrained(str(tmp), safe_serialization=True)
    if adapted.method != "lora":
        base.tokenizer.save(tmp)
    tmp.rename(out)
    kind = "peft" if adapted.method == "lora" else "transformers"
    return {"out": str(out), "format": kind, "method": adapted.method, "files": sorted(p.name for p in out.iterdir())}


def render(r: dict) -> str:
    load = ("PeftModel.from_pretrained(base_model, DIR)" if r["format"] == "peft"
            else "AutoModelForCausalLM.from_pretrained(DIR)")
    return f"wrote {r['format']} folder {r['out']} ({', '.join(r['files'])}); load it with {load}"
