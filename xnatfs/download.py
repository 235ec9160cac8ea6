"""The download service API: fetch an experiment's images from XNAT as a ZIP and unzip it safely.

The names and behaviour here are fixed: research platforms call them. ``XNAT_URL`` and
``BASE_IMAGES_DOWNLOAD_DIR`` come from the environment variables of the same names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from urllib.parse import quote, urlsplit

from xnatfs.exceptions import NotFoundError, UnsafeArchiveError
from xnatfs.extract import ExtractLimits, extract_stream, extract_zip
from xnatfs.progress import Progress
from xnatfs.session import XnatSession, quote_part

XNAT_URL: str = os.environ.get("XNAT_URL", "").rstrip("/")
BASE_IMAGES_DOWNLOAD_DIR: str = os.environ.get("BASE_IMAGES_DOWNLOAD_DIR", "")

ASSESSOR_TYPES = ("scan", "assessor")
DEFAULT_TIMEOUT = 30.0


def format_download_url(
    project_id: str,
    subject_id: str,
    experiment_id_or_label: str,
    assessor_type: str = "scan",
    resource_type: str = "NIFTI",
) -> str:
    """Return the URL of a ZIP of one experiment's scan (or assessor) resources of one type.

    ``resource_type`` may be ``ALL`` or any resource label. Raises ValueError for an
    ``assessor_type`` other than scan or assessor (in any case).
    """
    kind = _assessor_type(assessor_type)
    parts = [quote(str(p), safe="") for p in (project_id, subject_id, experiment_id_or_label, resource_type)]
    return (
        f"{XNAT_URL}/data/projects/{parts[0]}/subjects/{parts[1]}/experiments/{parts[2]}"
        f"/{kind}s/ALL/resources/{parts[3]}/files?format=zip"
    )


def download_file(url: str, destination_path: str, headers: dict[str, str] | None) -> str:
    """Stream ``url`` to ``destination_path`` (never whole in memory) and return the path.

    ``headers`` are the XNAT authentication headers to send. Raises NotFoundError (404),
    AccessDeniedError (403), AuthenticationError (401), ServerError, ConnectionFailedError; a
    failed download leaves no file at ``destination_path``.
    """
    return _download(url, destination_path, headers, DEFAULT_TIMEOUT, None)


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
        _publish(content, target)
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
    labelled ``accession_id``; downloads its scan (or assessor) resources of ``resource_type`` as
    one ZIP into ``BASE_IMAGES_DOWNLOAD_DIR/{net_id}/``, unzips it into
    ``BASE_IMAGES_DOWNLOAD_DIR/{net_id}/{accession_id}`` and deletes the ZIP. The network and disk
    work runs in a thread: the event loop is never blocked.

    Raises NotFoundError (no such project or experiment, or no data at the URL), ValueError (an
    argument that would escape ``BASE_IMAGES_DOWNLOAD_DIR``, or a bad ``assessor_type``).
    """
    _assessor_type(assessor_type)
    if not BASE_IMAGES_DOWNLOAD_DIR:
        raise ValueError("BASE_IMAGES_DOWNLOAD_DIR is not set")
    user_dir = _inside(BASE_IMAGES_DOWNLOAD_DIR, net_id)
    target = _inside(user_dir, accession_id)
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
    session = XnatSession(XNAT_URL, headers=headers, timeout=DEFAULT_TIMEOUT)
    try:
        projects = session.get_rows("/data/projects", "ID,secondary_ID")
        project = next((p["ID"] for p in projects if p.get("secondary_ID") == hub_project), None)
        if project is None:
            raise NotFoundError(f"no project with secondary ID {hub_project!r}")
        experiment = _find_experiment(session, project, accession_id)
    finally:
        session.close()
    url = format_download_url(project, experiment["subject_ID"], experiment["ID"], assessor_type, resource_type)
    os.makedirs(user_dir, exist_ok=True)
    zip_path = target + ".zip"
    _download(url, zip_path, headers, DEFAULT_TIMEOUT, None)
    return unzip_file(zip_path, user_dir, os.path.basename(target))


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
    session = XnatSession(source, user, password, timeout=timeout)
    try:
        found = _find_experiment(session, project, experiment)
        label = found.get("label") or experiment
        target = _inside(dest, label)
        path = f"/data/experiments/{quote_part(found['ID'])}/scans/ALL/resources/{quote_part(resource)}/files"
        total = _total_size(session, found["ID"], resource) if progress else None  # only the bar needs it
        bar = Progress(label, total, enabled=progress)
        os.makedirs(dest, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".xnatfs-download-", dir=dest)
        try:
            content = os.path.join(staging, "content")
            with session.stream(path, format="zip") as chunks:
                extract_stream(_counted(chunks, bar), content, ExtractLimits())
            bar.close()
            _publish(content, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target
    finally:
        session.close()


# -- helpers --------------------------------------------------------------------------------


def _download(url: str, destination: str, headers: dict[str, str] | None, timeout: float, bar: Progress | None) -> str:
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    session = XnatSession(base, headers=headers, timeout=timeout)
    folder = os.path.dirname(os.path.abspath(destination))
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".xnatfs-partial-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, session.stream(path) as chunks:
            received = 0
            for chunk in chunks:
                out.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
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


def _find_experiment(session: XnatSession, project: str, experiment: str) -> dict[str, str]:
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


def _total_size(session: XnatSession, experiment_id: str, resource: str) -> int | None:
    """Return the total size of the resource over all scans, or None if unknown (for the ETA)."""
    try:
        rows = session.get_rows(f"/data/experiments/{quote_part(experiment_id)}/scans/ALL/resources/{resource}/files")
        return sum(int(r.get("Size") or 0) for r in rows) or None
    except Exception:  # only the progress bar's ETA depends on it
        return None


def _counted(chunks, bar: Progress):
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


def _publish(content: str, target: str) -> None:
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
