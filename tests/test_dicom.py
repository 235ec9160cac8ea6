"""DicomTransport against real PACS servers (Orthanc and dcmtk's dcmqrscp) started on loopback.

Each PACS gets one study with two series of the same number and description (names must be made
safe and unique) and a second study without an accession number, stored with ``store(ds)``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pacs import Pacs, available, dcmqrscp, free_port, make_series, orthanc
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from xnatfs.cache import Cache
from xnatfs.transports import AssociationFailed, AssociationNotEstablished
from xnatfs.transports.dicom import DicomTransport, parse_netloc

pytestmark = pytest.mark.timeout(120)

SERVERS = {"orthanc": orthanc, "dcmqrscp": dcmqrscp}
# dcmqrscp's index does not hold SeriesDescription, so C-FIND cannot return it there.
# The second series of the same label gets "~{digest of the original}" appended.
SERIES_FOLDER = {"orthanc": "7-T1_MPRAGE sag", "dcmqrscp": "7"}


def dicom_transport(pacs: Pacs, cache_dir: Path | str, **opts: object) -> DicomTransport:
    """Return a transport to ``pacs`` with its own cache folder and a 10 s timeout."""
    options: dict[str, object] = {"cache_dir": str(cache_dir), "timeout": 10, **opts}
    return DicomTransport(netloc=f"{pacs.aet}@{pacs.host}:{pacs.port}", root="/", opts=options)


@pytest.fixture(scope="module", params=sorted(SERVERS))
def stored(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pacs, list[Dataset]]]:
    """Run one PACS, store the test data in it with ``store(ds)``; yield it and the datasets stored."""
    if not available(request.param):
        pytest.fail(f"{request.param} is not installed: scripts/setup installs it")
    study_uid = generate_uid()
    datasets = make_series(count=4, study_uid=study_uid)
    datasets += make_series(count=2, study_uid=study_uid)  # same number and description
    datasets += make_series(count=1, study_date="20230615", accession="", series_number=3, series_description="Loc")
    with SERVERS[request.param](workdir=str(tmp_path_factory.mktemp(request.param))) as pacs:
        transport = dicom_transport(pacs, tmp_path_factory.mktemp("cache"))
        for ds in datasets:
            assert transport.store(ds) == 0x0000
        yield pacs, datasets


@pytest.fixture
def get_requests(monkeypatch: pytest.MonkeyPatch) -> list[Dataset]:
    """Record every C-GET request sent by pynetdicom in this test (the identifiers)."""
    sent: list[Dataset] = []
    lock = threading.Lock()
    original = Association.send_c_get

    def counting(
        self: Association, dataset: Dataset, *args: object, **kwargs: object
    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        with lock:
            sent.append(dataset)
        return original(self, dataset, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_get", counting)
    return sent


def by_series(datasets: list[Dataset]) -> dict[str, list[Dataset]]:
    series: dict[str, list[Dataset]] = {}
    for ds in datasets:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return series


def test_tree_shape_and_content(
    stored: tuple[Pacs, list[Dataset]], tmp_path: Path, get_requests: list[Dataset]
) -> None:
    pacs, datasets = stored
    transport = dicom_transport(pacs, tmp_path)
    walked = list(transport.walk("/"))
    print(f"\nmounted tree of {pacs.kind} (find):")
    for root, _dirs, files in walked:
        print(root)
        for name in files:
            print(f"{root}/{name}")
    assert get_requests == [] and transport.retrieve_count == 0, "a listing must not retrieve pixel data"

    tree = {root: (dirs, files) for root, dirs, files in walked}
    assert tree["/"][0] == ["PAT-001"]
    first_study = datasets[0].StudyInstanceUID
    second_study = datasets[-1].StudyInstanceUID
    assert sorted(tree["/PAT-001"][0]) == sorted([f"20230615-{second_study}", "20240131-ACC123"])
    series_names = tree["/PAT-001/20240131-ACC123"][0]
    assert len(series_names) == 2 and series_names[0] == SERIES_FOLDER[pacs.kind]
    assert re.fullmatch(re.escape(SERIES_FOLDER[pacs.kind]) + "~[0-9a-f]{8}", series_names[1])
    third = "3-Loc" if pacs.kind == "orthanc" else "3"
    assert tree[f"/PAT-001/20230615-{second_study}"][0] == [third]

    files = {f"{root}/{name}": root for root, _dirs, names in walked for name in names}
    assert len(files) == len(datasets)
    assert all(path.count("/") == 4 for path in files)
    expected = {str(ds.SOPInstanceUID): ds for ds in datasets}
    assert {path.rsplit("/", 1)[1] for path in files} == {f"{uid}.dcm" for uid in expected}

    for path in sorted(files):
        with transport.open(path) as f:
            ds = pydicom.dcmread(f)
        original = expected[str(ds.SOPInstanceUID)]
        assert path.endswith(f"/{original.SOPInstanceUID}.dcm")
        assert ds.SeriesInstanceUID == original.SeriesInstanceUID
        assert ds.StudyInstanceUID == first_study or ds.StudyInstanceUID == second_study
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
        assert transport.stat(path).size == os.path.getsize(transport.fetch(path))
    # One C-GET per series, whatever the number of instances read.
    assert len(get_requests) == transport.retrieve_count == len(by_series(datasets))
    assert {str(r.SeriesInstanceUID) for r in get_requests} == set(by_series(datasets))


def test_size_unknown_until_retrieved(stored: tuple[Pacs, list[Dataset]], tmp_path: Path) -> None:
    pacs, datasets = stored
    transport = dicom_transport(pacs, tmp_path)
    series_dir = "/PAT-001/20240131-ACC123/" + SERIES_FOLDER[pacs.kind]
    entries = transport.listdir(series_dir)
    assert entries and all(e.size is None for e in entries)
    assert "size unknown" in transport.info(f"{series_dir}/{entries[0].name}")
    transport.fetch(f"{series_dir}/{entries[0].name}")
    deadline = time.monotonic() + 10  # the rest of the series may still be arriving
    while any(e.size is None for e in transport.listdir(series_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    sizes = [e.size for e in transport.listdir(series_dir)]
    assert all(size and size > 32 * 32 * 2 for size in sizes)
    assert transport.retrieve_count == 1


def test_concurrent_readers_make_one_retrieve(
    stored: tuple[Pacs, list[Dataset]], tmp_path: Path, get_requests: list[Dataset]
) -> None:
    pacs, _datasets = stored
    cache = Cache(str(tmp_path))
    transport = dicom_transport(pacs, tmp_path, cache=cache)
    series_dir = "/PAT-001/20240131-ACC123/" + SERIES_FOLDER[pacs.kind]
    names = sorted(e.name for e in transport.listdir(series_dir))[:2]
    barrier = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def read(name: str) -> None:
        try:
            barrier.wait(timeout=10)
            with transport.open(f"{series_dir}/{name}") as f:
                results.append(str(pydicom.dcmread(f).SOPInstanceUID))
        except BaseException as error:  # reported by the main thread below
            errors.append(error)

    threads = [threading.Thread(target=read, args=(names[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(results) == sorted(n.removesuffix(".dcm") for n in [names[0], names[1]] * 4)
    assert len(get_requests) == 1 and transport.retrieve_count == 1

    # Another transport (another mount) on the same cache folder retrieves nothing again.
    other = dicom_transport(pacs, tmp_path, cache=Cache(str(tmp_path)))
    with other.open(f"{series_dir}/{names[1]}") as f:
        assert f.read(132)[128:] == b"DICM"
    assert len(get_requests) == 1 and other.retrieve_count == 0


def test_store_of_invalid_dataset_fails(stored: tuple[Pacs, list[Dataset]], tmp_path: Path) -> None:
    pacs, datasets = stored
    transport = dicom_transport(pacs, tmp_path)
    # An SOP class no PACS knows: refused in negotiation.
    unknown = _copy(datasets[0])
    unknown.SOPClassUID = unknown.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.9.7433.99.1"
    with pytest.raises(AssociationFailed, match="refused"):
        transport.store(unknown)
    # A dataset the PACS accepts in negotiation but rejects with a failure status.
    bad = _copy(datasets[0])
    if pacs.kind == "orthanc":
        del bad.StudyInstanceUID  # Orthanc cannot index an instance without it
    else:
        bad.SOPClassUID = "1.2.840.10008.1.1"  # Verification: not a storage SOP class for dcmqrscp
    with pytest.raises(AssociationFailed, match=r"failed with status 0x[0-9A-F]{4}"):
        transport.store(bad)
    with pytest.raises(ValueError):
        transport.store(Dataset())


def test_pacs_down(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    transport = DicomTransport(netloc=f"NOBODY@127.0.0.1:{port}", opts={"cache_dir": str(tmp_path), "timeout": 2})
    with pytest.raises(AssociationNotEstablished):
        transport.listdir("/")
    with pytest.raises(AssociationNotEstablished):
        transport.store(make_series(count=1)[0])
    with pytest.raises(ConnectionError):  # AssociationNotEstablished is one
        transport.listdir("/")


def test_parse_netloc() -> None:
    assert parse_netloc("PACS@host:4242") == ("PACS", "host", 4242)
    assert parse_netloc("MY%20AE@10.0.0.1") == ("MY AE", "10.0.0.1", 104)
    assert parse_netloc("AE@[::1]:11112") == ("AE", "::1", 11112)
    for bad in ("host:104", "@host:104", "AE@", "AE@host:x", "A" * 17 + "@host"):
        with pytest.raises(ValueError):
            parse_netloc(bad)
    assert DicomTransport.schemes == ["dicom"]


def test_retrieve_time_vs_getscu(stored: tuple[Pacs, list[Dataset]], tmp_path: Path) -> None:
    """Print how long one series takes through the transport and with dcmtk's getscu."""
    pacs, datasets = stored
    if shutil.which("getscu") is None:
        pytest.fail("getscu is not installed: scripts/setup installs dcmtk")
    series = datasets[:4]
    transport = dicom_transport(pacs, tmp_path / "cache")
    series_dir = "/PAT-001/20240131-ACC123/" + SERIES_FOLDER[pacs.kind]
    paths = [f"{series_dir}/{e.name}" for e in transport.listdir(series_dir)]
    start = time.perf_counter()
    for path in paths:
        transport.fetch(path)
    ours = time.perf_counter() - start
    out = tmp_path / "getscu"
    out.mkdir()
    start = time.perf_counter()
    subprocess.run(getscu_command(pacs, series[0], out), check=True, capture_output=True, timeout=60)
    theirs = time.perf_counter() - start
    assert len(os.listdir(out)) == len(series)
    print(f"\n{pacs.kind}: series of {len(series)} instances: transport {ours:.3f} s, getscu {theirs:.3f} s")


def getscu_command(pacs: Pacs, ds: Dataset, out: Path | str) -> list[str]:
    """Return the getscu command line that retrieves the series of ``ds`` from ``pacs`` into ``out``."""
    return [
        "getscu",
        "-S",
        "-aet",
        "XNATFS",
        "-aec",
        pacs.aet,
        "-ta",
        "10",
        "-td",
        "10",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={ds.StudyInstanceUID}",
        "-k",
        f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        pacs.host,
        str(pacs.port),
    ]


def _copy(ds: Dataset) -> Dataset:
    """Return a deep copy of ``ds`` with a new SOPInstanceUID."""
    copy = deepcopy(ds)
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return copy


def test_pacs_that_never_answers(tmp_path: Path) -> None:
    """A peer that accepts the TCP connection but never answers: bounded by the timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        transport = DicomTransport(netloc=f"MUTE@127.0.0.1:{port}", opts={"cache_dir": str(tmp_path), "timeout": 2})
        with pytest.raises(AssociationNotEstablished):
            transport.listdir("/")


@pytest.fixture
def failing_scp() -> Iterator[tuple[int, dict[str, int]]]:
    """Run a pynetdicom query/retrieve SCP whose answers are set per test: yield its port and settings.

    ``settings["find"]`` is the final C-FIND status at the IMAGE level, ``settings["get"]`` the
    C-GET status; the other levels answer one patient, study and series.
    """
    settings = {"find": 0x0000, "get": 0x0000}

    def on_find(event: Event) -> Iterator[tuple[int, Dataset | None]]:
        level = event.identifier.QueryRetrieveLevel
        if level == "IMAGE" and settings["find"]:
            yield settings["find"], None
            return
        answer = Dataset()
        answer.QueryRetrieveLevel = level
        answer.PatientID = "P"
        answer.StudyInstanceUID = "1.2.3"
        answer.StudyDate = "20240101"
        answer.SeriesInstanceUID = "1.2.3.4"
        answer.SeriesNumber = 1
        answer.SOPInstanceUID = "1.2.3.4.5"
        answer.SOPClassUID = MRImageStorage
        yield 0xFF00, answer

    def on_get(event: Event) -> Iterator[int | tuple[int, Dataset | None]]:
        yield 1
        yield settings["get"], None

    ae = AE(ae_title="FAKE")
    for model in (
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    ):
        ae.add_supported_context(model)
    ae.add_supported_context(MRImageStorage, scu_role=True, scp_role=True)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)]
    )
    try:
        yield port, settings
    finally:
        server.shutdown()


def test_failure_statuses_raise(failing_scp: tuple[int, dict[str, int]], tmp_path: Path) -> None:
    port, settings = failing_scp
    transport = DicomTransport(netloc=f"FAKE@127.0.0.1:{port}", opts={"cache_dir": str(tmp_path), "timeout": 5})
    series = "/P/20240101-1.2.3/1"
    assert [root for root, _d, _f in transport.walk("/")][-1] == series
    settings["get"] = 0xA702
    with pytest.raises(AssociationFailed, match="0xA702"):
        transport.open(f"{series}/1.2.3.4.5.dcm")
    # Every instance of that series now fails at once (listing a series looks up each of them).
    start = time.monotonic()
    with pytest.raises(AssociationFailed, match="0xA702.*not retried"):
        transport.open(f"{series}/1.2.3.4.5.dcm")
    assert transport.retrieve_count == 1 and time.monotonic() - start < 1
    settings["find"] = 0xC123
    with pytest.raises(AssociationFailed, match="0xC123"):
        DicomTransport(netloc=f"FAKE@127.0.0.1:{port}", opts={"cache_dir": str(tmp_path)}).listdir(series)


def test_mounted_pacs_serves_every_instance(stored: tuple[Pacs, list[Dataset]], tmp_path: Path) -> None:
    """`xnatfs mount dicom://...`: walk the mounted tree, read every instance, compare with what was stored."""
    from mounting import mounted

    pacs, datasets = stored
    mnt = str(tmp_path / "mnt")
    with mounted(pacs.url, mnt, str(tmp_path / "cache"), dict(os.environ), timeout=10):
        found = {}
        for folder, _dirs, names in os.walk(mnt):
            for name in names:
                ds = pydicom.dcmread(os.path.join(folder, name))
                found[ds.SOPInstanceUID] = ds
                assert name == f"{ds.SOPInstanceUID}.dcm"
    # Once retrieved, sizes are known: a new mount on the same cache shows them, without a retrieve.
    with mounted(pacs.url, mnt, str(tmp_path / "cache"), dict(os.environ), timeout=10):
        for folder, _dirs, names in os.walk(mnt):
            for name in names:
                path = os.path.join(folder, name)
                assert os.stat(path).st_size == len(open(path, "rb").read()) > 0
    assert sorted(found) == sorted(ds.SOPInstanceUID for ds in datasets)
    for original in datasets:
        assert np.array_equal(found[original.SOPInstanceUID].pixel_array, original.pixel_array)


def test_mounted_instances_read_whole_by_every_tool(stored: tuple[Pacs, list[Dataset]], tmp_path: Path) -> None:
    """Through the mount, every instance is the complete Part-10 file for cat, head, cp, pydicom, mmap and
    dcm2niix, on the first and every later open, and ``ls -l`` shows the size a read returns."""
    import mmap

    from mounting import mounted

    pacs, datasets = stored
    expected = {f"{ds.SOPInstanceUID}.dcm": ds for ds in datasets}
    mnt = str(tmp_path / "mnt")
    with mounted(pacs.url, mnt, str(tmp_path / "cache"), dict(os.environ), timeout=10):
        series = os.path.join(mnt, "PAT-001", "20240131-ACC123", SERIES_FOLDER[pacs.kind])
        names = sorted(os.listdir(series))
        first, second = (os.path.join(series, name) for name in names[:2])
        # What broke: cat of one instance, then pydicom and head -c of the same and of another one.
        whole = subprocess.run(["cat", first], capture_output=True, check=True, timeout=30).stdout
        assert whole[128:132] == b"DICM" and len(whole) > 32 * 32 * 2
        assert pydicom.dcmread(first).SOPInstanceUID == names[0].removesuffix(".dcm")
        head = subprocess.run(["head", "-c", "200", second], capture_output=True, check=True, timeout=30).stdout
        assert len(head) == 200 and head[128:132] == b"DICM"
        # ls -l shows, for every instance, the size of the bytes a read returns.
        listed = subprocess.run(["ls", "-l", series], capture_output=True, text=True, check=True, timeout=30).stdout
        sizes = {line.split()[-1]: int(line.split()[4]) for line in listed.splitlines()[1:]}
        assert sorted(sizes) == names
        for name in names:
            path = os.path.join(series, name)
            for _ in range(2):  # first and later opens
                with open(path, "rb") as f:
                    content = f.read()
                assert len(content) == sizes[name] == os.stat(path).st_size
            ds = pydicom.dcmread(path)
            np.testing.assert_array_equal(ds.pixel_array, expected[name].pixel_array)
            assert np.memmap(path, dtype=np.uint8, mode="r").tobytes() == content
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                assert mapped[:] == content
        copy = tmp_path / "copy.dcm"
        subprocess.run(["cp", first, str(copy)], check=True, timeout=30)
        assert copy.read_bytes() == whole
        out = tmp_path / "nifti"
        out.mkdir()
        result = subprocess.run(["dcm2niix", "-o", str(out), series], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert [p.suffix for p in out.iterdir()].count(".nii") == 1, result.stdout
