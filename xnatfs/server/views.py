"""How the embedded server represents archive objects in XNAT's JSON and XML formats.

Listing rows use XNAT's field names (all values strings); `*_row` functions return every field the server
knows, and `DEFAULT_COLUMNS` says which of them a listing shows when the request has no `columns=`.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from .archive import Assessor, Checksums, Experiment, FileEntry, Project, Resource, Scan, Subject

DEFAULT_COLUMNS = {
    "projects": ["ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname", "URI"],
    "subjects": ["ID", "project", "label", "insert_date", "insert_user", "URI"],
    "experiments": ["ID", "project", "label", "date", "xsiType", "insert_date", "URI"],
    "scans": ["ID", "type", "xsiType", "xnat_imagescandata_id", "series_description", "quality", "note", "URI"],
    "assessors": ["ID", "project", "label", "date", "xsiType", "insert_date", "URI"],
}
SERVER_USER = "admin"  # shown as insert_user; the archive has no record of who added a folder


def result_set(rows: list[dict], kind: str | None = None, columns: list[str] | None = None) -> dict:
    """Wrap rows as XNAT's {"ResultSet": {...}}; for a `kind` with DEFAULT_COLUMNS, pick the columns.

    Requested columns the server does not know are left out; URI is always kept (XNAT does too).
    """
    if kind in DEFAULT_COLUMNS:
        wanted = columns or DEFAULT_COLUMNS[kind]
        if "URI" not in wanted:
            wanted = [*wanted, "URI"]
        rows = [{c: row[c] for c in wanted if c in row} for row in rows]
    return {"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}}


def _text(value) -> str:
    return "" if value is None else str(value)


def project_row(project: Project) -> dict:
    meta = project.meta
    return {
        "ID": project.id,
        "secondary_ID": _text(meta.get("secondary_ID")),
        "name": _text(meta.get("name", project.id)),
        "description": _text(meta.get("description")),
        "pi_firstname": _text(meta.get("pi_firstname")),
        "pi_lastname": _text(meta.get("pi_lastname")),
        "URI": f"/data/projects/{project.id}",
    }


def subject_row(subject: Subject) -> dict:
    return {
        "ID": subject.id,
        "project": subject.project.id,
        "label": subject.label,
        "insert_date": subject.insert_date,
        "insert_user": SERVER_USER,
        "group": _text(subject.meta.get("group")),
        "URI": f"/data/subjects/{subject.id}",
    }


def _experiment_data(item: Experiment | Assessor, session: Experiment, date: str | None) -> dict:
    """The fields an experiments listing and an assessors listing share (XNAT's assessors are experiments)."""
    return {
        "ID": item.id,
        "project": session.project.id,
        "label": item.label,
        "date": _text(date),
        "xsiType": item.xsi_type,
        "insert_date": session.insert_date,
        "URI": item.uri,
    }


def experiment_row(experiment: Experiment) -> dict:
    meta = experiment.meta
    return {
        **_experiment_data(experiment, experiment, meta.get("date")),
        "time": _text(meta.get("time")),
        "modality": experiment.modality,
        "subject_ID": experiment.subject.id,
        "subject_label": experiment.subject.label,
    }


def scan_row(scan: Scan) -> dict:
    meta = scan.meta
    return {
        "ID": scan.id,
        "type": scan.type,
        "xsiType": scan.xsi_type,
        "xnat_imagescandata_id": scan.numeric_id,
        "series_description": _text(meta.get("series_description", scan.type)),
        "quality": _text(meta.get("quality", "usable")),
        "note": _text(meta.get("note")),
        "URI": scan.uri,
    }


def assessor_row(assessor: Assessor) -> dict:
    session = assessor.experiment
    date = assessor.meta.get("date", session.meta.get("date"))
    return {**_experiment_data(assessor, session, date), "session_ID": session.id}


def resource_row(resource: Resource) -> dict:
    """A resources-listing row (XNAT gives these no ID and no URI)."""
    files = resource.files()
    owner = resource.owner
    category, cat_id, cat_desc = "resources", "", ""
    if isinstance(owner, Scan):
        category, cat_id, cat_desc = "scans", owner.id, owner.type
    elif isinstance(owner, Assessor):
        category, cat_id = "assessors", owner.id
    return {
        "xnat_abstractresource_id": resource.xnat_id,
        "label": resource.label,
        "element_name": "xnat:resourceCatalog",
        "category": category,
        "cat_id": cat_id,
        "cat_desc": cat_desc,
        "format": _text(resource.format),
        "content": _text(resource.meta.get("content")),
        "tags": _text(resource.meta.get("tags")),
        "file_count": str(len(files)),
        "file_size": str(sum(resource.listed_size(entry) for entry in files)),
    }


def file_row(resource: Resource, entry: FileEntry, checksums: Checksums | None) -> dict:
    """A files-listing row; the file's path in the resource is the part of URI after /files/.

    Without `checksums` (XNAT's checksums site setting off) the digest is empty.
    """
    return {
        "Name": entry.path.rsplit("/", 1)[-1],
        "Size": str(resource.listed_size(entry)),
        "URI": resource.uri_base() + entry.path,
        "collection": resource.label,
        "file_tags": "",
        "file_format": "",
        "file_content": "",
        "cat_ID": resource.xnat_id,
        "digest": checksums.md5(entry) if checksums else "",
    }


def items(xsi_type: str, data_fields: dict, insert_date: str = "", children: list | None = None) -> dict:
    """Wrap an object's fields the way `GET {object}?format=json` answers in XNAT."""
    meta = {"xsi:type": xsi_type, "isHistory": False}
    if insert_date:
        meta["start_date"] = insert_date
    return {"items": [{"children": children or [], "meta": meta, "data_fields": data_fields}]}


def _present(fields: dict) -> dict:
    """Drop empty values: XNAT leaves unset fields out of data_fields."""
    return {key: value for key, value in fields.items() if value not in (None, "")}


def _fields(row: dict, names: str, **more) -> dict:
    """An object's data_fields: the listing row's fields named in `names` (space-separated) and `more`."""
    return _present({**{name: row[name] for name in names.split()}, **more})


def project_items(project: Project) -> dict:
    meta = project.meta
    fields = _fields(project_row(project), "ID secondary_ID name description", keywords=meta.get("keywords"))
    children = []
    investigator = _present({"firstname": meta.get("pi_firstname"), "lastname": meta.get("pi_lastname")})
    if investigator:
        child = {"children": [], "meta": {"xsi:type": "xnat:investigatorData", "isHistory": False}}
        children.append({"field": "PI", "items": [{**child, "data_fields": investigator}]})
    return items("xnat:projectData", fields, children=children)


def subject_items(subject: Subject) -> dict:
    return items("xnat:subjectData", _fields(subject_row(subject), "ID label project group"), subject.insert_date)


def experiment_items(experiment: Experiment) -> dict:
    meta = experiment.meta
    fields = _fields(
        experiment_row(experiment),
        "ID label project subject_ID date time modality",
        UID=meta.get("UID"),
        scanner=meta.get("scanner"),
        note=meta.get("note"),
    )
    return items(experiment.xsi_type, fields, experiment.insert_date)


def scan_items(scan: Scan) -> dict:
    fields = _fields(
        scan_row(scan),
        "ID type series_description quality note xnat_imagescandata_id",
        UID=scan.meta.get("UID"),
        frames=scan.meta.get("frames"),
        image_session_ID=scan.experiment.id,
    )
    return items(scan.xsi_type, fields, scan.experiment.insert_date)


def assessor_items(assessor: Assessor) -> dict:
    experiment = assessor.experiment
    fields = _fields(assessor_row(assessor), "ID label project date", imageSession_ID=experiment.id)
    return items(assessor.xsi_type, fields, experiment.insert_date)


def catalog_xml(resource: Resource, checksums: Checksums) -> bytes:
    """The resource catalog XNAT answers for `GET .../resources/{id}` (XML even when JSON is asked for)."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<cat:Catalog xmlns:cat="http://nrg.wustl.edu/catalog" ID={quoteattr(resource.xnat_id)} '
        f"label={quoteattr(resource.label)}>",
        "<cat:entries>",
    ]
    for entry in resource.files():
        lines.append(
            f"<cat:entry URI={quoteattr(entry.path)} ID={quoteattr(entry.path)} "
            f"name={quoteattr(entry.path.rsplit('/', 1)[-1])} digest={quoteattr(checksums.md5(entry))}/>"
        )
    lines += ["</cat:entries>", "</cat:Catalog>", ""]
    return "\n".join(lines).encode("utf-8")
