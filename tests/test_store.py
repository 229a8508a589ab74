"""The adapter store on its own: content addressing, replace/delete, persistence, crash leftovers, tokens."""
import os
import stat

import pytest

from sharedllm.errors import SharedLLMError
from sharedllm.store import ADMIN_ENV, AdapterStore, admin_token, sha256_hex

META = {"method": "norm", "scheme": "float16", "params": 3, "base_fingerprint": "f" * 64}


@pytest.fixture
def store(tmp_path):
    s = AdapterStore(tmp_path / "store")
    yield s
    s.close()


def adapter_files(store):
    return sorted(p.name for p in store.files.rglob("*") if p.is_file())


def test_put_is_content_addressed_and_replace_removes_the_old_file(store):
    store.create_user("ann")
    rec = store.put("ann", b"first bytes", META)
    assert rec.sha256 == sha256_hex(b"first bytes") and store.path_of(rec.sha256).read_bytes() == b"first bytes"
    assert store.get("ann").sha256 == rec.sha256 and store.get("ann").meta == META
    rec2 = store.put("ann", b"second bytes", META)
    assert adapter_files(store) == [f"{rec2.sha256}.safetensors"]
    assert store.read(rec2.sha256) == b"second bytes" and store.count() == 1


def test_delete_removes_row_and_file_but_keeps_bytes_another_user_still_uses(store):
    for u in ("ann", "bob"):
        store.create_user(u)
        store.put(u, b"same bytes", META)
    assert len(adapter_files(store)) == 1
    assert store.delete("ann").sha256 == sha256_hex(b"same bytes")
    assert store.get("ann") is None and len(adapter_files(store)) == 1
    store.delete("bob")
    assert adapter_files(store) == [] and store.count() == 0 and store.delete("bob") is None


def test_restart_finds_every_adapter_and_token(tmp_path):
    s = AdapterStore(tmp_path)
    tokens = {u: s.create_user(u) for u in ("ann", "bob", "cy")}
    for u in tokens:
        s.put(u, f"bytes of {u}".encode(), META)
    s.close()
    s = AdapterStore(tmp_path)
    assert s.count() == 3 and s.swept["orphan_files"] == [] and s.swept["temp_files"] == []
    for u, tok in tokens.items():
        assert s.user_for_token(tok) == u and s.read(s.get(u).sha256) == f"bytes of {u}".encode()
    assert s.user_for_token("sk-wrong") is None
    s.close()


def test_only_token_hashes_are_stored(store):
    token = store.create_user("ann")
    store.close()
    raw = b"".join(p.read_bytes() for p in store.root.glob("index.sqlite*"))
    assert token.encode() not in raw


def test_crash_leftovers_are_reported_then_swept(tmp_path):
    s = AdapterStore(tmp_path)
    s.create_user("ann")
    kept = s.put("ann", b"kept", META)
    orphan = s.path_of("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"acknowledged never")
    temp = s.path_of(kept.sha256).parent / ".x.safetensors.123.tmp"
    temp.write_bytes(b"half")
    report = s.check()
    assert report["orphan_files"] == [str(orphan)] and report["temp_files"] == [str(temp)]
    assert report["missing_files"] == [] and report["rows"] == 1
    s.close()
    s = AdapterStore(tmp_path)
    assert not orphan.exists() and not temp.exists() and s.read(kept.sha256) == b"kept"
    assert s.check()["orphan_files"] == [] and s.check()["temp_files"] == []
    s.close()


def test_corrupt_file_is_detected_on_read(store):
    store.create_user("ann")
    rec = store.put("ann", b"good", META)
    store.path_of(rec.sha256).write_bytes(b"evil")
    with pytest.raises(SharedLLMError, match="corrupt"):
        store.read(rec.sha256)


def test_users_are_unique_and_put_needs_a_user(store):
    store.create_user("ann")
    with pytest.raises(SharedLLMError, match="already exists"):
        store.create_user("ann")
    with pytest.raises(SharedLLMError, match="no user"):
        store.put("nobody", b"x", META)
    assert adapter_files(store) == []


def test_admin_token_from_env_or_a_private_file(tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, "from-env-" + "x" * 23)
    assert admin_token(tmp_path) == ("from-env-" + "x" * 23, f"${ADMIN_ENV}")
    assert not (tmp_path / "admin_token").exists()
    monkeypatch.delenv(ADMIN_ENV)
    tok, where = admin_token(tmp_path)
    assert len(tok) > 30 and where == str(tmp_path / "admin_token")
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o600
    assert admin_token(tmp_path)[0] == tok  # stable across restarts


def test_put_many_bulk_import(store):
    n = store.put_many([(f"u{i}", f"adapter {i}".encode(), META) for i in range(50)])
    assert n == 50 and store.count() == 50 and store.read(store.get("u7").sha256) == b"adapter 7"
    assert store.check()["orphan_files"] == []


def test_a_short_admin_token_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, "x" * 31)
    with pytest.raises(SharedLLMError, match="at least 32"):
        admin_token(tmp_path)


def test_the_store_folder_and_index_are_private(tmp_path):
    from sharedllm.store import AdapterStore

    s = AdapterStore(tmp_path / "store")
    s.create_user("ann")
    s.put("ann", b"bytes", META)
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in [s.root, s.files, s.root / "index.sqlite"]}
    assert modes == {"store": 0o700, "adapters": 0o700, "index.sqlite": 0o600}
    assert all(stat.S_IMODE(os.stat(p).st_mode) & 0o077 == 0 for p in s.root.rglob("*"))
    s.close()
