"""The compressor's logic: validate and queue jobs, run them from the Redis queue, register the results."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from compressor import runner
from compressor.artifacts import LOADABLE_FORMATS, load_parent
from compressor.methods import METHODS, StepSpec, validate_steps
from compressor.methods.base import resolve_params
from compressor.methods.distill import build_student, check_student_fits
from compressor.methods.prune import linear_chain
from compressor.queue import JS, TERMINAL, Claim, JobQueue, now_ms, state_name
from compressor.settings import CompressorSettings
from mesh.aio import wait_event
from mesh.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    ModelNotFound,
    NotFound,
    VersionNotFound,
)
from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, compressor_pb2, registry_pb2

logger = logging.getLogger(__name__)

VS = common_pb2.VersionState
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LIVE = (VS.REGISTERED, VS.LOADING, VS.READY)


class LeaseLost(Exception):
    """Another compressor took the job over; this one stops without touching the record."""


class CompressorService:
    """Transport-free CompressorService: submit/watch/cancel/list/get, plus the loop that runs jobs."""

    def __init__(
        self,
        registry: Registry,
        store: ArtifactStore,
        settings: CompressorSettings | None = None,
        *,
        consumer: str | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.settings = settings or CompressorSettings()
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.queue = JobQueue(
            registry.redis, registry.keys, consumer=self.consumer, lease_ms=int(self.settings.lease_s * 1000)
        )
        work = self.settings.work_dir or str(Path(self.settings.var_dir) / "compressor")
        self.work_dir = Path(work)
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.current_job: str | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.queue.ensure_group()
        if self.settings.run_jobs:
            self.start_consuming()

    def start_consuming(self) -> None:
        if self._loop_task is None:
            self._stopping.clear()
            self._loop_task = asyncio.create_task(self._consume(), name="compressor-jobs")

    async def stop(self) -> None:
        """Stops taking jobs; a running job is abandoned (not acknowledged) for another compressor."""
        self._stopping.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None

    # ------------------------------------------------------------------ API
    async def submit(self, req: compressor_pb2.SubmitJobRequest) -> compressor_pb2.Job:
        """Validates everything a job needs, then queues it. Resubmitting a job_id with the same request
        returns that job (whatever its state); with a different request, ALREADY_EXISTS."""
        job_id = req.job_id or uuid.uuid4().hex[:16]
        if not _JOB_ID.match(job_id):
            raise InvalidArgument(f"job_id: {req.job_id!r} must match {_JOB_ID.pattern}")
        with contextlib.suppress(NotFound):
            return self._same_job(req, await self.queue.get(job_id))
        device = runner.resolve_device(req.device, self.settings.device)
        if not (0.0 <= req.max_accuracy_drop <= 1.0):
            raise InvalidArgument(
                f"max_accuracy_drop: must be a fraction in [0, 1] (0.01 = one point), got {req.max_accuracy_drop}"
            )
        if not (0.0 <= req.canary_percent < 100.0):
            raise InvalidArgument(f"canary_percent: must be in [0, 100), got {req.canary_percent}")
        parent = await self._resolve_source(req.source)
        if not parent.labels.get("eval_data_uri"):
            raise InvalidArgument(
                f"source.version: {parent.ref.name}:{parent.ref.version} has no evaluation data registered "
                "(label eval_data_uri)"
            )
        self.store.resolve(parent.labels["eval_data_uri"])
        has_train = bool(parent.labels.get("train_data_uri"))
        raw_steps = [(s.method, dict(s.params), dict(s.options)) for s in req.steps]
        # Method names first: they need nothing loaded.
        for i, (method, _, _) in enumerate(raw_steps):
            if method not in METHODS:
                raise InvalidArgument(
                    f"steps[{i}].method: unknown method {method!r} (known: {', '.join(METHODS)})"
                )
        loaded = await asyncio.to_thread(load_parent, self.store, parent)
        structured_ok = loaded.arch is not None and linear_chain(loaded.module) is not None
        steps = validate_steps(
            raw_steps, device=device, has_train_data=has_train, structured_ok=structured_ok
        )
        for i, step in enumerate(steps):
            if step.method == "distill":
                field_name = f"steps[{i}].options.student"
                _, _, student = build_student(step.options["student"], field_name)
                sig = parent.signature
                if len(sig.inputs) != 1 or len(sig.outputs) != 1:
                    raise InvalidArgument(
                        f"{field_name}: distillation needs a model with one input and one output"
                    )
                check_student_fits(student, list(sig.inputs[0].shape), list(sig.outputs[0].shape), field_name)
            if (step.params.get("epochs", 0) > 0) and not has_train:
                raise InvalidArgument(
                    f"steps[{i}].params.epochs: fine-tuning needs training data registered with the model "
                    "(label train_data_uri); use epochs=0"
                )
        now = now_ms()
        job = compressor_pb2.Job(
            job_id=job_id,
            state=JS.JOB_QUEUED,
            source=common_pb2.ModelRef(name=parent.ref.name, version=parent.ref.version),
            steps=[_step_message(s) for s in steps],
            max_accuracy_drop=req.max_accuracy_drop,
            canary_percent=req.canary_percent,
            created_ms=now,
            updated_ms=now,
            stage="queued",
            device=str(device),
        )
        job, created = await self.queue.create(job)
        if not created:
            # A concurrent submit with this id won the race: it is the same job only if it asked the same.
            return self._same_job(req, job)
        logger.info(
            "job %s queued: %s:%s %s", job_id, parent.ref.name, parent.ref.version, [s.method for s in steps]
        )
        return job

    def _same_job(self, req: compressor_pb2.SubmitJobRequest, job: compressor_pb2.Job) -> compressor_pb2.Job:
        """The existing job when `req` asks for what it records; ALREADY_EXISTS naming the first
        difference otherwise, so a reused --job-id never silently answers with another job.

        The job holds the resolved request (source version, step defaults, device), so `req` is
        resolved the same way; a version of 0 (the default) matches whatever the job resolved it to."""
        where = f"job_id: job {job.job_id!r} exists with different parameters"
        if req.source.name != job.source.name:
            raise AlreadyExists(f"{where} (source.name {job.source.name!r}, not {req.source.name!r})")
        if req.source.version and req.source.version != job.source.version:
            raise AlreadyExists(f"{where} (source.version {job.source.version}, not {req.source.version})")
        asked = [s.method for s in req.steps]
        recorded = [s.method for s in job.steps]
        if asked != recorded:
            raise AlreadyExists(f"{where} (steps {recorded}, not {asked})")
        for i, (ask, rec) in enumerate(zip(req.steps, job.steps, strict=True)):
            spec = METHODS[ask.method]
            params = resolve_params(spec.params, dict(ask.params), f"steps[{i}]")
            if params != dict(rec.params) or dict(ask.options) != dict(rec.options):
                raise AlreadyExists(f"{where} (steps[{i}] params or options differ)")
        for name, value in (
            ("max_accuracy_drop", req.max_accuracy_drop),
            ("canary_percent", req.canary_percent),
        ):
            if value != getattr(job, name):
                raise AlreadyExists(f"{where} ({name} {getattr(job, name):g}, not {value:g})")
        device = str(runner.resolve_device(req.device, self.settings.device))
        if device != job.device:
            raise AlreadyExists(f"{where} (device {job.device!r}, not {device!r})")
        return job

    async def get(self, job_id: str) -> compressor_pb2.Job:
        if not job_id:
            raise InvalidArgument("job_id: must not be empty")
        return await self.queue.get(job_id)

    async def list_jobs(self, limit: int = 0) -> list[compressor_pb2.Job]:
        if limit < 0:
            raise InvalidArgument(f"limit: must be >= 0, got {limit}")
        return await self.queue.list(limit or 100)

    async def cancel(self, job_id: str) -> compressor_pb2.Job:
        await self.get(job_id)
        return await self.queue.request_cancel(job_id)

    async def watch(self, job_id: str) -> AsyncIterator[compressor_pb2.Job]:
        """The job now, then every change, until it ends."""
        job = await self.get(job_id)
        yield job
        last = job
        while job.state not in TERMINAL:
            await asyncio.sleep(self.settings.poll_s)
            job = await self.queue.get(job_id)
            if (job.state, job.progress, job.stage, job.attempts) != (
                last.state,
                last.progress,
                last.stage,
                last.attempts,
            ):
                yield job
                last = job

    async def _resolve_source(self, source: common_pb2.ModelRef) -> common_pb2.ModelVersion:
        if not source.name:
            raise InvalidArgument("source.name: must not be empty")
        try:
            if source.version < 0:
                raise InvalidArgument(f"source.version: must be >= 0, got {source.version}")
            if source.version:
                mv = await self.registry.get_version(source.name, source.version)
            else:
                mv = await self._default_version(source.name)
        except ModelNotFound:
            raise NotFound(f"source.name: model {source.name!r} is not found") from None
        except VersionNotFound as exc:
            raise NotFound(
                f"source.version: version {exc.version} of model {source.name!r} is not found"
            ) from None
        if mv.state not in _LIVE:
            raise FailedPrecondition(
                f"source.version: {source.name}:{mv.ref.version} is {common_pb2.VersionState.Name(mv.state)}"
            )
        if mv.format not in LOADABLE_FORMATS:
            raise InvalidArgument(
                f"source.version: format {mv.format!r} cannot be compressed (supported: {', '.join(LOADABLE_FORMATS)})"
            )
        if mv.labels.get("quantize") or mv.labels.get("compute_dtype"):
            raise FailedPrecondition(
                f"source.version: {source.name}:{mv.ref.version} is already quantized or cast; start from its parent"
            )
        return mv

    async def _default_version(self, name: str) -> common_pb2.ModelVersion:
        """The stable alias, else the latest READY version, else the latest live one."""
        aliases = await self.registry.get_aliases(name)
        if "stable" in aliases:
            return await self.registry.get_version(name, aliases["stable"])
        versions = await self.registry.list_versions(name)
        for wanted in ((VS.READY,), _LIVE):
            live = [mv for mv in versions if mv.state in wanted]
            if live:
                return live[-1]
        raise VersionNotFound(name, "stable or latest READY")

    # ------------------------------------------------------------------ job loop
    async def _consume(self) -> None:
        block_ms = max(100, int(self.settings.poll_s * 5000))
        while not self._stopping.is_set():
            try:
                claim = await self.queue.claim(block_ms=block_ms)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("could not read the job queue; retrying")
                await asyncio.sleep(1.0)
                continue
            if claim is None:
                continue
            try:
                await self.process(claim)
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                logger.warning("job %s was taken over by another compressor", claim.job_id)
            except Exception:
                logger.exception("job %s: unexpected error in the job loop", claim.job_id)

    async def process(self, claim: Claim) -> None:
        """Runs one claimed job to its end and acknowledges it (at-least-once; registration is idempotent)."""
        try:
            job = await self.queue.get(claim.job_id)
        except NotFound:
            await self.queue.ack(claim.message_id)
            return
        if job.state in TERMINAL:
            await self.queue.ack(claim.message_id)
            return
        if await self.queue.cancel_requested(job.job_id):
            await self._finish(job.job_id, JS.JOB_CANCELLED, "cancelled", None, None)
            await self.queue.ack(claim.message_id)
            return

        def start(j: compressor_pb2.Job) -> None:
            j.state = JS.JOB_RUNNING
            j.attempts += 1
            j.stage = "reclaimed after a compressor stopped" if claim.reclaimed else "starting"
            j.message = ""

        job = await self.queue.update(job.job_id, start)
        logger.info(
            "job %s running (attempt %d%s)",
            job.job_id,
            job.attempts,
            ", reclaimed" if claim.reclaimed else "",
        )
        self.current_job = job.job_id
        try:
            await self._run(job, claim)
        finally:
            self.current_job = None
        await self.queue.ack(claim.message_id)

    async def _run(self, job: compressor_pb2.Job, claim: Claim) -> None:
        box = runner.ProgressBox()
        stop = asyncio.Event()
        flags = {"cancel": False, "lost": False}
        keeper = asyncio.create_task(self._keep(job.job_id, claim, box, stop, flags))
        out_dir = self.work_dir / f"{job.job_id}-{uuid.uuid4().hex[:8]}"
        try:
            existing = await self._registered_for(job)
            if existing is not None:
                await self._finish_from_version(job, existing)
                return
            parent = await self.registry.get_version(job.source.name, job.source.version)
            device = runner.resolve_device(job.device, self.settings.device)
            steps = validate_steps(
                [(s.method, dict(s.params), dict(s.options)) for s in job.steps],
                device=device,
                has_train_data=bool(parent.labels.get("train_data_uri")),
            )
            outcome = await asyncio.to_thread(
                runner.execute,
                self.store,
                parent,
                steps,
                device=device,
                max_accuracy_drop=job.max_accuracy_drop,
                out_dir=out_dir,
                progress=box.set,
                should_stop=lambda: flags["cancel"] or flags["lost"] or self._stopping.is_set(),
                latency_batch=self.settings.latency_batch,
                latency_iters=self.settings.latency_iters,
            )
            if flags["lost"]:
                raise LeaseLost(job.job_id)
            box.set(0.95, "registering")
            version = await self._register(job, parent, outcome)
            canary = ""
            if outcome.passed and job.canary_percent > 0:
                canary = await self._canary(job, version)
            state = JS.JOB_SUCCEEDED if outcome.passed else JS.JOB_REJECTED
            message = outcome.reason + canary
            await self._finish(job.job_id, state, message, version.ref, outcome.report)
            logger.info(
                "job %s %s: %s:%s %s",
                job.job_id,
                state_name(state),
                version.ref.name,
                version.ref.version,
                message,
            )
        except Cancelled:
            if flags["lost"]:
                raise LeaseLost(job.job_id) from None
            if self._stopping.is_set() and not flags["cancel"]:
                # Shutting down: leave the job unacknowledged so another compressor reclaims it.
                raise asyncio.CancelledError() from None
            await self._finish(job.job_id, JS.JOB_CANCELLED, "cancelled while running", None, None)
        except MeshError as exc:
            logger.warning("job %s failed: %s", job.job_id, exc)
            await self._finish(job.job_id, JS.JOB_FAILED, str(exc), None, None)
        except (LeaseLost, asyncio.CancelledError):
            raise
        except Exception as exc:
            logger.exception("job %s failed", job.job_id)
            await self._finish(
                job.job_id, JS.JOB_FAILED, f"internal error: {type(exc).__name__}: {exc}", None, None
            )
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError, LeaseLost):
                await keeper
            shutil.rmtree(out_dir, ignore_errors=True)

    async def _keep(
        self, job_id: str, claim: Claim, box: runner.ProgressBox, stop: asyncio.Event, flags: dict[str, bool]
    ) -> None:
        """Renews the lease, writes progress to the record and polls the cancel flag while the job runs."""
        seen = -1
        renew_every = max(0.2, self.settings.lease_s / 3)
        last_renew = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                if loop.time() - last_renew >= renew_every:
                    if not await self.queue.renew(claim.message_id):
                        flags["lost"] = True
                        return
                    last_renew = loop.time()
                if await self.queue.cancel_requested(job_id):
                    flags["cancel"] = True
                version, fraction, stage = box.read()
                if version != seen:
                    seen = version

                    def mutate(j: compressor_pb2.Job, fraction: float = fraction, stage: str = stage) -> bool:
                        if j.state != JS.JOB_RUNNING:
                            return False
                        j.progress, j.stage = fraction, stage
                        return True

                    await self.queue.update(job_id, mutate)
            except Exception:
                logger.exception("job %s: could not update progress", job_id)
            await wait_event(stop, self.settings.poll_s)

    async def _finish(
        self,
        job_id: str,
        state: int,
        message: str,
        result: common_pb2.ModelRef | None,
        report: compressor_pb2.EvalReport | None,
    ) -> compressor_pb2.Job:
        def mutate(j: compressor_pb2.Job) -> bool:
            if j.state in TERMINAL:
                return False
            j.state = state  # type: ignore[assignment]
            j.message = message
            stages: dict[int, str] = {JS.JOB_CANCELLED: "cancelled", JS.JOB_FAILED: "failed"}
            j.stage = stages.get(state, "done")
            if state in (JS.JOB_SUCCEEDED, JS.JOB_REJECTED):
                j.progress = 1.0
            if result is not None:
                j.result.CopyFrom(result)
            if report is not None:
                j.report.CopyFrom(report)
            return True

        return await self.queue.update(job_id, mutate)

    async def _registered_for(self, job: compressor_pb2.Job) -> common_pb2.ModelVersion | None:
        """The version a previous attempt of this job already registered (idempotency key = job_id)."""
        raw = await self.registry.redis.hget(self.registry.keys.idempotency(job.source.name), job.job_id)
        if raw is None:
            return None
        return await self.registry.get_version(job.source.name, int(raw))

    async def _finish_from_version(self, job: compressor_pb2.Job, mv: common_pb2.ModelVersion) -> None:
        m = mv.lineage.metrics
        rep = compressor_pb2.EvalReport(
            parent_accuracy=m.get("parent_accuracy", 0.0),
            accuracy=m.get("accuracy", 0.0),
            parent_size_bytes=int(m.get("parent_size_bytes", 0)),
            size_bytes=int(m.get("size_bytes", 0)),
            parent_latency_ms=m.get("parent_latency_ms", 0.0),
            latency_ms=m.get("latency_ms", 0.0),
            parent_params=int(m.get("parent_params", 0)),
            params=int(m.get("params", 0)),
            latency_batch=int(m.get("latency_batch", 0)),
            device=job.device,
        )
        state = JS.JOB_REJECTED if mv.state == VS.REJECTED else JS.JOB_SUCCEEDED
        if state == JS.JOB_SUCCEEDED and job.canary_percent > 0:
            await self._canary(job, mv)
        await self._finish(job.job_id, state, mv.reason or "registered by an earlier attempt", mv.ref, rep)

    async def _register(
        self, job: compressor_pb2.Job, parent: common_pb2.ModelVersion, outcome: runner.Outcome
    ) -> common_pb2.ModelVersion:
        # One file per attempt: an attempt that lost the registration race never overwrites the winner's file.
        filename = f"{job.job_id}-{uuid.uuid4().hex[:8]}{outcome.path.suffix}"
        artifact = await asyncio.to_thread(
            self.store.put_file, job.source.name, "compressed", outcome.path, filename
        )
        metrics = dict(outcome.metrics)
        metrics["latency_batch"] = float(outcome.report.latency_batch)
        req = registry_pb2.RegisterVersionRequest(
            model=job.source.name,
            artifact_uri=artifact.uri,
            sha256=artifact.sha256,
            format=outcome.format,
            signature=parent.signature,
            batching=parent.batching,
            dtype=outcome.dtype,
            lineage=common_pb2.Lineage(
                parent_version=parent.ref.version, methods=outcome.methods, metrics=metrics, job_id=job.job_id
            ),
            state=VS.READY if outcome.passed else VS.REJECTED,
            min_replicas=parent.min_replicas,
            max_replicas=parent.max_replicas,
            labels={**outcome.labels, "compression_job": job.job_id},
            idempotency_key=job.job_id,
            reason=outcome.reason,
        )
        mv = await self.registry.register_version(req)
        if mv.artifact_uri != artifact.uri:
            # An earlier attempt registered first; this attempt's file is not referenced.
            with contextlib.suppress(OSError, MeshError):
                self.store.resolve(artifact.uri).unlink()
        return mv

    async def _canary(self, job: compressor_pb2.Job, mv: common_pb2.ModelVersion) -> str:
        """Gives the new version canary_percent of the traffic; the current split keeps the rest."""
        name, new = mv.ref.name, mv.ref.version
        current = [(v, w) for v, w in await self.registry.get_traffic(name) if w > 0 and v != new]
        if any(v == new for v, _ in await self.registry.get_traffic(name)):
            return f"; canary {job.canary_percent:g}% already set"
        if not current:
            parent = await self.registry.get_version(name, job.source.version)
            try:
                base = (
                    parent.ref.version if parent.state == VS.READY else await self.registry.resolve(name, "")
                )
            except NotFound:
                base = 0
            if base and base != new:
                current = [(base, 1.0)]
        if not current:
            return "; no serving version to split traffic with, canary skipped"
        total = sum(w for _, w in current)
        share = 100.0 - job.canary_percent
        legs = [(v, share * w / total) for v, w in current] + [(new, job.canary_percent)]
        try:
            await self.registry.set_traffic(name, legs)
        except FailedPrecondition as exc:
            return f"; canary not set ({exc})"
        return f"; canary {job.canary_percent:g}% of traffic"


def _step_message(step: StepSpec) -> compressor_pb2.Step:
    return compressor_pb2.Step(method=step.method, params=step.params, options=step.options)
