"""The download service API: fetch an experiment's images from XNAT as a ZIP and unzip it safely.

The names and behaviour here are fixed: research platforms call them. ``XNAT_URL`` and
``BASE_IMAGES_DOWNLOAD_DIR`` come from the environment variables of the same names.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

from xnatfs.client import XnatClient, quote_part
from xnatfs.exceptions import NotFoundError, ServerError, UnsafeArchiveError
from xnatfs.extract import ExtractLimits, extract_stream, extract_zip
from xnatfs.options import TIMEOUT
from xnatfs.progress import byte_bar
from xnatfs.transports.xnat import resource_names

XNAT_URL: str = os.environ.get("XNAT_URL", "").rstrip("/")
BASE_IMAGES_DOWNLOAD_DIR: str = os.environ.get("BASE_IMAGES_DOWNLOAD_DIR", "")

ASSESSOR_TYPES = ("scan", "assessor")
DEFAULT_TIMEOUT = TIMEOUT


def format_download_url(
    project_id: str,
    subject_id: str,
    experiment_id_or_label: str,
    assessor_type: str = "scan",
    resource_type: str = "NIFTI",
) -> str:
    """Return the URL of a ZIP of one experiment's scan (or assessor) resources of one type.

    ``resource_type`` may be ``ALL`` (every resource: ``{kind}s/ALL/files``, since XNAT takes
    ``ALL`` in the resource segment as a label) or a resource label, which XNAT matches as sent: a
    label that needs percent-encoding (a space) matches nothing there, and
    :func:`download_and_unzip_images` addresses resources by ID instead. ZIPs are asked for
    uncompressed (``compression=0``, whatever the site's setting). Raises ValueError for an
    ``assessor_type`` other than scan or assessor (in any case).
    """
    kind = _assessor_type(assessor_type)
    selector = None if resource_type == "ALL" else quote(str(resource_type), safe="")
    return _zip_url(XNAT_URL, project_id, subject_id, experiment_id_or_label, kind, selector)


def _zip_url(base: str, project: str, subject: str, experiment: str, kind: str, selector: str | None) -> str:
    """Return the URL of the ZIP of an experiment's ``kind`` resources that ``selector`` (a URL
    segment, used as given) selects, or of all of them when it is None."""
    parts = [quote(str(p), safe="") for p in (project, subject, experiment)]
    resources = "" if selector is None else f"/resources/{selector}"
    return (
        f"{base}/data/projects/{parts[0]}/subjects/{parts[1]}/experiments/{parts[2]}"
        f"/{kind}s/ALL{resources}/files?format=zip&compression=0"
    )


def download_file(url: str, destination_path: str, headers: dict[str, str] | None) -> str:
    """Stream ``url`` to ``destination_path`` (never whole in memory) and return the path.

    ``headers`` are the XNAT authentication headers to send. Raises NotFoundError (404),
    AccessDeniedError (403), AuthenticationError (401), ServerError, ConnectionFailedError; a
    failed download leaves no file at ``destination_path``.
    """
    return _download(url, destination_path, headers, DEFAULT_TIMEOUT)


def unzip_file(zip_path: str, extract_dir: str, new_name: str) -> str:
    """Extract ``zip_path`` into ``extract_dir``, rename its top folder to ``new_name``; return its path.

    Every entry is checked before anything is written. Raises FileNotFoundError (no zip),
    ValueError (an entry that would escape, or a ``new_name`` that escapes ``extract_dir``: then
    nothing is extracted and the zip is kept). On success the zip is deleted; a folder already
    at the target is replaced.
    """
    if not os.path.isfile(zip_path):
        raise FileNotFoundError(f"{zip_path}: no such ZIP file")
    target = _inside(extract_dir, new_name)
    os.makedirs(extract_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".xnatfs-unzip-", dir=extract_dir)
    try:
        content = os.path.join(staging, "content")
        extract_zip(zip_path, content, ExtractLimits())
        _move_into_place(content, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    os.remove(zip_path)
    return target


async def download_and_unzip_images(
    central_hub_project_id: str,
    accession_id: str,
    net_id: str,
    assessor_type: str,
    resource_type: str,
    headers: dict[str, str] | None,
) -> str:
    """Download and unzip one experiment's images; return the folder they are in.

    Finds the project whose ``secondary_ID`` is ``central_hub_project_id`` and its experiment
    labelled ``accession_id``; downloads its scan (or assessor) resources of ``resource_type``
    (a label, or ``ALL``) as ZIPs and extracts them while they arrive into
    ``BASE_IMAGES_DOWNLOAD_DIR/{net_id}/{accession_id}`` (published whole, by rename; no ZIP is
    left behind). Resources are addressed by their IDs (see :func:`format_download_url` for why).
    The network and disk work runs in a thread: the event loop is never blocked.

    Raises NotFoundError (no such project or experiment, or no data at the URL), ValueError (an
    argument that would escape ``BASE_IMAGES_DOWNLOAD_DIR``, or a bad ``assessor_type``).
    """
    _assessor_type(assessor_type)
    if not BASE_IMAGES_DOWNLOAD_DIR:
        raise ValueError("BASE_IMAGES_DOWNLOAD_DIR is not set")
    user_dir = _inside(BASE_IMAGES_DOWNLOAD_DIR, net_id)
    target = _inside(user_dir, accession_id)
    import asyncio  # here, not at the top: `xnatfs download` never needs it (saves ~25 ms of start-up)

    return await asyncio.to_thread(
        _download_and_unzip,
        central_hub_project_id,
        accession_id,
        user_dir,
        target,
        assessor_type,
        resource_type,
        headers,
    )


def _download_and_unzip(
    hub_project: str,
    accession_id: str,
    user_dir: str,
    target: str,
    assessor_type: str,
    resource_type: str,
    headers: dict[str, str] | None,
) -> str:
    session = XnatClient(XNAT_URL, headers=headers, timeout=DEFAULT_TIMEOUT)
    try:
        projects = session.get_rows("/data/projects", "ID,secondary_ID")
        project = next((p["ID"] for p in projects if p.get("secondary_ID") == hub_project), None)
        if project is None:
            raise NotFoundError(f"no project with secondary ID {hub_project!r}")
        experiment = _find_experiment(session, project, accession_id)
        kind = _assessor_type(assessor_type)
        return _fetch_into(session, experiment["ID"], kind, resource_type, user_dir, target, None)
    finally:
        session.close()


def download_experiment(
    source: str,
    project: str,
    experiment: str,
    resource: str = "DICOM",
    dest: str = ".",
    user: str | None = None,
    password: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = False,
) -> str:
    """Download one experiment's scan resources labelled ``resource`` (or ``ALL``) into ``dest``.

    Extracts while downloading, into ``dest/{experiment label}`` (XNAT's layout below it), and
    returns that folder. Raises NotFoundError, AuthenticationError, ConnectionFailedError, ...
    """
    session = XnatClient(source, user, password, timeout=timeout)
    try:
        found = _find_experiment(session, project, experiment)
        label = found.get("label") or experiment
        bar = lambda total: byte_bar(label, total, enabled=progress)  # noqa: E731
        return _fetch_into(session, found["ID"], "scan", resource, dest, _inside(dest, label), bar)
    finally:
        session.close()


# -- helpers --------------------------------------------------------------------------------


def _fetch_into(
    session: XnatClient,
    experiment_id: str,
    kind: str,
    label: str,
    parent: str,
    target: str,
    progress: Callable[[int | None], Any] | None,
) -> str:
    """Fetch the resources (see :func:`_fetch_resources`) into a staging folder in ``parent``, then move
    them to ``target`` (a folder in ``parent``) as a whole; return ``target``."""
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".xnatfs-download-", dir=parent)
    try:
        content = os.path.join(staging, "content")
        _fetch_resources(session, experiment_id, kind, label, content, progress)
        _move_into_place(content, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _download(url: str, destination: str, headers: dict[str, str] | None, timeout: float) -> str:
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    session = XnatClient(base, headers=headers, timeout=timeout)
    folder = os.path.dirname(os.path.abspath(destination))
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".xnatfs-partial-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, session.stream(path) as chunks:
            received = 0
            for chunk in chunks:
                out.write(chunk)
                received += len(chunk)
        if received == 0:
            raise NotFoundError(f"{parts.path}: no data at this URL")
        os.replace(partial, destination)
        return destination
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
    finally:
        session.close()


def _find_experiment(session: XnatClient, project: str, experiment: str) -> dict[str, str]:
    """Return ``{"ID", "label", "subject_ID"}`` of the experiment labelled (or with ID) ``experiment``."""
    rows = session.get_rows(f"/data/projects/{quote_part(project)}/experiments", "ID,label,subject_ID")
    row = next((r for r in rows if r.get("label") == experiment), None) or next(
        (r for r in rows if r.get("ID") == experiment), None
    )
    if row is None:
        raise NotFoundError(f"no experiment {experiment!r} in project {project!r}")
    if not row.get("subject_ID"):
        detail = session.get_json(f"/data/experiments/{quote_part(row['ID'])}")
        fields = detail["items"][0]["data_fields"]
        row = {**row, "subject_ID": fields.get("subject_ID", "")}
    return row


def _fetch_resources(
    session: XnatClient,
    experiment_id: str,
    kind: str,
    label: str,
    content: str,
    progress: Callable[[int | None], Any] | None,
) -> None:
    """Download an experiment's ``kind`` resources labelled ``label`` (or ``ALL``) into the new folder
    ``content``, in XNAT's ZIP layout, extracting while downloading.

    Resources are addressed by ``xnat_abstractresource_id`` (XNAT matches a label in a URL as sent,
    without percent-decoding), ``ALL`` by ``{kind}s/ALL/files``. Two resources of one scan with one
    label would give one ZIP two equal entries, which XNAT breaks off: each of those comes in a ZIP
    of its own and gets the folder name the mount shows (``{label}~{ID}`` for all but the lowest
    ID). Raises NotFoundError when no resource has that label.
    """
    base = f"/data/experiments/{quote_part(experiment_id)}/{kind}s/ALL"
    try:
        rows = session.get_rows(f"{base}/resources")
    except NotFoundError:
        rows = []
    chosen = [r for r in rows if label == "ALL" or str(r.get("label") or "") == label]
    if label != "ALL" and not chosen:
        raise NotFoundError(f"no {kind} resource labelled {label!r} in experiment {experiment_id}")
    by_owner: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in chosen:
        by_owner.setdefault((str(row.get("cat_id") or ""), str(row.get("label") or "")), []).append(row)
    alone = [r for group in by_owner.values() if len(group) == 1 for r in group]
    renamed = [
        (row, name) for group in by_owner.values() if len(group) > 1 for row, name in zip(group, resource_names(group))
    ]
    if label == "ALL" and not renamed:
        zips = [(f"{base}/files", None)]
    else:
        zips = [(f"{base}/resources/{','.join(_ids(alone))}/files", None)] if alone else []
        zips += [(f"{base}/resources/{_ids([row])[0]}/files", name) for row, name in renamed]
    bar = progress(sum(_number(r.get("file_size")) for r in chosen) or None) if progress else None
    os.makedirs(content)
    for index, (path, name) in enumerate(zips):
        part = os.path.join(os.path.dirname(content), f"part-{index}")
        with session.stream(path, format="zip", compression="0") as chunks:
            extract_stream(_counted(chunks, bar) if bar is not None else chunks, part, ExtractLimits())
        if name is not None:
            _rename_resource(part, name)
        _merge(part, content)
    if bar is not None:
        bar.close()


def _ids(rows: list[dict[str, str]]) -> list[str]:
    ids = [str(r.get("xnat_abstractresource_id") or "") for r in rows]
    if not all(i.isdigit() for i in ids):
        raise ServerError("the server listed a resource without a numeric xnat_abstractresource_id")
    return ids


def _rename_resource(part: str, name: str) -> None:
    """Rename the one resource folder (``*/scans/*/resources/X``) of an extracted ZIP to ``name``."""
    found = glob.glob(os.path.join(glob.escape(part), "*", "*", "*", "resources", "*"))
    if len(found) != 1:
        raise ServerError(f"a resource's ZIP held {len(found)} resource folders, not one")
    os.rename(found[0], os.path.join(os.path.dirname(found[0]), name))


def _merge(source: str, target: str, relative: str = "") -> None:
    """Move everything below ``source`` to the same place below ``target``, never replacing a file.

    A folder ``target`` lacks moves in one rename (the first ZIP's whole tree); only folders both
    have are walked. Raises UnsafeArchiveError when both have a file of one name.
    """
    for name in os.listdir(source):
        here, there = os.path.join(source, name), os.path.join(target, name)
        if not os.path.lexists(there):
            os.rename(here, there)
        elif os.path.isdir(there) and not os.path.islink(there) and os.path.isdir(here) and not os.path.islink(here):
            _merge(here, there, os.path.join(relative, name))
        else:
            raise UnsafeArchiveError(f"two ZIPs hold {os.path.join(relative, name)!r}")
    os.rmdir(source)


def _number(text: object) -> int:
    try:
        return int(str(text))
    except ValueError:
        return 0


def _counted(chunks: Iterable[bytes], bar: Any) -> Iterator[bytes]:
    for chunk in chunks:
        bar.update(len(chunk))
        yield chunk


def _assessor_type(value: str) -> str:
    kind = str(value).lower()
    if kind not in ASSESSOR_TYPES:
        raise ValueError(f"assessor_type must be 'scan' or 'assessor', not {value!r}")
    return kind


def _inside(base: str, name: str) -> str:
    """Return ``base/name``; raise ValueError if ``name`` is not one plain component inside ``base``."""
    name = str(name)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a plain folder name: it would escape {base!r}")
    base_real = os.path.realpath(base)
    target = os.path.realpath(os.path.join(base_real, name))
    if os.path.dirname(target) != base_real:
        raise ValueError(f"{name!r} would escape {base!r}")
    return target


def _move_into_place(content: str, target: str) -> None:
    """Move extracted ``content`` to ``target``: its single top folder, else the whole of it."""
    entries = os.listdir(content)
    source = content
    if len(entries) == 1 and os.path.isdir(os.path.join(content, entries[0])):
        source = os.path.join(content, entries[0])
    if os.path.lexists(target):
        old = f"{target}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(source, target)


__all__ = [
    "BASE_IMAGES_DOWNLOAD_DIR",
    "XNAT_URL",
    "NotFoundError",
    "UnsafeArchiveError",
    "download_and_unzip_images",
    "download_file",
    "format_download_url",
    "unzip_file",
]
