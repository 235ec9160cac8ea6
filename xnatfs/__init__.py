"""xnatfs: mount an XNAT archive, a local folder or a DICOM PACS as a read-only folder."""

__version__ = "0.1.0"
