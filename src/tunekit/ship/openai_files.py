"""OpenAI's Files API for fine-tuning data: POST/GET/DELETE /v1/files, GET /v1/files/{id}/content.

An upload (multipart/form-data: `file` and `purpose`, as `client.files.create` sends it) is checked
with `tunekit data check` before it is kept: a file with rows that cannot train is refused with a
400 naming the lines and what is wrong, so a job never starts on bad data. Only purpose `fine-tune`
is taken. The size limit is the server's body limit (`tunekit serve --max-body-mb`). Files are
stored under `$TUNEKIT_HOME/fine_tuning/files/` and listed in the registry (ship/ft_store.py).
"""

from __future__ import annotations

import email.parser
import email.policy
from pathlib import Path

from fastapi import Request

from tunekit.ship import ft_store
from tunekit.ship.api import APIError

PURPOSE = "fine-tune"
ERRORS_SHOWN = 5  # problems quoted in a refused upload's message
BAD = "invalid_request_error"


def file_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def parse_form(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename or None, bytes). The stdlib's
    MIME parser reads it (FastAPI's form parsing needs python-multipart, not a dependency here)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise APIError(
            400,
            f"the upload must be multipart/form-data (fields `file` and `purpose`), got {content_type or 'no Content-Type'}",
            BAD,
        )
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise APIError(400, "the multipart body could not be read (no parts, or no boundary)", BAD)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def check_upload(path: Path, filename: str) -> None:
    """Refuse a file that `tunekit data check` finds errors in: a 400 naming the lines."""
    from tunekit.data.check import check_data

    report = check_data([path])
    unreadable = [f.unreadable for f in report.files if f.unreadable]
    if unreadable:
        raise APIError(400, unreadable[0].replace(str(path), filename), BAD, "file", "invalid_file")
    if report.errors:
        shown = "; ".join(str(p).replace(str(path), filename) for p in report.errors[:ERRORS_SHOWN])
        more = len(report.errors) - ERRORS_SHOWN
        raise APIError(
            400,
            f"{filename}: {report.rejected} of {report.kept + report.rejected} rows have errors: {shown}"
            + (f" (and {more} more; `tunekit data check FILE` lists them all)" if more > 0 else ""),
            BAD,
            "file",
            "invalid_file",
        )


def upload(content_type: str, body: bytes) -> dict:
    """POST /v1/files: check and keep the file; its file object."""
    fields = parse_form(content_type, body)
    purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
    if purpose != PURPOSE:
        raise APIError(
            400,
            f"purpose: {purpose!r} is not supported; this server takes files for fine-tuning only (purpose 'fine-tune')",
            BAD,
            "purpose",
        )
    if "file" not in fields:
        raise APIError(400, "file: missing; send the data file in the form field `file`", BAD, "file")
    filename, data = fields["file"]
    filename = Path(filename or "upload.jsonl").name
    if not data:
        raise APIError(400, f"{filename}: the file is empty", BAD, "file", "invalid_file")
    file_id = ft_store.new_id("file-")
    folder = ft_store.home() / "files"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_id}.jsonl"  # fine-tuning data is JSON Lines, whatever the upload was named
    path.write_bytes(data)
    try:
        check_upload(path, filename)
        return file_object(ft_store.add_file(file_id, filename, purpose, len(data), path))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def find(file_id: str) -> dict:
    row = ft_store.get_file(file_id)
    if row is None:
        raise APIError(404, f"No such File object: {file_id}", BAD, "id", "not_found")
    return row


def delete(file_id: str) -> dict:
    """DELETE /v1/files/{id}; refused while a job that is not finished needs the file."""
    row = find(file_id)
    waiting = [
        j["id"]
        for j in ft_store.list_jobs(limit=10**9)[0]
        if j["status"] not in ft_store.FINAL
        and file_id in (j["request"]["training_file"], j["request"]["validation_file"])
    ]
    if waiting:
        raise APIError(
            400,
            f"{file_id} is used by fine-tuning job {waiting[0]}, which has not finished; cancel it or wait",
            BAD,
            "file_id",
        )
    ft_store.delete_file(file_id)
    Path(row["path"]).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


def add_routes(app, in_thread) -> None:
    """The Files API on `app`; `in_thread(fn, *args)` runs blocking work off the event loop."""
    from fastapi.responses import Response

    @app.post("/v1/files")
    async def create_file(request: Request):
        return await in_thread(upload, request.headers.get("content-type", ""), await request.body())

    @app.get("/v1/files")
    def list_files(purpose: str | None = None):
        return {
            "object": "list",
            "data": [file_object(r) for r in ft_store.list_files(purpose)],
            "has_more": False,
        }

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str):
        return file_object(find(file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str):
        return Response(Path(find(file_id)["path"]).read_bytes(), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str):
        return delete(file_id)
