"""cellscan's HTTP service (BentoML): predictions from the MLflow champion, retraining, rollback.

    bentoml serve service.service:Cellscan --host 127.0.0.1 --port 3000     (docs at /docs)

Endpoint bodies validate, call cellscan, and answer; the logic lives in src/cellscan.
The environment is read once, into :func:`settings` (see cellscan.settings for the variables).
Training never runs here: /retrain and /anomaly store their image and queue a job
(cellscan.serve.jobs) that runs the flow in another process, or as a Prefect deployment run when
PREFECT_API_URL is set.
"""


import asyncio
import base64
import contextvars
import functools
import logging
import math
import os
import time
import typing
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import InvalidArgument, NotFound, ServiceUnavailable
from fastapi import FastAPI, HTTPException, Request
from pydantic import Field

# Upload fields are typed `Path` with a None default: BentoML 1.4.39 fails on Optional[Path]
# (unhashable FileSchema inside typing.Union) and ignores uploads inside PEP 604 `Path | None`.

REPO = Path(__file__).resolve().parent.parent  # where flows/ lives: the job processes run there
# FastAPI's own /docs would load Swagger UI from a CDN (blank offline): cellscan.serve.pages serves /docs itself.
ops = FastAPI(title="cellscan operations", docs_url=None, redoc_url=None)
_SERVICES: list[Any] = []
# For the prediction log: where the bytes came from ("upload", "url"), and the request (a batch) they belong to.
_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("cellscan_source", default="upload")
_BATCH: contextvars.ContextVar[str | None] = contextvars.ContextVar("cellscan_batch", default=None)
NORMAL_NAMES = ("good", "normal", "ok", "train", "test", "temp", "validation", "ground_truth")
HEATMAP_BATCH = 16  # a batch's heatmaps are held until the answer: at most this many per request


@functools.cache
def settings() -> Any:
    """The service's settings: the environment, read once per process."""
    from cellscan.settings import Settings, setup_offline

    setup_offline()
    return Settings.from_env()


class BadRequest(InvalidArgument):
    """HTTP 400 with cellscan's message."""


class _Refused(Exception):
    """A model change refused before anything was written (answered 409 with this message)."""


def _svc() -> Any:
    if not _SERVICES:
        raise HTTPException(503, "service is starting")
    return _SERVICES[0]


def _mlflow_down(s: Any) -> Any:
    """A 503 in the error shape while MLflow is unreachable (the loaded champion keeps serving), else None."""
    from starlette.responses import JSONResponse

    problem = s.probe.error()
    if problem is None:
        return None
    msg = f"{problem}; models cannot be listed or changed until it answers (the loaded champion keeps serving)"
    return JSONResponse({"error": msg, "code": "mlflow_unavailable"}, status_code=503)


@ops.get("/models")
def models() -> Any:
    """Registered versions with aliases and metrics, and the version being served."""
    from cellscan.mlops import registry

    s = _svc()
    return _mlflow_down(s) or {"serving": s.holder.version, "versions": registry.list_versions(s.settings)}


@ops.get("/jobs/{job_id}")
def job(job_id: str) -> dict[str, Any]:
    """Status and result of a /retrain or /anomaly job."""
    j = _svc().jobs.get(job_id)
    if j is None:
        raise HTTPException(404, f"no job with id {job_id!r}")
    return j.view()


@ops.get("/health")
def health() -> dict[str, Any]:
    """Liveness plus the served model and runtime; ``degraded`` (with why) while MLflow is unreachable.

    Always 200 while the process answers (BentoML's /readyz and /livez answer too).
    """
    s = _svc()
    mlflow_error = s.probe.error()
    status = "no_model" if not s.holder.version else "degraded" if mlflow_error else "ok"
    return {"status": status, "model_version": s.holder.version, "champion_version": s.holder.champion,
            "runtime": s.settings.runtime, "model_name": s.settings.model_name,
            "mlflow": {"reachable": mlflow_error is None, "error": mlflow_error},
            "degraded": [mlflow_error] if mlflow_error else [],
            "last_error": s.holder.last_error, "pending_jobs": s.jobs.pending()}


@ops.post("/edge/results")
async def edge_results(request: Request) -> Any:
    """Results scored on an edge device (``cellscan-edge score --post``) into the prediction log, source ``edge``."""
    from starlette.responses import JSONResponse

    from cellscan.serve.edgelog import EdgeRecordsError, edge_rows
    from cellscan.serve.guard import json_body

    s = _svc()
    if s.plog is None:
        return JSONResponse({"error": "the prediction log is off (CELLSCAN_PREDICTION_LOG=0)", "code": "log_off"},
                            status_code=409)
    try:
        rows, skipped = edge_rows(json_body(await request.body()))
    except ValueError as exc:  # not JSON (invalid, nested too deeply, not UTF-8)
        return JSONResponse({"error": f"body is not JSON: {exc}", "code": "bad_request"}, status_code=400)
    except EdgeRecordsError as exc:
        return JSONResponse({"error": str(exc), "code": "bad_request"}, status_code=400)
    written = await asyncio.to_thread(s.plog.log.insert, rows)
    return {"written": written, "skipped": skipped, "source": "edge"}


def _report_file(name: str) -> Path:
    path = settings().monitor_dir / "reports" / name
    if not path.is_file():
        raise HTTPException(404, "no drift report yet: the monitor flow (flows/monitor.py) writes one per interval")
    return path


@ops.get("/monitoring/report")
def monitoring_report() -> Any:
    """The latest Evidently drift report (HTML), written by the monitor flow."""
    from starlette.responses import FileResponse

    return FileResponse(_report_file("latest.html"), media_type="text/html")


@ops.get("/monitoring/report.json")
def monitoring_report_json() -> Any:
    """The latest drift report as JSON: summary (drift, drifted columns, anomaly rate), batches, days, Evidently's."""
    from starlette.responses import FileResponse

    return FileResponse(_report_file("latest.json"), media_type="application/json")


_READ_LOGS: dict[str, Any] = {}


def _read_log() -> Any:
    """The prediction log the monitoring routes read: the service's own, or one per database while the
    log is off (not one per request: each would open an engine and its connections, left to the GC)."""
    from cellscan.mlops.monitor.predlog import PredictionLog

    plog = getattr(_SERVICES[0], "plog", None) if _SERVICES else None
    if plog is not None:
        return plog.log
    s = settings()
    key = str(s.prediction_db)
    if key not in _READ_LOGS:
        _READ_LOGS.clear()
        _READ_LOGS[key] = PredictionLog.from_settings(s)
    return _READ_LOGS[key]


@ops.get("/monitoring/batches")
def monitoring_batches(days: int = 7) -> dict[str, Any]:
    """Per-request batch and per-day metrics from the prediction log (process time, time per prediction, ...)."""
    import time as _time

    from cellscan.mlops.monitor.batches import batch_metrics, days_since

    df = _read_log().frame(since=days_since(_time.time(), min(days, 366)))  # whole days, today included
    return {"batches": batch_metrics(df)[-100:], "days": batch_metrics(df, "day")}


@ops.get("/monitoring/metrics")
def monitoring_metrics() -> Any:
    """Per-day metrics of the prediction log as Prometheus text (BentoML's /metrics has the live counters)."""
    from starlette.responses import PlainTextResponse

    from cellscan.mlops.monitor.batches import prometheus_text

    return PlainTextResponse(prometheus_text(monitoring_batches(2)["days"], "day"))


def _openapi() -> dict[str, Any]:
    """The whole API: BentoML's document (with the error shape) plus the routes of the ops app."""
    from cellscan.serve.apidoc import merge
    from cellscan.serve.guard import document_errors

    return merge(document_errors(Cellscan.openapi_spec.asdict()), ops.openapi())


def _pages() -> None:
    """The inspection pages under /ui (cellscan.serve.pages): scans, upload, models, monitoring, API docs."""
    from cellscan.serve.pages import build_router

    ops.include_router(build_router(_svc, _openapi))


_pages()


def _guard_policy() -> Any:
    from cellscan.serve.guard import GuardPolicy

    return GuardPolicy.from_settings(settings())


class Guard:
    """cellscan.serve.guard.Guard (Host, content type, body cap, cross-site, API key, one error shape).

    An ASGI middleware rather than checks in the endpoints, because BentoML replaces the message of
    401/403 errors raised in endpoints with a generic one, and reads bodies before any endpoint runs.
    """

    def __init__(self, app: Any) -> None:
        from cellscan.serve.guard import Guard as _Guard, install_log_filter

        install_log_filter()
        self.guard = _Guard(app, _guard_policy)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.guard(scope, receive, send)


def _files_only() -> None:
    """Multipart forms as BentoML 1.4.39 parses them, made strict.

    File fields take uploads only (BentoML would download a text value itself, around cellscan's URL
    checks); long upload names are shortened (BentoML puts them in a temporary file name: a 500 past
    255 bytes); unknown fields are refused instead of ignored; a body Starlette cannot parse as a form (no
    boundary, a part header past its limits, too many fields) is a 400 naming why, not BentoML's 500.
    """
    from _bentoml_impl.serde import MultipartSerde  # BentoML 1.4.39

    async def ensure_file(obj: Any) -> Any:
        from starlette.datastructures import UploadFile

        if not isinstance(obj, UploadFile):
            raise BadRequest("file fields (image, images) take uploaded files only; send a URL as image_url in JSON")
        name = Path(obj.filename or "image")
        if len(name.name.encode()) > 100:  # bytes, not characters: the file system counts bytes

            def cut(text: str, size: int) -> str:
                return text.encode()[:size].decode(errors="ignore")

            obj.filename = cut(name.stem, 80) + cut(name.suffix, 10)
        return obj

    original = MultipartSerde.parse_request

    async def parse_request(self: Any, request: Any, cls: Any) -> Any:
        from starlette.exceptions import HTTPException as StarletteHTTPException

        try:  # Starlette's own 400 (no boundary, a part header over its limits, too many fields) is no 500
            form = await request.form()
        except StarletteHTTPException as exc:
            msg = f"malformed multipart body: {exc.detail}"
            raise BadRequest(msg) from None
        unknown = sorted(set(form.keys()) - set(cls.model_fields))
        if unknown:
            msg = f"unknown form field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}; expected some of {', '.join(cls.model_fields)}"
            raise BadRequest(msg)
        for k in form:
            text_only = not takes_files(cls.model_fields[k].annotation)
            if text_only and not all(isinstance(v, str) for v in form.getlist(k)):
                msg = f"form field {k!r} takes text, got a file; upload images as image or images"
                raise BadRequest(msg)
        try:
            return await original(self, request, cls)
        except RecursionError:  # BentoML json.loads each text field and catches only JSONDecodeError
            msg = "a form field's JSON is nested too deeply; expected plain values (true, false, a URL)"
            raise BadRequest(msg) from None

    def takes_files(annotation: Any) -> bool:
        return annotation is Path or any(takes_files(a) for a in typing.get_args(annotation))

    MultipartSerde.ensure_file = staticmethod(ensure_file)
    MultipartSerde.parse_request = parse_request


_files_only()


def _upload_name(path: Path) -> str:
    """The name the client gave an upload, for messages, the prediction log and the scans page.

    BentoML 1.4.39 writes each upload to ``tempfile.NamedTemporaryFile(suffix=<its name>)``: "tmp" and
    8 random characters, then the client's name ("upload" where it sent none).
    """
    name = path.name
    if not name.startswith("tmp"):
        return name
    return name[11:] or "upload"


def _timers_cancelled() -> None:
    """BentoML 1.4.39's request timeout, without its leak.

    Its TimeoutMiddleware schedules a timer per request (``traffic.timeout``: an hour here, for /retrain
    with ``wait``) and never cancels it; the timer keeps the request's context, tracing span included,
    alive until it fires: the worker grew by about 5 KB per request, 240 MB in a 10-minute soak. Here the
    timer is cancelled when the request ends; the timeout itself behaves as before.
    """
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send))
        fut.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))  # ended without an answer
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                msg = f"Not able to process the request in {self.timeout} seconds"
                await JSONResponse({"error": msg, "code": "timeout"}, status_code=504)(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    TimeoutMiddleware.__call__ = call  # type: ignore[method-assign]


_timers_cancelled()


def _strict_json() -> None:
    """JSON bodies as BentoML 1.4.39 parses them, made strict like the forms above.

    Unknown fields are refused with their names (a typo such as ``heatmaps`` would otherwise be
    dropped without a word), and a body that is a bare URL is never downloaded by BentoML itself
    (its JSON parser fetches ``http://...`` bodies for routes with file fields, around cellscan's
    URL checks); such a body is invalid JSON and answered 400.
    """
    from _bentoml_impl.serde import JSONSerde, Payload  # BentoML 1.4.39

    from cellscan.serve.guard import json_body

    async def parse_request(self: Any, request: Any, cls: Any) -> Any:
        body = await request.body()
        try:
            data = json_body(body) if body.strip() else {}
        except ValueError:
            data = None  # invalid or too deeply nested JSON: pydantic's message below
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                msg = (f"unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}; "
                       f"expected some of {', '.join(cls.model_fields)}")
                raise BadRequest(msg)
        return self.deserialize_model(Payload((body,), metadata=request.headers), cls)

    JSONSerde.parse_request = parse_request


_strict_json()


@bentoml.service(name="cellscan", traffic={"timeout": 3600, "max_concurrency": 256}, workers=1)
@bentoml.asgi_app(ops, path="/")
class Cellscan:
    def __init__(self) -> None:
        self.settings = settings()  # first: it switches telemetry off before MLflow is imported
        from cellscan.errors import ConfigError

        if not self.settings.api_key and not self.settings.open_mode:
            msg = ("no API key: set CELLSCAN_API_KEY or CELLSCAN_API_KEY_FILE (scripts/services.sh creates one), "
                   "or CELLSCAN_OPEN=1 to let anyone who reaches the port change data and models")
            raise ConfigError(msg)
        if self.settings.open_mode and not self.settings.api_key:
            logging.getLogger("cellscan.service").warning(
                "CELLSCAN_OPEN=1: /retrain, /anomaly and /rollback are open to anyone who reaches this port")
        from cellscan.core.config import load_params
        from cellscan.serve.fetch import FetchPolicy
        from cellscan.serve.jobs import Jobs, make_runner
        from cellscan.serve.runtime import Batcher, ModelHolder

        self.project = self.settings.home
        self.params = load_params(self.project / "params.yaml")
        self.policy = FetchPolicy.from_settings(self.settings)
        from cellscan.serve.health import TrackingProbe

        self.probe = TrackingProbe(self.settings.tracking_uri)
        self.holder = ModelHolder(self.settings, reachable=self.probe.error)
        runner = make_runner(self.settings, REPO, os.environ, self.project / "runs" / "jobs")
        self.jobs = Jobs(runner, self.settings.max_pending_jobs, on_done=lambda job: self.holder.refresh())
        self.m_pred = bentoml.metrics.Counter("cellscan_predictions_total", "Predictions by outcome", ["result"])
        self.m_score = bentoml.metrics.Histogram("cellscan_score", "Image scores (anomaly_score, what the threshold applies to)",
                                                 buckets=(-2, -1, 0, 0.5, 1, 1.5, 2, 3, 5, 8, 13, 21, float("inf")))
        self.m_latency = bentoml.metrics.Histogram("cellscan_predict_seconds", "Per-image prediction latency")
        self.m_batch = bentoml.metrics.Histogram("cellscan_batch_size", "Images per model call",
                                                 buckets=(1, 2, 4, 8, 16, 32, 64, float("inf")))
        self.m_rate = bentoml.metrics.Gauge("cellscan_anomaly_rate", "Share of anomalies in the last 1000 predictions")
        self._recent: list[bool] = []
        self._decodes = asyncio.Semaphore(2)
        self._intake = asyncio.Lock()
        from cellscan.serve.intake import DatasetIndex

        self.index = DatasetIndex(self.project / self.params.data.root, self.params.data.max_pixels)
        from cellscan.mlops.monitor.descriptors import embed
        from cellscan.mlops.monitor.predlog import LogWriter, PredictionLog

        # The prediction log: written by a background thread after the answer is computed.
        self.plog = LogWriter(PredictionLog.from_settings(self.settings)) if self.settings.prediction_log else None
        self.batcher = Batcher(self.holder, on_batch=self.m_batch.observe,
                               embed=(lambda res: embed(res.recon, res.maps)) if self.plog else None,
                               workers=2 if self.settings.runtime == "onnx" else 1)
        _SERVICES[:] = [self]

    # -- helpers ----------------------------------------------------------------------------
    async def _bytes(self, image_url: str | None, image: Path | None) -> tuple[str, bytes]:
        from cellscan.errors import CellscanError
        from cellscan.serve.fetch import fetch_async

        if (image_url is None) == (image is None):
            raise BadRequest("send exactly one of image_url (JSON) or image (multipart upload)")
        try:
            _SOURCE.set("upload" if image is not None else "url")
            if image is not None:
                return _upload_name(image), await asyncio.to_thread(image.read_bytes)
            data = await fetch_async(image_url, self.policy, self.settings.max_fetches)  # type: ignore[arg-type]
            return image_url.rsplit("/", 1)[-1][:100] or "image", data  # type: ignore[union-attr]
        except CellscanError as exc:
            raise BadRequest(str(exc)) from None

    def _decode(self, name: str, data: bytes) -> Any:
        """(working-size input, the image at its own size, the (model, version) it was decoded for) or a
        400 naming what was expected."""
        from cellscan.errors import CellscanError

        used = self._model()
        try:
            pixels = min(self.params.data.max_pixels, self.settings.max_image_pixels)
            return (*used[0].load_pair(data, max_pixels=pixels, name=name), used)
        except CellscanError as exc:
            msg = str(exc)
            raise BadRequest(msg if msg.startswith(f"{name}: ") else f"{name}: {msg}") from None

    def _no_model(self) -> Any:
        """A 503 in the error shape that names why while no champion is loaded (BentoML would answer a 503
        raised here with a generic text), else None."""
        from starlette.responses import JSONResponse

        from cellscan.errors import NoModelError

        try:
            self.holder.current()
        except NoModelError as exc:
            last = self.holder.last_error
            msg = f"{exc}" + (f" (the last load failed: {last})" if last else "")
            return JSONResponse({"error": msg, "code": "no_model"}, status_code=503)
        return None

    def _model(self) -> Any:
        from cellscan.errors import NoModelError

        try:
            return self.holder.current()
        except NoModelError as exc:
            raise ServiceUnavailable(str(exc)) from None

    async def _one(self, name: str, data: bytes, heatmap: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        async with self._decodes:  # a bounded number of decodes at once: each can take hundreds of MB
            x, native, used = await asyncio.to_thread(self._decode, name, data)
        if not heatmap:  # the image at its own size (up to 64 MB) is not held while the batch queues
            native = None
        record, amap, version = await self.batcher.score(x, used)
        if not all(math.isfinite(float(record.get(k) or 0.0)) for k in ("anomaly_score", "reconstruction_error")):
            # never into the score metric or the prediction log: one NaN would poison them for good
            from cellscan.edge import NON_FINITE  # the edge device's error rows say the same

            raise BadRequest(f"{name}: {NON_FINITE}")
        emb = record.pop("_embedding", None)
        record["model_version"] = version
        if heatmap:  # at the size of the image sent
            from cellscan.core.plots import overlay_png

            async with self._decodes:  # rendering at full size costs as much as decoding
                png = await asyncio.to_thread(overlay_png, native, amap, record["threshold"])
            native = None
            record["heatmap_png"] = base64.b64encode(png).decode()
        self.m_latency.observe(time.perf_counter() - t0)
        self.m_score.observe(record["anomaly_score"])
        self.m_pred.labels(result="anomaly" if record["is_anomaly"] else "normal").inc()
        self._recent = [*self._recent[-999:], record["is_anomaly"]]
        self.m_rate.set(sum(self._recent) / len(self._recent))
        if self.plog is not None:  # queued: descriptors and the insert happen in the log's thread
            from cellscan.mlops.monitor.predlog import Item

            self.plog.submit(Item(x, data, record, emb, _SOURCE.get(), name, version, time.perf_counter() - t0,
                                  _BATCH.get()))
        return record

    # -- endpoints --------------------------------------------------------------------------
    @bentoml.api(route="/predict")
    async def predict(
        self,
        image_url: str | None = Field(None, description="http(s) URL of one image"),
        image: Path = Field(None, description="one uploaded image (multipart)"),
        image_urls: list[str] = Field(default_factory=list, description="a batch of image URLs"),
        images: list[Path] = Field(default_factory=list, description="a batch of uploaded images (multipart)"),
        heatmap: bool = Field(False, description="add a base64 PNG heatmap overlay per image"),
    ) -> Any:
        """Score one image (answer: an object) or a batch (answer: a list)."""
        import uuid

        _BATCH.set(f"req-{uuid.uuid4().hex[:12]}")  # one request, one batch in the prediction log's metrics
        none = self._no_model()
        if none is not None:
            return none
        if image_urls or images:
            if image_url is not None or image is not None:
                raise BadRequest("send either one image (image_url / image) or a batch (image_urls / images)")
            items = [(u, None) for u in image_urls] + [(None, p) for p in images]
            if len(items) > 256:
                raise BadRequest(f"a batch holds at most 256 images, got {len(items)}")
            if heatmap and len(items) > HEATMAP_BATCH:  # each overlay is the image's size, held to the answer
                msg = (f"heatmap: true takes at most {HEATMAP_BATCH} images per request, got {len(items)}; "
                       "send smaller batches or heatmap: false")
                raise BadRequest(msg)

            async def item(i: int, u: str | None, p: Path | None) -> dict[str, Any]:
                try:
                    return await self._one(*await self._bytes(u, p), heatmap)
                except InvalidArgument as exc:  # the batch answers per item: this one's error and index
                    return {"index": i, "error": str(exc), "code": "bad_request"}

            return list(await asyncio.gather(*(item(i, u, p) for i, (u, p) in enumerate(items))))
        name, data = await self._bytes(image_url, image)
        return await self._one(name, data, heatmap)

    async def _store_and_run(self, kind: str, role: str, image_url: str | None, image: Path | None, wait: bool,
                             defect: str = "anomaly") -> Any:
        """Validate and store the image, queue a training job (another process), answer or wait for it."""
        from starlette.responses import JSONResponse

        from cellscan.core.images import canonical_png
        from cellscan.errors import BusyError, DatasetError
        from cellscan.mlops import steps
        from cellscan.serve.intake import shown

        # the job needs MLflow and the champion: without either, store nothing
        down = await asyncio.to_thread(_mlflow_down, self) or self._no_model()
        if down is not None:
            return down
        name, data = await self._bytes(image_url, image)
        async with self._decodes:
            await asyncio.to_thread(self._decode, name, data)  # refuse what is not an image before storing anything
        async with self._intake:  # one check-and-store at a time: two copies sent together are one duplicate
            digest = (await asyncio.to_thread(canonical_png, data, name=name))[1]
            where = await asyncio.to_thread(self.index.find, digest)
            if where is not None:
                msg = f"{name}: the same image is already in the dataset: {shown(where, self.project)}"
                return JSONResponse({"error": msg, "code": "duplicate_image"}, status_code=409)
            try:
                job = self.jobs.reserve(kind)
            except BusyError as exc:
                return JSONResponse({"error": str(exc), "code": "too_many_jobs"}, status_code=429,
                                    headers={"Retry-After": str(self.jobs.retry_after_s)})
            try:
                stored = await asyncio.to_thread(steps.add_images, self.index.root, role, [(name, data)], defect)
            except DatasetError as exc:
                self.jobs.discard(job)
                return JSONResponse({"error": str(exc), "code": "storage_error"}, status_code=507)
            except BaseException:
                self.jobs.discard(job)
                raise
        self.jobs.start(job)
        head = {"job_id": job.id, "stored": [shown(p, self.project) for p in stored]}
        if not wait:
            return head | {"status": job.status}
        if not await self.jobs.wait_async(job, self.settings.job_timeout_s):
            msg = f"{kind} still {job.status} after {self.settings.job_timeout_s:g} s; poll GET /jobs/{job.id}"
            return JSONResponse(head | {"status": job.status, "error": msg}, status_code=202)
        if job.status == "failed":
            msg = f"{kind} failed: {job.error}; the champion keeps serving"
            return JSONResponse(head | {"status": job.status, "error": msg}, status_code=500)
        return head | {"status": job.status, "flow_run_id": job.flow_run_id} | job.answer()

    @bentoml.api(route="/retrain")
    async def retrain(
        self,
        image_url: str | None = Field(None, description="URL of a new normal image"),
        image: Path = Field(None, description="an uploaded new normal image"),
        wait: bool = Field(True, description="wait for the retraining (false: answer a job id at once)"),
    ) -> Any:
        """Store a new normal image and retrain in another process: {new_validation_error, new_anomaly_error}."""
        return await self._store_and_run("retrain", "temp", image_url, image, wait)

    @bentoml.api(route="/anomaly")
    async def anomaly(
        self,
        image_url: str | None = Field(None, description="URL of a known anomaly"),
        image: Path = Field(None, description="an uploaded known anomaly"),
        defect: str = Field("anomaly", description="defect type (folder name)", pattern=r"^[A-Za-z0-9_-]{1,40}$"),
        wait: bool = Field(True, description="wait for the re-evaluation (false: answer a job id at once)"),
    ) -> Any:
        """Store a known anomaly and re-evaluate errors and threshold (in another process): a new model version."""
        if defect.lower() in NORMAL_NAMES:
            msg = f"defect {defect!r} names the normal class; a defect type must not be one of {', '.join(NORMAL_NAMES)}"
            raise BadRequest(msg)
        return await self._store_and_run("anomaly", "anomaly", image_url, image, wait, defect)

    @bentoml.api(route="/rollback")
    def rollback(self, version: int | None = Field(None, ge=1, strict=True)) -> dict[str, Any]:
        """Move the champion alias back (to ``version``, or to the previous champion)."""
        from mlflow.exceptions import MlflowException
        from starlette.responses import JSONResponse

        from cellscan.errors import RegistryError
        from cellscan.mlops import registry

        down = _mlflow_down(self)
        if down is not None:
            return down
        ready: dict[int, Any] = {}

        def load(v: int) -> None:  # before the alias moves: a version that cannot serve leaves it where it is
            try:
                ready[v] = self.holder.current()[0] if v == self.holder.version else self.holder.prepare(v)
            except Exception as exc:
                msg = f"version {v} cannot be served ({type(exc).__name__}: {exc}); the champion is unchanged"
                raise _Refused(msg) from None

        try:
            with self.holder.changing:  # no champion poll loads or installs meanwhile
                v = registry.rollback(self.settings, version, ready=load)
                self.holder.install(ready[v], v)
        except _Refused as exc:  # MLflow gone while loading is a 503 as below, not the version's fault
            refused = JSONResponse({"error": str(exc), "code": "not_servable"}, status_code=409)
            return _mlflow_down(self) or refused
        except RegistryError as exc:
            raise NotFound(str(exc)) from None
        except MlflowException as exc:  # the server went away between the probe and the call
            msg = f"MLflow: {exc}; the champion is unchanged"
            return JSONResponse({"error": msg, "code": "mlflow_unavailable"}, status_code=503)
        return {"champion": v, "serving": self.holder.version}

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.jobs.close()
        self.holder.stop()
        if self.plog is not None:
            self.plog.close()


Cellscan.add_asgi_middleware(Guard)
