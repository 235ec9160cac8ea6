"""Content of the XNAT transport: a resource downloaded as one ZIP into the cache, files uploaded."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import tempfile
from typing import IO, TYPE_CHECKING

from xnatfs.cache import Filler
from xnatfs.exceptions import ConnectionFailedError, NotFoundError, ServerError, UploadError
from xnatfs.extract import StreamingExtractor
from xnatfs.transports.entry import Entry, Unit
from xnatfs.transports.xnat.names import _ZIP_MEMBER, file_url_path, join, zip_names
from xnatfs.transports.xnat.refs import FileListing, RemoteFile, Resource, file_listing

if TYPE_CHECKING:
    from xnatfs.transports.xnat.transport import XnatTransport

log = logging.getLogger(__name__)


class XnatContent:
    """The content half of :class:`~xnatfs.transports.xnat.transport.XnatTransport` (mixed into it)."""

    def _unit(self, path: str, entry: Entry) -> Unit | None:
        """A file's unit is its resource (one ZIP); an experiment's resources are read together."""
        remote = entry.ref
        if not isinstance(remote, RemoteFile):
            return None
        resource = remote.resource
        listing = self._file_listing(resource)
        parts = path.strip("/").split("/")
        key = ("xnat", self.server_url, resource.project, resource.experiment_id, resource.scan_id or "")
        return Unit(
            key=(*key, resource.resource_id or resource.label),
            version=listing.version,
            member=remote.cache_path,
            id=resource.api_path,
            folder=join(parts[: 7 if parts[3] == "scans" else 5]),  # the resource's folder
            group=join(parts[:3]),
            size=listing.size,
            ref=(resource, listing),
        )

    def _fill(self, unit: Unit, filler: Filler) -> None:
        self._download_resource(*unit.ref, filler)

    def _download_resource(self, resource: Resource, listing: FileListing, filler: Filler) -> None:
        """Download ``resource`` as one ZIP and extract it into ``filler.staging`` as it arrives.

        ZIP entries are mapped back to listed files by XNAT's renaming rules (see
        :meth:`Resource.zip_name`); entries that match no listed file are skipped, and listed files
        the ZIP did not bring (a name the rules leave ambiguous) are downloaded one by one.
        """
        if self.offline:
            raise ConnectionFailedError(f"{resource.api_path}: not in the cache, and the mount is offline")
        self.check_not_down(resource.api_path)
        self.downloads += 1
        log.info("downloading %s as ZIP (%d files)", resource.api_path, len(listing.files))
        by_zip_name = zip_names(resource, listing)
        received: set[str] = set()

        def map_name(name: str) -> str | None:
            match = _ZIP_MEMBER.match(name)
            cache_path = by_zip_name.get(match.group(1)) if match else None
            if cache_path is None or cache_path in received:
                log.warning("%s: ZIP entry %r matches no listed file; skipped", resource.api_path, name)
                return None
            received.add(cache_path)
            return cache_path

        extractor = StreamingExtractor(filler.staging, self.limits, map_name=map_name, on_member=filler.publish)
        answered = False
        try:
            # compression=0 overrides a site that deflates ZIPs: stored entries stream, and cost no CPU.
            with self.session.stream(resource.api_path + "/files", format="zip", compression="0") as chunks:
                answered = True
                self._down_until = 0.0
                for chunk in chunks:
                    extractor.feed(chunk)
                    filler.progress()
            extractor.finish()
        except BaseException as error:
            if isinstance(error, ConnectionFailedError) and not answered:
                self.source_down()  # unreachable: other reads fail at once for a few seconds
            extractor.fail(error)
            raise
        for remote in listing.files.values():
            if remote.cache_path not in received:
                self._download_one(remote, filler)

    def _download_one(self, remote: RemoteFile, filler: Filler) -> None:
        """Download one listed file by itself into the staging folder (when the ZIP lacked it)."""
        try:
            url = f"{remote.resource.api_path}/files/{file_url_path(remote.server_path)}"
        except ValueError as error:
            log.warning("%s: %s", remote.resource.api_path, error)
            return
        try:
            with self.session.stream(url) as chunks:
                filler.write(remote.cache_path, chunks)
        except NotFoundError:
            log.warning("%s: listed but not on the server", url)

    # -- writing --------------------------------------------------------------------------

    def _open_write(self, path: str, mode: str) -> IO[bytes]:
        parts = path.strip("/").split("/")
        if len(parts) > 7 and parts[3] == "scans" and parts[5] == "resources" and parts[7] == "files":
            scan_id = self.stat(join(parts[:5])).ref.id
            label, rest = parts[6], parts[8:]
        elif len(parts) > 5 and parts[3] == "resources" and parts[5] == "files":
            scan_id, label, rest = None, parts[4], parts[6:]
        else:
            raise PermissionError(f"{path}: only files inside a resource's files folder can be written")
        if not rest:
            raise IsADirectoryError(path)
        folder = join(parts[: 7 if scan_id is not None else 5])
        try:
            resource = self.stat(folder).ref  # an existing resource: addressed by its ID
        except FileNotFoundError:
            experiment = self.stat(join(parts[:3]))
            resource = Resource(experiment.ref.project, experiment.ref.id, scan_id, label)
        file_url_path("/".join(rest))  # refuses at open a name XNAT could not store
        return _Upload(self, resource, "/".join(rest), path, mode)

    def upload(self, resource: Resource, server_path: str, local_path: str) -> None:
        """Upload ``local_path`` as ``server_path`` of ``resource`` and check it arrived intact.

        Raises ServerError when the server's listing lacks the file or its size or digest differ.
        """
        size = os.path.getsize(local_path)
        md5 = hashlib.md5()
        with open(local_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                md5.update(block)
        url = f"{resource.api_path}/files/{file_url_path(server_path)}"
        with open(local_path, "rb") as body:
            self.session.request(
                "PUT",
                url,
                params={"overwrite": "true", "inbody": "true"},
                data=body,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            ).close()
        rows = self.session.get_rows(resource.api_path + "/files")
        remote = file_listing(resource, rows).files.get(server_path)
        eid = resource.experiment_id
        self._forget(f"\0files\0{eid}", f"\0resources\0{eid}", f"\0resource-files\0{resource.api_path}")
        if remote is None:
            raise ServerError(f"{url}: the uploaded file is missing from the server's listing")
        if remote.size != size or (remote.digest and remote.digest != md5.hexdigest()):
            raise ServerError(f"{url}: the upload arrived damaged (server has {remote.size} of {size} bytes)")


class _Upload(io.RawIOBase):
    """A local temporary file that is uploaded to XNAT when closed, and checked on arrival.

    Closing raises if the upload failed; leaving a ``with`` block by an exception discards the
    data instead of uploading something incomplete.
    """

    def __init__(self, transport: XnatTransport, resource: Resource, server_path: str, path: str, mode: str):
        super().__init__()
        if mode == "x" and transport.exists(path):
            raise FileExistsError(path)
        self._transport = transport
        self._resource = resource
        self._server_path = server_path
        self._path = path
        self._discard = False
        self._file = tempfile.NamedTemporaryFile(prefix="xnatfs-upload-", delete=False)
        if mode == "a" and transport.exists(path):
            with transport.open(path, "r") as existing:
                while block := existing.read(1 << 20):
                    self._file.write(block)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        return self._file.write(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.close()
            if not self._discard:
                try:
                    self._transport.upload(self._resource, self._server_path, self._file.name)
                except Exception as error:
                    # Keep the data: the caller may have nothing else to retry from.
                    kept = self._file.name
                    raise UploadError(
                        f"{self._path}: upload failed ({error}); the data is kept in {kept}", kept
                    ) from error
                # Every folder from the file up to the resource's "files" may have gained an entry.
                folder = posixpath.dirname(self._path)
                for _ in range(self._server_path.count("/") + 1):
                    self._transport.invalidate(folder)
                    folder = posixpath.dirname(folder)
            os.unlink(self._file.name)
        finally:
            super().close()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._discard = exc_type is not None
        self.close()
