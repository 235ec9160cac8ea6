"""DICOM PACS transport: C-FIND for listings, C-GET of whole series into the cache, C-STORE to upload.

URL: ``dicom://AET@host:port`` (``AET`` is the called AE title; port 104 if omitted). Tree::

    /{PatientID}
      /{StudyDate}-{AccessionNumber or StudyInstanceUID}
        /{SeriesNumber}-{SeriesDescription}
          /{SOPInstanceUID}.dcm

Every component is made safe and unique (:func:`xnatfs.names.unique_names`). A study without a
date is named ``undated-...``; a series without a description ``{SeriesNumber}``, without either
``{SeriesInstanceUID}``.

Listings only ever use C-FIND (patient level with Patient Root, study, series and instance levels
with Study Root): they never move pixel data. File sizes are therefore unknown (``Entry.size`` is
None) until the series has been retrieved once; after that they come from the cached files. (The
mount never tells the kernel an unknown size: looking an instance up there retrieves its series.)

Reading any instance retrieves its whole series with one C-GET into one cache entry, keyed by
(``dicom``, ``AET@host:port``, StudyInstanceUID, SeriesInstanceUID) with the series' sorted
SOPInstanceUIDs as version. The cache makes sure one retrieve runs per series however many threads
or processes read it; each instance is published as it arrives, so the first reader does not wait
for the whole series.

Options (``opts``): ``calling_aet`` (default ``XNATFS``), ``timeout`` (seconds, default 30: bounds
the TCP connection, association negotiation and every wait for a DIMSE message), ``cache`` (a
:class:`xnatfs.cache.Cache`) or ``cache_dir`` (the default cache folder if neither is given),
``max_pdu`` (largest PDU we accept, bytes; 0 = unlimited; pynetdicom's default if absent), plus those of
:class:`~xnatfs.transports.base.AbstractTransport`.
"""

from xnatfs.transports.dicom.client import DEFAULT_CALLING_AET, DEFAULT_PORT, DEFAULT_TIMEOUT, parse_netloc
from xnatfs.transports.dicom.transport import FAILURE_MEMORY, DicomTransport

__all__ = ["DEFAULT_CALLING_AET", "DEFAULT_PORT", "DEFAULT_TIMEOUT", "FAILURE_MEMORY", "DicomTransport", "parse_netloc"]
