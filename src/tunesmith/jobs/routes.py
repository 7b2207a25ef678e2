"""OpenAI's Files and Fine-tuning routes over a `JobsService`: thin, every read and write scoped to the caller's
API key (`request.state.api_key`, set by the server's key check; none on a server without keys)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse

from tunesmith.errors import TunesmithError
from tunesmith.jobs.protocol import (
    FileDeleted,
    FileObject,
    FilePage,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobCreate,
    Page,
)
from tunesmith.jobs.store import FileRecord, JobRecord
from tunesmith.jobs.supervisor import JobsService

UPLOAD_PURPOSES = ("fine-tune",)


def jobs_router(service: JobsService) -> APIRouter:
    """/v1/files and /v1/fine_tuning/jobs (with cancel, pause, resume, events and checkpoints) over `service`."""
    router = APIRouter(prefix="/v1")
    store = service.store

    def caller_file(raw: Request, file_id: str) -> FileRecord:
        record = store.get_file(_owner(raw), file_id)
        if record is None:
            raise HTTPException(404, f"no file {file_id!r} for this API key; list yours with GET /v1/files")
        return record

    def caller_job(raw: Request, job_id: str) -> JobRecord:
        job = store.get_job(_owner(raw), job_id)
        if job is None:
            raise HTTPException(404, f"no fine-tuning job {job_id!r} for this API key; list yours with "
                                     "GET /v1/fine_tuning/jobs")
        return job

    @router.post("/files")
    def create_file(raw: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> FileObject:
        if purpose not in UPLOAD_PURPOSES:
            raise TunesmithError(f"purpose {purpose!r}: this server takes files for fine-tuning only; send "
                                 "purpose='fine-tune'")
        record = store.add_file(_owner(raw), file.filename or "upload.jsonl", purpose, file.file,
                                service.max_file_bytes)
        return FileObject.of(record)

    @router.get("/files")
    def list_files(raw: Request, purpose: str | None = None, after: str | None = None,
                   limit: int = Query(10000, ge=1, le=10000), order: Literal["asc", "desc"] = "desc") -> FilePage:
        records, has_more = store.list_files(_owner(raw), purpose, after, limit, order)
        return FilePage(data=[FileObject.of(record) for record in records], has_more=has_more,
                        first_id=records[0].id if records else None, last_id=records[-1].id if records else None)

    @router.get("/files/{file_id}")
    def retrieve_file(raw: Request, file_id: str) -> FileObject:
        return FileObject.of(caller_file(raw, file_id))

    @router.delete("/files/{file_id}")
    def delete_file(raw: Request, file_id: str) -> FileDeleted:
        caller_file(raw, file_id)  # a 404 for a file this key does not have
        store.delete_file(_owner(raw), file_id)
        return FileDeleted(id=file_id)

    @router.get("/files/{file_id}/content")
    def file_content(raw: Request, file_id: str) -> FileResponse:
        record = caller_file(raw, file_id)
        return FileResponse(store.file_path(record.id), media_type="application/octet-stream")

    @router.post("/fine_tuning/jobs", response_model=None)
    def create_job(raw: Request, request: JobCreate) -> FineTuningJob:
        key = getattr(raw.state, "api_key", None)
        return FineTuningJob.of(service.create_job(_owner(raw), key.name if key else None, request))

    @router.get("/fine_tuning/jobs")
    def list_jobs(raw: Request, after: str | None = None,
                  limit: int = Query(20, ge=1, le=10000)) -> Page[FineTuningJob]:
        metadata = {name[len("metadata["):-1]: value for name, value in raw.query_params.multi_items()
                    if name.startswith("metadata[") and name.endswith("]")}
        without_metadata = raw.query_params.get("metadata") == "null"
        jobs, has_more = store.list_jobs(_owner(raw), after, limit, metadata, without_metadata)
        return Page[FineTuningJob](data=[FineTuningJob.of(job) for job in jobs], has_more=has_more)

    @router.get("/fine_tuning/jobs/{job_id}")
    def retrieve_job(raw: Request, job_id: str) -> FineTuningJob:
        return FineTuningJob.of(caller_job(raw, job_id))

    @router.post("/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(raw: Request, job_id: str) -> FineTuningJob:
        return FineTuningJob.of(service.cancel(caller_job(raw, job_id).id))

    @router.post("/fine_tuning/jobs/{job_id}/pause")
    def pause_job(raw: Request, job_id: str) -> FineTuningJob:
        return FineTuningJob.of(service.pause(caller_job(raw, job_id).id))

    @router.post("/fine_tuning/jobs/{job_id}/resume")
    def resume_job(raw: Request, job_id: str) -> FineTuningJob:
        return FineTuningJob.of(service.resume(caller_job(raw, job_id).id))

    @router.get("/fine_tuning/jobs/{job_id}/events")
    def list_events(raw: Request, job_id: str, after: str | None = None,
                    limit: int = Query(20, ge=1, le=10000)) -> Page[FineTuningJobEvent]:
        events, has_more = store.list_events(caller_job(raw, job_id).id, after, limit)
        return Page[FineTuningJobEvent](data=[FineTuningJobEvent.of(event) for event in events], has_more=has_more)

    @router.get("/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(raw: Request, job_id: str, after: str | None = None,
                         limit: int = Query(10, ge=1, le=10000)) -> Page[FineTuningJobCheckpoint]:
        checkpoints, has_more = store.list_checkpoints(caller_job(raw, job_id).id, after, limit)
        return Page[FineTuningJobCheckpoint](data=[FineTuningJobCheckpoint.of(c) for c in checkpoints],
                                             has_more=has_more)

    return router


def _owner(raw: Request) -> str | None:
    key = getattr(raw.state, "api_key", None)
    return key.key_id if key else None
