import os
import threading

import pytest

from porcelain.storage import Store, StorageError, sha256_bytes


def test_local_write_read_atomic_and_listing(tmp_path):
    st = Store(str(tmp_path / "store"))
    st.write_json("a/b.json", {"x": 1})
    assert st.read_json("a/b.json") == {"x": 1}
    assert st.list("a") == ["a/b.json"]
    # no temporary files are left behind
    assert not [f for f in os.listdir(tmp_path / "store" / "a") if ".tmp-" in f]
    with pytest.raises(FileNotFoundError, match="not in the store"):
        st.read_bytes("a/missing.json")


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../x", "a//b", "", "a/./b", "a\\b"])
def test_keys_cannot_leave_the_store(tmp_path, key):
    st = Store(str(tmp_path))
    with pytest.raises(StorageError):
        st.write_bytes(key, b"x")


def test_put_object_is_content_addressed_and_idempotent(tmp_path):
    st = Store(str(tmp_path))
    k1 = st.put_object(b"hello", "txt")
    k2 = st.put_object(b"hello", "txt")
    assert k1 == k2 == f"objects/{sha256_bytes(b'hello')[:2]}/{sha256_bytes(b'hello')}.txt"
    assert st.read_bytes(k1) == b"hello"


def test_concurrent_writers_of_the_same_key_leave_one_whole_object(tmp_path):
    st = Store(str(tmp_path))
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=st.write_bytes, args=("k.bin", b)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert st.read_bytes("k.bin") in blobs


def test_s3_store_round_trip(moto_server, s3_bucket):
    st = Store(f"{s3_bucket}/runs", moto_server.storage_options())
    assert not st.exists("x.json")
    st.write_json("x.json", {"a": [1, 2]})
    assert st.exists("x.json")
    assert st.read_json("x.json") == {"a": [1, 2]}
    key = st.put_object(b"png-bytes", "png")
    assert st.read_bytes(key) == b"png-bytes"
    assert st.list("objects") == [key]
    assert st.uri("x.json") == f"{s3_bucket}/runs/x.json"


def test_read_verified_refuses_bytes_that_changed(tmp_path):
    import hashlib

    from porcelain.errors import WeightsError

    store = Store(str(tmp_path))
    key = store.write_bytes("reference/x/model.safetensors", b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    assert store.read_verified(key, sha) == b"weights"
    store.write_bytes(key, b"tampered")
    with pytest.raises(WeightsError, match="does not match its recorded sha256"):
        store.read_verified(key, sha)
