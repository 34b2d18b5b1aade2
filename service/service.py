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
import functools
import os
import time
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import InvalidArgument, NotFound, ServiceUnavailable
from fastapi import FastAPI, HTTPException
from pydantic import Field

# Upload fields are typed `Path` with a None default: BentoML 1.4.39 fails on Optional[Path]
# (unhashable FileSchema inside typing.Union) and ignores uploads inside PEP 604 `Path | None`.

REPO = Path(__file__).resolve().parent.parent  # where flows/ lives: the job processes run there
ops = FastAPI(title="cellscan operations")
_SERVICES: list[Any] = []


@functools.cache
def settings() -> Any:
    """The service's settings: the environment, read once per process."""
    from cellscan.settings import Settings, setup_offline

    setup_offline()
    return Settings.from_env()


class BadRequest(InvalidArgument):
    """HTTP 400 with cellscan's message."""


def _svc() -> Any:
    if not _SERVICES:
        raise HTTPException(503, "service is starting")
    return _SERVICES[0]


@ops.get("/models")
def models() -> dict[str, Any]:
    """Registered versions with aliases and metrics, and the version being served."""
    from cellscan.mlops import registry

    s = _svc()
    return {"serving": s.holder.version, "versions": registry.list_versions(s.settings)}


@ops.get("/jobs/{job_id}")
def job(job_id: str) -> dict[str, Any]:
    """Status and result of a /retrain or /anomaly job."""
    j = _svc().jobs.get(job_id)
    if j is None:
        raise HTTPException(404, f"no job with id {job_id!r}")
    return j.view()


@ops.get("/health")
def health() -> dict[str, Any]:
    """Liveness plus the served model (BentoML's /readyz and /livez answer too)."""
    s = _svc()
    return {"status": "ok" if s.holder.version else "no_model", "model_version": s.holder.version,
            "model_name": s.settings.model_name, "last_error": s.holder.last_error,
            "pending_jobs": s.jobs.pending()}


class ApiKeyMiddleware:
    """Mutating routes need the X-API-Key header when an API key is configured (401 missing, 403 wrong).

    An ASGI middleware rather than a check in the endpoint, because BentoML replaces the message of
    401/403 errors raised in endpoints with a generic one.
    """

    PROTECTED = ("/retrain", "/anomaly", "/rollback")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        want = settings().api_key
        if scope["type"] == "http" and want and scope["path"].rstrip("/") in self.PROTECTED:
            from starlette.responses import JSONResponse

            headers = dict(scope.get("headers") or [])
            got = headers.get(b"x-api-key")
            if got is None:
                resp = JSONResponse({"error": "missing API key: send it in the X-API-Key header"}, status_code=401)
                return await resp(scope, receive, send)
            if got.decode("latin-1") != want:
                resp = JSONResponse({"error": "wrong API key (X-API-Key header)"}, status_code=403)
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


@bentoml.service(name="cellscan", traffic={"timeout": 3600, "max_concurrency": 256}, workers=1)
@bentoml.asgi_app(ops, path="/")
class Cellscan:
    def __init__(self) -> None:
        self.settings = settings()  # first: it switches telemetry off before MLflow is imported
        from cellscan.core.config import load_params
        from cellscan.serve.fetch import FetchPolicy
        from cellscan.serve.jobs import Jobs, make_runner
        from cellscan.serve.runtime import Batcher, ModelHolder

        self.project = self.settings.home
        self.params = load_params(self.project / "params.yaml")
        self.policy = FetchPolicy.from_settings(self.settings)
        self.holder = ModelHolder(self.settings)
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
        self.batcher = Batcher(self.holder, on_batch=self.m_batch.observe)
        _SERVICES[:] = [self]

    # -- helpers ----------------------------------------------------------------------------
    def _bytes(self, image_url: str | None, image: Path | None) -> tuple[str, bytes]:
        from cellscan.errors import CellscanError
        from cellscan.serve.fetch import fetch

        if (image_url is None) == (image is None):
            raise BadRequest("send exactly one of image_url (JSON) or image (multipart upload)")
        try:
            if image is not None:
                return image.name, image.read_bytes()
            return image_url.rsplit("/", 1)[-1] or "image", fetch(image_url, self.policy)  # type: ignore[union-attr]
        except CellscanError as exc:
            raise BadRequest(str(exc)) from None

    def _decode(self, name: str, data: bytes) -> Any:
        """(working-size input, the image at its own size) or a 400 naming what was expected."""
        from cellscan.errors import CellscanError

        model, _ = self._model()
        try:
            return model.load_pair(data, max_pixels=self.params.data.max_pixels)
        except CellscanError as exc:
            raise BadRequest(f"{name}: {exc}") from None

    def _model(self) -> Any:
        from cellscan.errors import NoModelError

        try:
            return self.holder.current()
        except NoModelError as exc:
            raise ServiceUnavailable(str(exc)) from None

    async def _one(self, name: str, data: bytes, heatmap: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        x, native = await asyncio.to_thread(self._decode, name, data)
        record, amap, version = await self.batcher.score(x)
        record["model_version"] = version
        if heatmap:  # at the size of the image sent
            from cellscan.core.plots import overlay_png

            png = await asyncio.to_thread(overlay_png, native, amap, record["threshold"])
            record["heatmap_png"] = base64.b64encode(png).decode()
        self.m_latency.observe(time.perf_counter() - t0)
        self.m_score.observe(record["anomaly_score"])
        self.m_pred.labels(result="anomaly" if record["is_anomaly"] else "normal").inc()
        self._recent = [*self._recent[-999:], record["is_anomaly"]]
        self.m_rate.set(sum(self._recent) / len(self._recent))
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
        self._model()
        if image_urls or images:
            if image_url is not None or image is not None:
                raise BadRequest("send either one image (image_url / image) or a batch (image_urls / images)")
            items = [(u, None) for u in image_urls] + [(None, p) for p in images]
            if len(items) > 256:
                raise BadRequest(f"a batch holds at most 256 images, got {len(items)}")
            blobs = [await asyncio.to_thread(self._bytes, u, p) for u, p in items]
            return list(await asyncio.gather(*(self._one(n, b, heatmap) for n, b in blobs)))
        name, data = await asyncio.to_thread(self._bytes, image_url, image)
        return await self._one(name, data, heatmap)

    async def _store_and_run(self, kind: str, role: str, image_url: str | None, image: Path | None, wait: bool,
                             defect: str = "anomaly") -> Any:
        """Validate and store the image, queue a training job (another process), answer or wait for it."""
        from starlette.responses import JSONResponse

        from cellscan.errors import BusyError
        from cellscan.mlops import steps

        name, data = await asyncio.to_thread(self._bytes, image_url, image)
        await asyncio.to_thread(self._decode, name, data)  # refuse what is not an image before storing anything
        try:
            job = self.jobs.reserve(kind)
        except BusyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=429,
                                headers={"Retry-After": str(self.jobs.retry_after_s)})
        try:
            root = self.project / self.params.data.root
            stored = await asyncio.to_thread(steps.add_images, root, role, [(name, data)], defect)
        except BaseException:
            self.jobs.discard(job)
            raise
        self.jobs.start(job)
        head = {"job_id": job.id, "stored": [str(p.relative_to(self.project)) for p in stored]}
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
        return await self._store_and_run("anomaly", "anomaly", image_url, image, wait, defect)

    @bentoml.api(route="/rollback")
    def rollback(self, version: int | None = Field(None, ge=1)) -> dict[str, Any]:
        """Move the champion alias back (to ``version``, or to the previous champion)."""
        from cellscan.mlops import registry
        from cellscan.errors import RegistryError

        try:
            v = registry.rollback(self.settings, version)
        except RegistryError as exc:
            raise NotFound(str(exc)) from None
        self.holder.refresh()
        return {"champion": v, "serving": self.holder.version}

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.jobs.close()
        self.holder.stop()


Cellscan.add_asgi_middleware(ApiKeyMiddleware)
