"""Storage: the same behaviour on a local folder and on S3 (moto), plus local path-escape refusal."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.storage import (
    LocalStorage,
    NotAFile,
    S3Storage,
    Storage,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    UnsafeKeyError,
    absolute_uri,
    list_uris,
    open_storage,
    read_uri,
    split_uri,
)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """An empty storage with a prefix, on each back end."""
    if request.param == "local":
        return open_storage(tmp_path / "store root")
    bucket_uri = request.getfixturevalue("s3_bucket")
    return open_storage(bucket_uri + "some/prefix")


def test_round_trip(store: Storage) -> None:
    uri = store.put_bytes("a/b/c.bin", b"\x00\x01payload")
    assert store.get_bytes("a/b/c.bin") == b"\x00\x01payload"
    assert uri == store.uri_for("a/b/c.bin")
    assert store.exists("a/b/c.bin")
    store.put_bytes("a/b/c.bin", b"replaced")
    assert store.get_bytes("a/b/c.bin") == b"replaced"
    store.delete("a/b/c.bin")
    assert not store.exists("a/b/c.bin")
    store.delete("a/b/c.bin")  # idempotent


def test_list_is_recursive_sorted_and_prefix_filtered(store: Storage) -> None:
    for key in ["x/2026-11-27/b.png", "x/2026-11-27/a.png", "x/2026-11-28/sub/c.png", "y/d.png", "top.txt"]:
        store.put_bytes(key, b"1")
    assert store.list() == [
        "top.txt",
        "x/2026-11-27/a.png",
        "x/2026-11-27/b.png",
        "x/2026-11-28/sub/c.png",
        "y/d.png",
    ]
    assert store.list("x/2026-11-27/") == ["x/2026-11-27/a.png", "x/2026-11-27/b.png"]
    assert store.list("x/2026-11") == ["x/2026-11-27/a.png", "x/2026-11-27/b.png", "x/2026-11-28/sub/c.png"]
    assert store.list("nothing/") == []


def test_unicode_and_space_keys(store: Storage) -> None:
    key = "archive/2026-11-27/img 1 – Prüfteil 検査.png"
    uri = store.put_bytes(key, b"png-bytes", content_type="image/png")
    assert store.list("archive/") == [key]
    assert store.get_bytes(key) == b"png-bytes"
    assert read_uri(uri) == b"png-bytes"
    root, split_key = split_uri(uri)
    assert open_storage(root).get_bytes(split_key) == b"png-bytes"


def test_missing_object_raises_not_found_with_uri(store: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageNotFound) as info:
        store.get_bytes("no/such file.png")
    assert isinstance(info.value, KeyError)
    assert store.uri_for("no/such file.png") in str(info.value)
    assert not store.exists("no/such file.png")
    with pytest.raises(StorageNotFound):
        store.get_file("no/such file.png", tmp_path / "dl" / "unused")
    assert list((tmp_path / "dl").iterdir()) == []


def test_put_and_get_file(store: Storage, tmp_path: Path) -> None:
    source = tmp_path / "artifact.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    source.write_bytes(payload)
    store.put_file("models/v1/model.bin", source)
    dest = store.get_file("models/v1/model.bin", tmp_path / "download" / "model.bin")
    assert dest.read_bytes() == payload
    assert not [p for p in dest.parent.iterdir() if p.name != "model.bin"]  # no temp files left behind


@pytest.mark.parametrize("key", ["", "/abs/key", "a/../b", "../up", "a//b", "./a", "a/", "nul\x00byte"])
def test_malformed_keys_refused(store: Storage, key: str) -> None:
    with pytest.raises(UnsafeKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(UnsafeKeyError):
        store.get_bytes(key)


def test_pipes_and_devices_are_refused_by_every_local_read(tmp_path: Path) -> None:
    """Before they are opened: a pipe would wait for a writer for ever (a model download with get_file too),
    a device could act (a tape rewinds when opened)."""
    store = LocalStorage("/")  # as `read_uri` reads local paths: the link to /dev/null stays inside
    (tmp_path / "root").mkdir()
    os.mkfifo(tmp_path / "root" / "pipe.png")
    (tmp_path / "root" / "device.png").symlink_to("/dev/null")
    done = threading.Event()
    watchdog = threading.Timer(10, lambda: done.is_set() or os.close(os.open(tmp_path / "root" / "pipe.png",
                                                                             os.O_WRONLY | os.O_NONBLOCK)))
    watchdog.start()  # were the pipe opened, this would release the reader (and the checks below fail)
    try:
        for name in ("pipe.png", "device.png"):
            key = str(tmp_path / "root" / name).lstrip("/")
            with pytest.raises(NotAFile, match="is not a regular file"):
                store.get_bytes(key)
            with pytest.raises(NotAFile, match="is not a regular file"):
                store.get_file(key, tmp_path / "copy.png")
        assert not (tmp_path / "copy.png").exists()
    finally:
        done.set()
        watchdog.cancel()


def test_local_refuses_symlink_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    store = LocalStorage(tmp_path / "root")
    os.symlink(outside, tmp_path / "root" / "link")
    os.symlink(outside / "secret.txt", tmp_path / "root" / "file-link")
    for key in ["link/secret.txt", "file-link", "link/new.txt"]:
        with pytest.raises(UnsafeKeyError, match="outside the root"):
            store.get_bytes(key)
    with pytest.raises(UnsafeKeyError):
        store.put_bytes("link/new.txt", b"x")
    with pytest.raises(UnsafeKeyError):
        store.list("link/")
    assert not (outside / "new.txt").exists()
    # escaping links are listed, not followed: reading one fails with the reason, never skipped silently
    assert store.list() == ["file-link", "link"]


def test_a_folder_listing_includes_linked_images_from_elsewhere(tmp_path: Path) -> None:
    """A training folder whose images are links into a pool: every image is listed and readable."""
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.png").write_bytes(b"a")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "b.png").write_bytes(b"b")
    os.symlink(tmp_path / "pool" / "a.png", tmp_path / "train" / "a.png")
    uris = list_uris(tmp_path / "train", (".png",))
    assert uris == [str(tmp_path / "train" / "a.png"), str(tmp_path / "train" / "b.png")]
    assert [read_uri(u) for u in uris] == [b"a", b"b"]


def test_a_folder_listing_follows_linked_folders_wherever_they_lead(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.png").write_bytes(b"a")
    (tmp_path / "train").mkdir()
    os.symlink(tmp_path / "pool", tmp_path / "train" / "more")
    uris = list_uris(tmp_path / "train", (".png",))
    assert uris == [str(tmp_path / "train" / "more" / "a.png")] and read_uri(uris[0]) == b"a"


def test_a_file_reached_by_a_link_too_is_listed_under_its_real_path(tmp_path: Path) -> None:
    for link in ("a", "latest", "zz"):  # whatever the link's name sorts as
        root = tmp_path / link
        (root / "day1").mkdir(parents=True)
        (root / "day1" / "x.png").write_bytes(b"x")
        os.symlink(root / "day1", root / link)
        assert LocalStorage(root).list() == ["day1/x.png"], link


def test_a_symlink_loop_is_listed_and_fails_alone_when_read(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(b"ok")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    uris = list_uris(tmp_path, (".png",))
    assert uris == [str(tmp_path / "loop.png"), str(tmp_path / "ok.png")]
    with pytest.raises(StorageNotFound, match="loop"):
        read_uri(uris[0])
    assert read_uri(uris[1]) == b"ok"


def test_local_list_follows_linked_folders_inside_the_root_without_cycles(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("pool/a.png", b"a")
    store.put_bytes("train/b.png", b"b")
    os.symlink(tmp_path / "pool", tmp_path / "train" / "more")
    os.symlink(tmp_path / "train", tmp_path / "train" / "loop")  # a cycle
    assert store.list("train/") == ["train/b.png", "train/more/a.png"]
    assert store.get_bytes("train/more/a.png") == b"a"


def test_local_symlink_inside_root_is_fine(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("real/a.txt", b"a")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    assert store.get_bytes("alias/a.txt") == b"a"


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("d/f.txt", b"old")

    class Boom(Exception):
        pass

    def failing_write(f: object) -> None:
        raise Boom

    with pytest.raises(Boom):
        store._atomic_write("d/f.txt", tmp_path / "d" / "f.txt", failing_write)
    assert store.get_bytes("d/f.txt") == b"old"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.txt"]
    assert oct((tmp_path / "d" / "f.txt").stat().st_mode & 0o777) != oct(0o600)


def test_local_uris(tmp_path: Path) -> None:
    store = open_storage(f"file://{tmp_path}/with%20space")
    uri = store.put_bytes("k 1.txt", b"v")
    assert uri == str(tmp_path / "with space" / "k 1.txt")
    assert split_uri(uri) == ("/", f"{str(tmp_path)[1:]}/with space/k 1.txt")
    assert read_uri(uri) == b"v"
    assert read_uri(Path(uri).as_uri()) == b"v"  # percent-encoded file:// URI
    with pytest.raises(StorageNotFound, match="nope"):
        read_uri(tmp_path / "nope.png")


def test_split_s3_uri() -> None:
    assert split_uri("s3://bucket/archive/2026-11-27/img 1.png") == (
        "s3://bucket/",
        "archive/2026-11-27/img 1.png",
    )
    with pytest.raises(UnsafeKeyError):
        split_uri("s3://bucket/")
    with pytest.raises(ValueError):
        open_storage("s3:///no-bucket")
    with pytest.raises(ValueError):
        open_storage("gs://bucket/x")


@pytest.mark.integration
def test_s3_prefix_and_uri(s3_bucket: str) -> None:
    store = open_storage(s3_bucket + "pre/fix/")
    assert isinstance(store, S3Storage)
    uri = store.put_bytes("k.png", b"v")
    assert uri == f"{s3_bucket}pre/fix/k.png"
    assert open_storage(s3_bucket).list() == ["pre/fix/k.png"]


@pytest.mark.integration
def test_s3_missing_bucket_is_a_clear_error(s3_env: str) -> None:
    store = open_storage("s3://tr-test-bucket-that-does-not-exist/")
    with pytest.raises(StorageError, match="does not exist"):
        store.get_bytes("k")
    with pytest.raises(StorageError) as listing:  # a folder's error names the folder
        open_storage("s3://tr-test-bucket-that-does-not-exist/archive/").list()
    assert "(accessing s3://tr-test-bucket-that-does-not-exist/archive/)" in str(listing.value)


def test_s3_unreachable_endpoint_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection errors are retried, then reported as StorageUnavailable (a port nobody listens on)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_storage("s3://bucket/", endpoint_url="http://127.0.0.1:9", max_attempts=2)
    with pytest.raises(StorageUnavailable, match="s3://bucket/k"):
        store.get_bytes("k")


def test_list_uris_gives_full_uris_filtered_by_suffix(store: Storage) -> None:
    for key in ["d/a.PNG", "d/sub/b.jpg", "d/notes.txt", "e/c.png"]:
        store.put_bytes(key, b"1")
    folder = store.uri_for("d")
    assert list_uris(folder) == [store.uri_for(k) for k in ["d/a.PNG", "d/notes.txt", "d/sub/b.jpg"]]
    assert list_uris(folder + "/", (".png", ".jpg")) == [store.uri_for("d/a.PNG"), store.uri_for("d/sub/b.jpg")]
    assert read_uri(list_uris(folder)[0]) == b"1"
    assert list_uris(store.uri_for("nothing")) == []


def test_list_uris_does_not_create_a_missing_local_folder(tmp_path: Path) -> None:
    assert list_uris(tmp_path / "missing") == [] and not (tmp_path / "missing").exists()


def test_absolute_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("in/{date}/x") == str(tmp_path / "in" / "{date}" / "x")
    assert absolute_uri("s3://bucket/a/{date}/") == "s3://bucket/a/{date}/"


class _FailingS3(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that throttles every upload and cuts every download short."""

    def log_message(self, *args: object) -> None:
        pass

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.send_header("ETag", '"abc"')
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        for name, status, code in (("unsupported", 501, "NotImplemented"), ("busy", 409, "OperationAborted")):
            if self.path.split("?")[0].endswith(name):
                body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
        self.do_HEAD()
        self.wfile.write(b"x" * 10)  # then the connection closes: an incomplete read
        self.close_connection = True


@pytest.fixture
def failing_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield open_storage("s3://bucket/", endpoint_url=f"http://127.0.0.1:{server.server_port}", max_attempts=1)
    finally:
        server.shutdown()
        server.server_close()


def test_throttled_file_upload_is_transient(failing_s3: Storage, tmp_path: Path) -> None:
    """upload_file wraps the 503 SlowDown in S3UploadFailedError; it must stay retryable, as put_bytes's."""
    path = tmp_path / "bank.bin"
    path.write_bytes(b"0" * 100)
    with pytest.raises(StorageUnavailable, match="SlowDown"):
        failing_s3.put_file("models/bank.bin", path)
    with pytest.raises(StorageUnavailable, match="SlowDown"):
        failing_s3.put_bytes("models/small.bin", b"0")


def test_download_cut_short_every_time_is_transient(failing_s3: Storage, tmp_path: Path) -> None:
    """download_file retries broken reads itself, then raises RetriesExceededError: retryable too."""
    dest = tmp_path / "bank.bin"
    with pytest.raises(StorageUnavailable, match="retries exhausted"):
        failing_s3.get_file("models/bank.bin", dest)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_errors_that_waiting_cannot_heal_are_not_retried(failing_s3: Storage) -> None:
    """501 Not Implemented is the endpoint's answer for good (it was retried five times like a 503), while
    409 OperationAborted (a conflicting operation in progress) is one AWS says to retry."""
    with pytest.raises(StorageError, match="NotImplemented") as refused:
        failing_s3.get_bytes("models/unsupported")
    assert not isinstance(refused.value, StorageUnavailable)
    with pytest.raises(StorageUnavailable, match="OperationAborted"):
        failing_s3.get_bytes("models/busy")


@pytest.mark.integration
def test_a_listed_key_this_code_will_not_address_fails_alone(s3_bucket: str) -> None:
    """S3 allows keys such as `day/../up.png`: the listing used to fail on them (the whole night of the
    product unscheduled); they are listed, and reading one fails with the reason, as that image's failure."""
    import boto3

    bucket = s3_bucket[len("s3://"):].rstrip("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for key in ("day/ok.png", "day/../up.png", "day//twice.png"):
        client.put_object(Bucket=bucket, Key=key, Body=b"1")
    uris = list_uris(s3_bucket + "day/", (".png",))
    assert uris == [f"{s3_bucket}day/../up.png", f"{s3_bucket}day//twice.png", f"{s3_bucket}day/ok.png"]
    assert read_uri(uris[2]) == b"1"
    for odd in uris[:2]:
        with pytest.raises(UnsafeKeyError, match="empty, '.' or '..' segment"):
            read_uri(odd)


def test_local_paths_with_dot_dot_are_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`totalrecall score ../imgs` stored `/cwd/../imgs`, whose listed images every read then refused."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"1")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert absolute_uri("../imgs") == str(tmp_path / "imgs")
    (uri,) = list_uris("../imgs")
    assert uri == str(tmp_path / "imgs" / "a.png") and read_uri(uri) == b"1"
