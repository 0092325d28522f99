"""Cloud Storage's preconditions through google-cloud-storage against the local storage front.

fake-gcs-server alone ignores them on large uploads, rewrite, copy, delete
and patch; every claim the pipeline makes rests on them, so each case here
goes through the real client and expects what Cloud Storage answers.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from google.api_core.exceptions import (
    BadRequest,
    Forbidden,
    NotFound,
    PreconditionFailed,
    ServiceUnavailable,
)
from google.cloud import storage

from dicomflow import objects, retry
from dicomflow.errors import TransientError
from localcloud.faultproxy import FaultProxy
from localcloud.storage import StorageServer, client
from localcloud.storagefront import StorageFront

NINE_MIB = 9 * 1024 * 1024


@pytest.fixture
def gcs(gcs_server: StorageServer) -> Iterator[storage.Client]:
    made = gcs_server.client()
    yield made
    made.close()


@pytest.fixture
def bucket(gcs: storage.Client) -> storage.Bucket:
    return gcs.create_bucket(f"front-{time.monotonic_ns()}")


def test_a_large_create_if_absent_upload_meets_412_the_second_time(bucket: storage.Bucket) -> None:
    data = b"\x01" * NINE_MIB  # above 8 MiB the client uploads resumably
    bucket.blob("big.bin").upload_from_string(data, if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("big.bin").upload_from_string(b"\x02" * NINE_MIB, if_generation_match=0)
    assert bucket.blob("big.bin").download_as_bytes() == data


def test_a_resumable_upload_checks_its_precondition_when_the_last_chunk_lands(
    bucket: storage.Bucket,
) -> None:
    session = bucket.blob("late.bin").create_resumable_upload_session(if_generation_match=0)
    bucket.blob("late.bin").upload_from_string(b"first")  # created after the session began
    answer = requests.put(
        session, data=b"second", headers={"Content-Range": "bytes 0-5/6"}, timeout=60
    )
    assert answer.status_code == 412
    assert answer.json()["error"]["errors"][0]["reason"] == "conditionNotMet"
    assert bucket.blob("late.bin").download_as_bytes() == b"first"


def test_a_delete_with_a_stale_generation_meets_412_and_the_object_stays(
    bucket: storage.Bucket,
) -> None:
    blob = bucket.blob("keep.txt")
    blob.upload_from_string(b"one")
    stale = blob.generation
    assert stale is not None
    blob.upload_from_string(b"two")
    with pytest.raises(PreconditionFailed):
        bucket.blob("keep.txt").delete(if_generation_match=stale)
    assert bucket.blob("keep.txt").download_as_bytes() == b"two"
    bucket.blob("keep.txt").delete(if_generation_match=blob.generation)
    assert not bucket.blob("keep.txt").exists()


def test_a_delete_of_a_generation_that_is_not_live_is_not_found(bucket: storage.Bucket) -> None:
    old = bucket.blob("v")
    old.upload_from_string(b"one")
    bucket.blob("v").upload_from_string(b"two")
    with pytest.raises(NotFound):
        bucket.blob("v", generation=old.generation).delete()
    assert bucket.blob("v").download_as_bytes() == b"two"


def test_a_create_if_absent_rewrite_onto_an_existing_object_meets_412(
    bucket: storage.Bucket,
) -> None:
    bucket.blob("src").upload_from_string(b"source")
    bucket.blob("dst").upload_from_string(b"already here")
    with pytest.raises(PreconditionFailed):
        bucket.blob("dst").rewrite(bucket.blob("src"), if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.copy_blob(bucket.blob("src"), bucket, "dst", if_generation_match=0)
    assert bucket.blob("dst").download_as_bytes() == b"already here"


def test_a_rewrite_carries_the_destination_metadata_into_the_listing(
    bucket: storage.Bucket, gcs: storage.Client
) -> None:
    source = bucket.blob("incoming/a.dcm")
    source.upload_from_string(b"DICM" * 100)
    claim = bucket.blob("batches/w/k.dcm")
    claim.metadata = {"sourceName": "incoming/a.dcm", "sop": "1.2.3"}
    token, written, total = claim.rewrite(source, if_generation_match=0)
    assert (token, written, total) == (None, 400, 400)
    assert claim.metadata == {"sourceName": "incoming/a.dcm", "sop": "1.2.3"}
    [listed] = gcs.list_blobs(bucket, prefix="batches/")
    assert listed.metadata == {"sourceName": "incoming/a.dcm", "sop": "1.2.3"}
    assert listed.generation == claim.generation
    assert listed.size == 400
    assert listed.crc32c == source.crc32c
    assert listed.md5_hash == source.md5_hash
    assert listed.time_created is not None


def test_a_copy_with_a_stale_source_generation_meets_412(bucket: storage.Bucket) -> None:
    source = bucket.blob("src")
    source.upload_from_string(b"one")
    stale = source.generation
    source.upload_from_string(b"two")
    with pytest.raises(PreconditionFailed):
        bucket.blob("dst").rewrite(bucket.blob("src"), if_source_generation_match=stale)
    assert not bucket.blob("dst").exists()


def test_a_compare_and_swap_upload_with_a_stale_generation_meets_412(
    bucket: storage.Bucket,
) -> None:
    blob = bucket.blob("state.json")
    blob.upload_from_string(b"{}", if_generation_match=0)
    stale = blob.generation
    assert stale is not None
    blob.upload_from_string(b'{"n": 1}', if_generation_match=stale)
    with pytest.raises(PreconditionFailed):
        bucket.blob("state.json").upload_from_string(b'{"n": 2}', if_generation_match=stale)
    assert bucket.blob("state.json").download_as_bytes() == b'{"n": 1}'


def test_a_read_of_a_generation_that_changed_meets_412(bucket: storage.Bucket) -> None:
    blob = bucket.blob("r")
    blob.upload_from_string(b"one")
    stale = blob.generation
    blob.upload_from_string(b"two")
    with pytest.raises(PreconditionFailed):
        bucket.blob("r").download_as_bytes(if_generation_match=stale)


def test_a_metadata_patch_with_a_stale_metageneration_meets_412(bucket: storage.Bucket) -> None:
    blob = bucket.blob("m")
    blob.upload_from_string(b"x")
    assert blob.metageneration == 1
    blob.metadata = {"state": "open"}
    blob.patch(if_metageneration_match=1)
    assert blob.metageneration == 2
    stale = bucket.blob("m")
    stale.metadata = {"state": "sealed"}
    with pytest.raises(PreconditionFailed):
        stale.patch(if_metageneration_match=1)
    reread = bucket.get_blob("m")
    assert reread is not None
    assert (reread.metadata, reread.metageneration) == ({"state": "open"}, 2)


def test_a_compose_onto_an_existing_object_with_create_if_absent_meets_412(
    bucket: storage.Bucket,
) -> None:
    parts = [bucket.blob("p1"), bucket.blob("p2")]
    for part in parts:
        part.upload_from_string(b"part")
    bucket.blob("whole").upload_from_string(b"here")
    with pytest.raises(PreconditionFailed):
        bucket.blob("whole").compose(parts, if_generation_match=0)
    assert bucket.blob("whole").download_as_bytes() == b"here"


def _race(contenders: int, attempt: Callable[[int], None]) -> list[str]:
    """Run ``attempt(i)`` in ``contenders`` threads released together; their outcomes."""
    start = threading.Barrier(contenders)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        start.wait()
        try:
            attempt(i)
            outcome = "won"
        except PreconditionFailed:
            outcome = "412"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.parametrize("how", ["rewrite", "resumable upload"])
def test_twenty_racing_create_if_absent_writes_have_exactly_one_winner(
    gcs_server: StorageServer, bucket: storage.Bucket, how: str
) -> None:
    bucket.blob("src").upload_from_string(b"source bytes")
    clients = [gcs_server.client() for _ in range(20)]

    def attempt(i: int) -> None:
        mine = clients[i].bucket(bucket.name)
        target = mine.blob("claim", chunk_size=256 * 1024)
        target.metadata = {"contender": str(i)}
        if how == "rewrite":
            target.rewrite(mine.blob("src"), if_generation_match=0)
        else:
            # A stream of unknown size goes up in chunks, the last one naming the total.
            target.upload_from_file(io.BytesIO(bytes([i]) * 600_000), if_generation_match=0)

    try:
        outcomes = _race(20, attempt)
    finally:
        for made in clients:
            made.close()
    assert sorted(outcomes) == ["412"] * 19 + ["won"]


def test_an_after_fault_loses_the_response_of_a_write_that_took_effect(
    gcs_server: StorageServer, bucket: storage.Bucket
) -> None:
    proxy = FaultProxy(gcs_server.url, after_fault_rate=1.0, seed=1).start()
    faulty = client(proxy.url)
    try:
        blob = faulty.bucket(bucket.name).blob("lost-answer")
        with pytest.raises(ServiceUnavailable):
            blob.upload_from_string(b"it is there", if_generation_match=0, retry=None)
        # With the default retry, the retry of a write whose answer was lost meets that write.
        with pytest.raises(PreconditionFailed):
            faulty.bucket(bucket.name).blob("retried").upload_from_string(
                b"mine", if_generation_match=0
            )
    finally:
        faulty.close()
        proxy.stop()
    assert bucket.blob("lost-answer").download_as_bytes() == b"it is there"
    assert bucket.blob("retried").download_as_bytes() == b"mine"
    snapshot = proxy.snapshot()
    # A write that did not take effect (the retry's 412) keeps its answer.
    assert snapshot["after_faults"] == {"objects.insert": 2}
    assert snapshot["faults"] == {}
    inserts = {k: v for k, v in snapshot["statuses"].items() if k.startswith("objects.insert")}
    assert inserts == {"objects.insert 503": 2, "objects.insert 412": 1}


def test_a_resumable_upload_through_the_fault_proxy_stays_behind_it(
    gcs_server: StorageServer, bucket: storage.Bucket
) -> None:
    proxy = FaultProxy(gcs_server.url).start()
    counted = client(proxy.url)
    try:
        counted.bucket(bucket.name).blob("chunks", chunk_size=256 * 1024).upload_from_file(
            io.BytesIO(b"\x03" * 600_000)
        )
    finally:
        counted.close()
        proxy.stop()
    # The session start and all three chunks went through the proxy, none around it.
    assert proxy.snapshot()["counts"]["objects.insert"] == 4


def test_dicomflow_recognises_its_own_write_whose_answer_was_lost(
    gcs_server: StorageServer, bucket: storage.Bucket
) -> None:
    """objects.create and objects.swap, through a proxy that loses the answer of the first
    write of each: the library's retry meets 412, and the token read back says it is ours."""
    from dicomflow import objects

    proxy = FaultProxy(gcs_server.url, seed=3).start()
    faulty = client(proxy.url)
    try:
        target = faulty.bucket(bucket.name)
        proxy.after_fault_rate = 1.0  # every write takes effect, then its answer is lost
        original = objects._upload

        def once(*args: object, **kwargs: object) -> int:
            # The first attempt's answer is lost; the library's own retry then runs clean.
            try:
                return original(*args, **kwargs)  # type: ignore[arg-type]
            finally:
                proxy.after_fault_rate = 0.0

        objects._upload = once
        try:
            created = objects.create(target, "mine.json", {"v": 1})
            assert created is not None  # ours, not "someone else's"
            proxy.after_fault_rate = 1.0
            swapped = objects.swap(target, "mine.json", {"v": 2}, created)
            assert swapped is not None and swapped != created
        finally:
            objects._upload = original
        # Someone else's object is still told apart.
        assert objects.create(target, "mine.json", {"v": 3}) is None
        assert objects.swap(target, "mine.json", {"v": 4}, created) is None
    finally:
        faulty.close()
        proxy.stop()
    assert objects.read_json(bucket, "mine.json") == {
        "v": 2,
        objects.TOKEN: objects.read_json(bucket, "mine.json")[objects.TOKEN],  # type: ignore[index]
    }
    assert proxy.snapshot()["after_faults"] == {"objects.insert": 2}


# --- the project's retry (dicomflow.retry.storage) through the client ---------------------------

NAME = "DOE^JOHN/x.json"  # a name that must not reach an error message


@pytest.fixture
def proxied(
    gcs_server: StorageServer, bucket: storage.Bucket
) -> Iterator[tuple[FaultProxy, storage.Bucket]]:
    """The test's bucket as seen through a fault proxy (which counts every request)."""
    proxy = FaultProxy(gcs_server.url).start()
    faulty = client(proxy.url)
    bucket.blob(NAME).upload_from_string(b'{"v": 1}')
    try:
        yield proxy, faulty.bucket(bucket.name)
    finally:
        faulty.close()
        proxy.stop()


def _copy(target: storage.Bucket) -> object:
    # As ingest copies: create-if-absent, so a repeat meets 412 rather than a second copy.
    return target.blob("DOE^JOHN/copy.dcm").rewrite(
        target.blob(NAME), if_generation_match=0, retry=retry.storage()
    )


@pytest.mark.parametrize(
    ("operation", "call"),
    [
        ("objects.download", lambda b: objects.read_json(b, NAME)),
        ("objects.insert", lambda b: objects.create(b, "DOE^JOHN/new.json", {}) is not None),
        ("objects.list", lambda b: objects.names(b, "DOE^JOHN/")),
        ("objects.get", lambda b: objects.exists(b, NAME)),
        ("objects.rewrite", _copy),
        ("objects.delete", lambda b: objects.delete(b, NAME)),
    ],
)
def test_the_projects_retry_takes_a_storage_call_past_one_503(
    proxied: tuple[FaultProxy, storage.Bucket],
    operation: str,
    call: Callable[[storage.Bucket], object],
) -> None:
    proxy, target = proxied
    refused: list[str] = []

    def once(method: str, path: str, op: str) -> int | None:
        if op != operation or refused:
            return None
        refused.append(op)
        return 503

    proxy.refuse = once
    assert call(target)
    statuses = proxy.snapshot()["statuses"]
    assert {k: v for k, v in statuses.items() if k.startswith(operation)} == {
        f"{operation} 503": 1,
        f"{operation} 200": 1,
    }


def test_the_projects_retry_gives_up_at_its_deadline_with_a_transient_error(
    proxied: tuple[FaultProxy, storage.Bucket],
) -> None:
    proxy, target = proxied
    proxy.refuse = lambda method, path, op: 503
    with pytest.raises(TransientError) as caught:
        objects.read(target, NAME, deadline=1.0)
    assert str(caught.value) == "gave up after 1s: InvalidResponse (HTTP 503)"
    assert proxy.snapshot()["statuses"]["objects.download 503"] >= 2
    with pytest.raises(
        TransientError, match=r"^gave up after 1s: ServiceUnavailable \(HTTP 503\)$"
    ):
        target.blob(NAME).exists(retry=retry.storage(1.0))


def test_the_projects_retry_answers_412_and_404_at_once(
    proxied: tuple[FaultProxy, storage.Bucket],
) -> None:
    proxy, target = proxied
    with pytest.raises(PreconditionFailed):
        target.blob(NAME).upload_from_string(b"{}", if_generation_match=0, retry=retry.storage())
    with pytest.raises(NotFound):
        target.blob("absent.json").download_as_bytes(retry=retry.storage())
    assert objects.create(target, NAME, {"v": 2}) is None  # someone else's: 412, read back
    assert objects.read(target, "absent.json") is None
    statuses = proxy.snapshot()["statuses"]
    assert {k: v for k, v in statuses.items() if k.startswith("objects.")} == {
        "objects.insert 412": 2,
        "objects.download 404": 2,
        "objects.download 200": 1,
    }


def test_a_retention_policy_refuses_overwrite_and_delete_of_a_young_object(
    bucket: storage.Bucket,
) -> None:
    bucket.retention_period = 3600
    bucket.patch()
    assert bucket.client.get_bucket(bucket.name).retention_period == 3600
    kept = bucket.blob("backups/2026-11-25/_MANIFEST.json")
    kept.upload_from_string(b"first", if_generation_match=0)
    refused: list[Callable[[], object]] = [
        lambda: bucket.blob(kept.name).upload_from_string(b"second"),  # overwrite
        lambda: bucket.blob(kept.name).delete(),
        lambda: bucket.copy_blob(bucket.blob("other"), bucket, kept.name),  # copy over it
        lambda: bucket.blob(kept.name).rewrite(bucket.blob("other")),
    ]
    bucket.blob("other").upload_from_string(b"other")
    for attempt in refused:
        with pytest.raises(Forbidden) as caught:
            attempt()
        error = caught.value.response.json()["error"]
        assert (error["code"], error["errors"][0]["reason"]) == (403, "retentionPolicyNotMet")
        assert "is subject to bucket's retention policy" in error["message"]
    assert bucket.blob(kept.name).download_as_bytes() == b"first"
    # New names are created as usual; metadata may change, as on Cloud Storage.
    bucket.blob("backups/2026-11-25/rerun-2/_MANIFEST.json").upload_from_string(b"rerun")
    kept.metadata = {"note": "allowed"}
    kept.patch()
    # Without the policy (removed, or aged out) the same overwrite goes through.
    bucket.retention_period = None
    bucket.patch()
    bucket.blob(kept.name).upload_from_string(b"second")
    assert bucket.blob(kept.name).download_as_bytes() == b"second"


def test_a_front_given_a_retention_period_at_start_enforces_it_and_shows_it(
    gcs_server: StorageServer, bucket: storage.Bucket
) -> None:
    """What ``localcloud`` does with LOCALCLOUD_BACKUP_RETENTION_SECONDS (``--retention``)."""
    front = StorageFront(gcs_server.upstream_url, 0, {bucket.name: 60}).start()
    made = client(front.url)
    try:
        retained = made.get_bucket(bucket.name)
        assert retained.retention_period == 60
        retained.blob("young").upload_from_string(b"kept")
        with pytest.raises(Forbidden):
            retained.blob("young").delete()
        assert retained.blob("young").download_as_bytes() == b"kept"
    finally:
        made.close()
        front.stop()


@pytest.mark.parametrize("name", ["a\nb.dcm", "a\rb.dcm", "dir/\r\n.dcm"])
def test_a_name_with_cr_or_lf_is_refused_as_cloud_storage_refuses_it(
    bucket: storage.Bucket, name: str
) -> None:
    """Every way of creating an object: simple, resumable and JSON uploads, rewrite, copy
    and compose. The client raises BadRequest with Cloud Storage's words; nothing lands."""
    source = bucket.blob("source.dcm")
    source.upload_from_string(b"x" * 10)
    writes: list[Callable[[], object]] = [
        lambda: bucket.blob(name).upload_from_string(b"data"),
        lambda: bucket.blob(name).upload_from_string(b"\x01" * NINE_MIB),  # resumable
        lambda: bucket.blob(name).rewrite(source),
        lambda: bucket.copy_blob(source, bucket, name),
        lambda: bucket.blob(name).compose([source]),
    ]
    for write in writes:
        with pytest.raises(BadRequest) as info:
            write()
        assert info.value.code == 400
        assert "Disallowed unicode characters present in object name" in info.value.message
    assert [b.name for b in bucket.list_blobs()] == ["source.dcm"]
    # The JSON error shape of the service, for clients that read it.
    base = bucket.client._connection.API_BASE_URL
    answer = requests.post(
        f"{base}/upload/storage/v1/b/{bucket.name}/o",
        params={"uploadType": "media", "name": name},
        data=b"data",
        timeout=60,
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["errors"][0] == {
        "message": "Disallowed unicode characters present in object name",
        "domain": "global",
        "reason": "invalid",
    }
    # Names with other control characters, tabs and any Unicode are fine.
    bucket.blob("tab\there é 名前 😀.dcm").upload_from_string(b"ok")
