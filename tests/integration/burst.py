"""The 2,000-file burst, run once per session and read by the ingest and report tests.

One pipeline (``Pipeline`` on the session's emulators, real Pub/Sub) takes, in two
rounds, every event delivered twice (half of the repeats right behind the first,
concurrent in the pool, half at the end) while the clock moves on across windows:

1. the healthy burst: 2,000 generated instances (20 studies x 2 series x 50) and 50 of
   them uploaded again under new names; drained, then its alerts pulled (there must
   be none) and its outcomes counted;
2. the sample corpus of pydicom and pydicom-data and 30 broken files (not DICOM,
   without a SOP Instance UID, cut short); drained.

``Burst`` keeps what the tests assert on; the pipeline stays up for the session, so
they read its outcomes, summaries and store themselves.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import UID

from dicomflow import batches, runtime, store
from dicomflow.ops import outcomes
from dicomflow.staging import parse_batch
from tests.ingest_support import Clock, Uploaded, make_instance, value_cut_short
from tests.integration.sites import Pipeline, PipelineFactory

STUDIES, SERIES, PER_SERIES = 20, 2, 50  # 2,000 instances
RESENT = 50  # of them uploaded again under another name: duplicates
BATCH_MAX_FILES = "400"


def expected_sop(data: bytes) -> str | None:
    """The SOP Instance UID if a full pydicom read finds an acceptable file, else None."""
    if data[128:132] != b"DICM":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(BytesIO(data))
        except Exception:
            return None
        if value_cut_short(ds):
            return None
        if not str(ds.file_meta.get("TransferSyntaxUID", "") or ""):
            return None
        values = []
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            value = str(getattr(ds, keyword, "") or "").strip()
            if not value or not UID(value).is_valid:
                return None
            values.append(value)
        syntax = UID(str(ds.file_meta.TransferSyntaxUID))
        photometric = str(getattr(ds, "PhotometricInterpretation", ""))
        if "PixelData" in ds and not syntax.is_compressed and "422" not in photometric:
            try:
                frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            except ValueError:
                frames = 1
            expected = ds.Rows * ds.Columns * ds.SamplesPerPixel * frames * ds.BitsAllocated // 8
            if len(ds.PixelData) < expected:
                return None  # truncated
    return values[2]


def corpus() -> dict[str, bytes]:
    """The real sample files shipped by pydicom and pydicom-data, with their own names."""
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    spec = importlib.util.find_spec("data_store")
    if spec and spec.origin:
        roots.append(Path(spec.origin).parent / "data")
    files = {}
    for root in roots:
        for path in sorted(root.iterdir()):
            if path.is_file():
                files[f"corpus/{root.parent.name}/{path.name}"] = path.read_bytes()
    return files


def check_one_outcome_each(p: Pipeline, uploads: list[Uploaded]) -> dict[str, outcomes.Outcome]:
    """Every upload has exactly one final outcome, and nothing else has one."""
    found = p.outcomes()
    assert sorted(found) == sorted({p.key(u) for u in uploads})
    assert all(o.status in outcomes.FINAL for o in found.values())
    listed: Counter[str] = Counter()
    for summary in p.summaries():
        window, bits = parse_batch(summary["batch"])
        keys = [r.key for r in batches.read_files(p.bucket, window) or []]
        listed.update(k for k in keys if k.startswith(bits))
    assert max(listed.values(), default=1) == 1  # no file in two batches
    return found


@dataclass
class Round:
    """One round of the burst: its files, uploads and deliveries, and what came of them."""

    files: dict[str, bytes]
    uploads: list[Uploaded]
    deliveries: list[Uploaded]
    statuses: list[int]
    ingest_calls: Counter[str]  # the functions' Storage requests during the deliveries
    ticks: int = 0
    alerts: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    stored: int = 0


@dataclass
class Burst:
    """Both rounds on one pipeline."""

    p: Pipeline
    healthy: Round
    corpus: Round
    seconds: dict[str, float]

    @property
    def files(self) -> dict[str, bytes]:
        return {**self.healthy.files, **self.corpus.files}

    @property
    def uploads(self) -> list[Uploaded]:
        return self.healthy.uploads + self.corpus.uploads

    @property
    def deliveries(self) -> list[Uploaded]:
        return self.healthy.deliveries + self.corpus.deliveries

    @property
    def statuses(self) -> list[int]:
        return self.healthy.statuses + self.corpus.statuses

    @property
    def ingest_calls(self) -> Counter[str]:
        return self.healthy.ingest_calls + self.corpus.ingest_calls

    @property
    def ticks(self) -> int:
        return self.healthy.ticks + self.corpus.ticks


def healthy_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for study in range(STUDIES):
        study_uid = pydicom.uid.generate_uid()
        for series in range(SERIES):
            series_uid = pydicom.uid.generate_uid()
            for i in range(PER_SERIES):
                name = f"burst/{study:02d}/{series}/IM{i:04d}.dcm"
                files[name] = make_instance(study_uid, series_uid)
    for name in list(files)[:: len(files) // RESENT][:RESENT]:
        files[name.replace("burst/", "again/", 1)] = files[name]
    return files


def broken_and_corpus_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i in range(10):
        files[f"broken/notdicom{i}.dcm"] = b"%PDF-1.4 not an image " * (i + 10)
        files[f"broken/nouid{i}.dcm"] = make_instance(omit=("SOPInstanceUID",))
        files[f"broken/cut{i}.dcm"] = make_instance()[: 140 + i]
    files.update(corpus())
    return files


def twice(uploads: list[Uploaded], seed: int) -> list[Uploaded]:
    """Every upload's event twice: half of the repeats right behind the first (concurrent
    in the pool), half at the end, in shuffled order."""
    rng = random.Random(seed)
    order = list(uploads)
    rng.shuffle(order)
    deliveries = [u for u in order for _ in range(2)]
    deliveries = deliveries[::2] + deliveries[1::2][: len(order) // 2]
    deliveries[len(order) :] = rng.sample(deliveries[len(order) :], len(deliveries) - len(order))
    return deliveries + order[len(order) // 2 :]


def deliver_round(p: Pipeline, files: dict[str, bytes], seed: int) -> Round:
    """Upload ``files``, deliver every event twice, moving the clock on every 1,500
    deliveries (so that several windows are used), and drain."""
    uploads = p.upload_many(files)
    deliveries = twice(uploads, seed)

    def deliver(index_obj: tuple[int, Uploaded]) -> int:
        index, obj = index_obj
        if index % 1500 == 1499:
            p.clock.advance(30)
        return p.deliver(obj)

    p.calls.reset()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(deliver, enumerate(deliveries)))
    done = Round(files, uploads, deliveries, statuses, p.calls.counts(p.calls.taken()))
    done.ticks = p.drain()
    return done


def run_burst(factory: PipelineFactory) -> Burst:
    """Both rounds on a new pipeline (see the module docstring)."""
    started = time.monotonic()
    p = factory(
        Pipeline,
        clock=Clock(),
        counted=True,
        settings={
            "DICOMFLOW_SEAL_GRACE_SECONDS": "5",
            "DICOMFLOW_BATCH_MAX_FILES": BATCH_MAX_FILES,
        },
    )
    start_import = store.start_import

    def recording(c: runtime.Context, uri: str, *args: Any) -> dict[str, Any]:
        p.imports.append(uri)
        return start_import(c, uri, *args)

    seconds: dict[str, float] = {}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # thousands of INFO lines are noise here
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(store, "start_import", recording)
            healthy = deliver_round(p, healthy_files(), seed=4)
            healthy.alerts = p.pull()
            healthy.totals = dict(outcomes.totals(p.outcomes().values()))
            healthy.stored = len(p.stored_sops())
            seconds["healthy"] = time.monotonic() - started
            broken = deliver_round(p, broken_and_corpus_files(), seed=5)
            seconds["total"] = time.monotonic() - started
    finally:
        root.setLevel(level)
    return Burst(p, healthy, broken, seconds)
