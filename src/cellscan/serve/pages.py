"""The inspection pages (``/ui/...``), served by the cellscan service itself: Jinja2, no CDN, no build step.

- ``/ui/scans``: recent predictions from the prediction log, newest first, filtered by verdict and review state;
- ``/ui/scans/{id}``: the image, its heatmap overlay at full resolution (toggle, opacity), score vs threshold;
- ``/ui/upload``: score one or several images through ``/predict`` (heatmaps shown);
- ``/ui/models``: registered versions with metrics, gate reasons, the champion, rollback (``POST /rollback``);
- ``/ui/monitoring``: anomaly rate per day and the link to the latest drift report;
- ``/ui/api``: the API documentation rendered from the OpenAPI document (works offline).

Reading is open. Operator verdicts (``POST /ui/scans/{id}/verdict``) and rollback need the API key: the
pages' JavaScript keeps it in the tab's sessionStorage and sends it as ``X-API-Key``.
:func:`build_router` takes the service accessor, so this module never imports the service.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: the routes' annotations are strings (PEP 563) FastAPI resolves here

from cellscan.serve.verdicts import REVIEW_STATES, VERDICTS, VerdictStore, check_verdict, key_name

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


@functools.cache
def _env() -> Any:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.filters["when"] = lambda ts: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts))) if ts else ""
    env.filters["num"] = lambda v, d=4: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}g}"
    return env


def render(name: str, status: int = 200, **ctx: Any) -> Any:
    from starlette.responses import HTMLResponse

    return HTMLResponse(_env().get_template(name).render(**ctx), status_code=status)


def mlflow_run_url(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The run's page in the MLflow UI when the tracking URI is the MLflow server itself (else None).

    A user name and password in the URI stay out of the link (the browser asks for them).

    Example:
        >>> mlflow_run_url("http://127.0.0.1:5000/", "1", "abc")
        'http://127.0.0.1:5000/#/experiments/1/runs/abc'
        >>> mlflow_run_url("https://ops:s3cret@mlflow.lan/", "1", "abc")
        'https://mlflow.lan/#/experiments/1/runs/abc'
    """
    from urllib.parse import urlsplit, urlunsplit

    if not (tracking_uri.startswith(("http://", "https://")) and experiment_id and run_id):
        return None
    parts = urlsplit(tracking_uri)
    base = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _error(status: int, message: str, code: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "code": code}, status_code=status)


class Pages:
    """State the pages need from the running service (the prediction log, verdicts, models)."""

    def __init__(self, service: Callable[[], Any]) -> None:
        self.service = service
        self._owner: Any = None  # the service the state below belongs to
        self._log: Any = None
        self._verdicts: VerdictStore | None = None
        self._models: dict[int, Any] = {}
        self._overlays: dict[tuple[Any, Any], asyncio.Future[bytes]] = {}

    @property
    def log(self) -> Any:
        svc = self.service()
        if self._log is None or self._owner is not svc:
            from cellscan.mlops.monitor.predlog import PredictionLog

            plog = getattr(svc, "plog", None)
            self._log = plog.log if plog is not None else PredictionLog.from_settings(svc.settings)
            self._owner, self._verdicts, self._models, self._overlays = svc, None, {}, {}
        return self._log

    @property
    def verdicts(self) -> VerdictStore:
        log = self.log
        if self._verdicts is None:
            self._verdicts = VerdictStore(log.engine)
        return self._verdicts

    # -- scans -----------------------------------------------------------------------------------
    def scans(self, verdict: str = "", review: str = "", limit: int = 60) -> list[dict[str, Any]]:
        """Newest first; ``verdict`` anomaly|normal, ``review`` one of REVIEW_STATES."""
        from sqlalchemy import select

        p, v = self.log.predictions, self.verdicts.table
        q = (select(p.c.id, p.c.ts, p.c.name, p.c.score, p.c.threshold, p.c.is_anomaly, p.c.model_version,
                    p.c.source, p.c.image_path, v.c.verdict, v.c.by, v.c.ts.label("verdict_ts"))
             .select_from(p.outerjoin(v, v.c.prediction_id == p.c.id))
             .order_by(p.c.ts.desc(), p.c.id.desc()).limit(max(1, min(limit, 500))))
        if verdict in ("anomaly", "normal"):
            q = q.where(p.c.is_anomaly.is_(verdict == "anomaly"))
        if review == "unreviewed":
            q = q.where(v.c.verdict.is_(None))
        elif review == "reviewed":
            q = q.where(v.c.verdict.is_not(None))
        elif review in VERDICTS:
            q = q.where(v.c.verdict == review)
        with self.log.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings().all()]

    def scan(self, scan_id: int) -> dict[str, Any] | None:
        from sqlalchemy import select

        if not 0 < scan_id < 2**63:  # beyond SQLite's integers: no such scan
            return None
        p = self.log.predictions
        with self.log.engine.connect() as conn:
            row = conn.execute(select(p).where(p.c.id == scan_id)).mappings().first()
        if row is None:
            return None
        return dict(row) | {"review": self.verdicts.get(scan_id)}

    def image_bytes(self, scan: dict[str, Any]) -> bytes | None:
        path = scan.get("image_path")
        if not path or not Path(path).is_file():
            return None
        return Path(path).read_bytes()

    def model_for(self, version: int | None) -> Any:
        """The version that scored the scan (the served one, else loaded once from the registry).

        Raises:
            NoModelError: nothing is served yet.
            RegistryError: that version cannot be loaded now (MLflow down, the version deleted or broken).
        """
        from cellscan.errors import RegistryError

        svc = self.service()
        model, current = svc.holder.current()
        if version is None or version == current:
            return model
        if version not in self._models:
            from cellscan.mlops import registry

            down = svc.probe.error()  # the registry client would retry a refused connection for minutes
            if down is not None:
                msg = f"the scan was scored by version {version}, which needs MLflow to load: {down}"
                raise RegistryError(msg)
            try:
                loaded = registry.load_model(version, svc.settings)[0]
            except Exception as exc:
                msg = f"version {version}, which scored the scan, cannot load ({type(exc).__name__}: {exc})"
                raise RegistryError(msg) from None
            self._models = {version: loaded}  # keep one extra model at most
        return self._models[version]

    async def heatmap_png(self, scan: dict[str, Any], data: bytes) -> bytes:
        """The scan's overlay, drawn as /predict draws one: decoding and drawing within the service's bound
        on full-size work at once, the model called through its batcher (never two calls at once). Requests
        for one scan while it is drawn wait for that drawing; the last two overlays are kept."""
        version = scan.get("model_version") or self.service().holder.version
        key = (scan.get("id"), version)
        task = self._overlays.get(key)
        if task is None:
            task = asyncio.ensure_future(self._draw(scan, data, version))
            self._overlays = {**dict(list(self._overlays.items())[-1:]), key: task}
        try:
            return await asyncio.shield(task)  # one client hanging up does not cancel the others' drawing
        except Exception:
            if self._overlays.get(key) is task:  # a failure is said each time, not kept
                del self._overlays[key]
            raise

    async def _draw(self, scan: dict[str, Any], data: bytes, version: int | None) -> bytes:
        from cellscan.core.plots import overlay_png

        svc = self.service()
        model = await asyncio.to_thread(self.model_for, scan.get("model_version"))
        pixels = min(svc.params.data.max_pixels, svc.settings.max_image_pixels)
        async with svc._decodes:
            x, native = await asyncio.to_thread(model.load_pair, data, max_pixels=pixels)
        _, amap, _ = await svc.batcher.score(x, (model, version))
        async with svc._decodes:
            return await asyncio.to_thread(overlay_png, native, amap, scan.get("threshold"))

    # -- verdicts --------------------------------------------------------------------------------
    async def record(self, scan: dict[str, Any], verdict: str, by: str) -> tuple[int, dict[str, Any]]:
        """Store the image where the verdict sends it (at most once) and record the verdict."""
        from bentoml.exceptions import InvalidArgument

        from cellscan.core.images import canonical_png
        from cellscan.errors import DatasetError
        from cellscan.mlops import steps
        from cellscan.serve.intake import shown

        svc = self.service()
        stored: str | None = None
        job_id: str | None = None
        note: str | None = None
        data = self.image_bytes(scan) if verdict != "confirmed" else None
        if verdict != "confirmed" and data is None:
            return 409, {"error": "the scan's image is no longer kept (retention); the verdict needs it", "code": "image_gone"}
        name = Path(scan["name"] or "").name
        name = name if name not in ("", ".", "..") else "scan.png"  # a file name, whatever the client sent
        if verdict == "false_alarm":  # a new normal for the next retraining: the folder /retrain stores into
            async with svc._intake:
                digest = (await asyncio.to_thread(canonical_png, data, name=name))[1]
                where = await asyncio.to_thread(svc.index.find, digest)
                if where is None:
                    try:
                        files = [(name, data)]
                        paths = await asyncio.to_thread(steps.add_images, svc.index.root, "temp", files)
                    except DatasetError as exc:  # as /retrain answers it: nothing stored
                        return 507, {"error": str(exc), "code": "storage_error"}
                    stored = shown(paths[0], svc.project)
                else:
                    note = f"already in the dataset: {shown(where, svc.project)}"
        elif verdict == "missed_defect":  # a known anomaly and the threshold re-evaluation (what /anomaly does)
            with tempfile.TemporaryDirectory(prefix="cellscan-verdict-") as tmp:
                path = Path(tmp) / (name if len(name.encode()) <= 100 else "scan" + Path(name).suffix[:10])
                path.write_bytes(data)  # type: ignore[arg-type]
                try:
                    answer = await svc._store_and_run("anomaly", "anomaly", None, path, False)
                except InvalidArgument as exc:  # the kept image no longer decodes for the champion
                    return 400, {"error": str(exc), "code": "bad_request"}
            if not isinstance(answer, dict):  # a JSONResponse: 409 duplicate, 429 busy, 507 storage
                body = json.loads(answer.body)
                if body.get("code") != "duplicate_image":
                    return answer.status_code, body
                note = body["error"]
            else:
                stored, job_id = (answer["stored"] or [None])[0], answer["job_id"]
        from sqlalchemy.exc import IntegrityError

        try:
            row = self.verdicts.add(int(scan["id"]), verdict, by, stored, job_id, note)
        except IntegrityError:  # a double click: the other request recorded its verdict meanwhile
            prev = self.verdicts.get(int(scan["id"])) or {}
            msg = f"scan {scan['id']} already has a verdict: {prev.get('verdict')} by {prev.get('by')}"
            return 409, {"error": msg, "code": "conflict"}
        return 200, row


def build_router(service: Callable[[], Any], openapi: Callable[[], dict[str, Any]]) -> Any:
    """The ``/ui`` routes; ``service()`` returns the running Cellscan, ``openapi()`` the full API document."""
    from fastapi import APIRouter
    from starlette.responses import FileResponse, RedirectResponse, Response

    from cellscan.serve.apidoc import operations

    pages = Pages(service)
    r = APIRouter(include_in_schema=True)
    nav = {"scans": "/ui/scans", "upload": "/ui/upload", "models": "/ui/models", "monitoring": "/ui/monitoring",
           "API": "/ui/api"}

    @r.get("/ui", include_in_schema=False)
    def ui_root() -> Any:
        return RedirectResponse("/ui/scans")

    @r.get("/ui/static/{name}", include_in_schema=False)
    def static(name: str) -> Any:
        path = STATIC / name
        if "/" in name or name.startswith(".") or len(name) > 100 or not path.is_file():
            return _error(404, f"no static file {name[:60]!r}", "not_found")
        return FileResponse(path)

    @r.get("/ui/scans", summary="Recent scans (HTML)")
    def scans_page(verdict: str = "", review: str = "", limit: int = 60) -> Any:
        rows = pages.scans(verdict, review, limit)
        return render("scans.html", nav=nav, page="scans", rows=rows, verdict=verdict, review=review,
                      reviews=REVIEW_STATES, serving=service().holder.version)

    @r.get("/ui/scans/{scan_id}", summary="One scan: image, heatmap, score, verdict (HTML)")
    def scan_page(scan_id: int) -> Any:
        scan = pages.scan(scan_id)
        if scan is None:
            return _error(404, f"no scan with id {scan_id}", "not_found")
        return render("scan.html", nav=nav, page="scans", s=scan, kept=bool(pages.image_bytes(scan)),
                      verdicts=VERDICTS)

    @r.get("/ui/scans/{scan_id}/image.png", summary="The scan's image as PNG (size=N: a thumbnail)")
    def scan_image(scan_id: int, size: int = 0) -> Any:
        from PIL import Image

        scan = pages.scan(scan_id)
        data = pages.image_bytes(scan) if scan else None
        if data is None:
            return _error(404, f"no kept image for scan {scan_id}", "not_found")
        img = Image.open(io.BytesIO(data))
        if img.mode.startswith(("I", "F")):  # 16-bit and float grey levels: stretched to 8 bits
            import numpy as np

            arr = np.asarray(img).astype("float64")
            lo, hi = float(arr.min()), float(arr.max())
            img = Image.fromarray(((arr - lo) / (hi - lo or 1) * 255).astype("uint8"))
        elif img.mode not in ("L", "RGB"):  # a palette, alpha, CMYK...: the colours it shows
            img = img.convert("RGB")
        if size > 0:
            img.thumbnail((min(size, 512), min(size, 512)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @r.get("/ui/scans/{scan_id}/heatmap.png", summary="The scan's heatmap overlay at the image's size (PNG)")
    async def scan_heatmap(scan_id: int) -> Any:
        from cellscan.errors import NoModelError, RegistryError

        scan = pages.scan(scan_id)
        data = pages.image_bytes(scan) if scan else None
        if data is None:
            return _error(404, f"no kept image for scan {scan_id}", "not_found")
        try:
            png = await pages.heatmap_png(scan, data)  # type: ignore[arg-type]
        except NoModelError as exc:
            return _error(503, str(exc), "no_model")
        except RegistryError as exc:
            return _error(503, str(exc), "model_unavailable")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @r.post("/ui/scans/{scan_id}/verdict", summary="Record an operator verdict (API key)",
            description="JSON {\"verdict\": \"confirmed\" | \"false_alarm\" | \"missed_defect\"}; needs X-API-Key.")
    async def verdict(scan_id: int, request: Request) -> Any:
        from cellscan.serve.guard import GuardPolicy, json_body

        svc = service()
        policy = GuardPolicy.from_settings(svc.settings)
        got = request.headers.get("x-api-key")
        if policy.api_key and not policy.key_ok(got.encode() if got is not None else None):
            if got is None:
                return _error(401, "missing API key: send it in the X-API-Key header", "missing_api_key")
            return _error(403, "wrong API key (X-API-Key header)", "wrong_api_key")
        if not policy.api_key and not policy.open_mode:
            return _error(403, "no API key is configured; set CELLSCAN_API_KEY(_FILE)", "no_api_key_configured")
        try:
            body = json_body(await request.body())
            choice = str(body["verdict"])
        except (ValueError, KeyError, TypeError):
            return _error(400, f"send JSON {{\"verdict\": one of {', '.join(VERDICTS)}}}", "bad_request")
        scan = pages.scan(scan_id)
        if scan is None:
            return _error(404, f"no scan with id {scan_id}", "not_found")
        why = check_verdict(choice, bool(scan["is_anomaly"]))
        if why:
            return _error(400, why, "bad_request")
        if scan["review"] is not None:
            prev = scan["review"]
            return _error(409, f"scan {scan_id} already has a verdict: {prev['verdict']} by {prev['by']}", "conflict")
        status, answer = await pages.record(scan, choice, key_name(policy.api_key))
        return answer if status == 200 else _error(status, answer["error"], answer["code"])

    @r.get("/ui/upload", summary="Upload images and see verdicts and heatmaps (HTML)")
    def upload_page() -> Any:
        return render("upload.html", nav=nav, page="upload")

    @r.get("/ui/models", summary="Model versions, metrics, champion, rollback (HTML)")
    def models_page() -> Any:
        from cellscan.mlops import registry
        from cellscan.serve.health import redact

        svc = service()
        problem = svc.probe.error()
        if problem is not None:  # MLflow down: say so now rather than wait on the client's retries
            return render("models.html", 503, nav=nav, page="models", versions=[], serving=svc.holder.version,
                          tracking=redact(svc.settings.tracking_uri), unavailable=problem)
        versions = registry.list_versions(svc.settings)
        uri = svc.settings.tracking_uri
        if uri.startswith(("http://", "https://")):
            mc = registry.client(svc.settings)
            for v in versions:
                try:
                    exp = mc.get_run(v["run_id"]).info.experiment_id if v.get("run_id") else None
                except Exception:  # noqa: BLE001 (a deleted run: the page still lists the version)
                    exp = None
                v["mlflow_url"] = mlflow_run_url(uri, exp, v.get("run_id"))
        return render("models.html", nav=nav, page="models", versions=versions, serving=svc.holder.version,
                      tracking=redact(svc.settings.tracking_uri))  # an open page: no password on it

    @r.get("/ui/monitoring", summary="Anomaly rate per day and the latest drift report (HTML)")
    def monitoring_page() -> Any:
        from sqlalchemy import case, func, select

        p = pages.log.predictions
        flagged = func.sum(case((p.c.is_anomaly, 1), else_=0))  # PostgreSQL has no sum() of booleans
        q = (select(p.c.day, func.count().label("n"), flagged.label("anomalies"))
             .group_by(p.c.day).order_by(p.c.day.desc()).limit(60))
        with pages.log.engine.connect() as conn:
            days = [dict(r) for r in conn.execute(q).mappings().all()][::-1]
        for d in days:
            d["rate"] = float(d["anomalies"] or 0) / max(1, int(d["n"]))
        report = service().settings.monitor_dir / "reports" / "latest.html"
        return render("monitoring.html", nav=nav, page="monitoring", days=days, report=report.is_file())

    @r.get("/docs", include_in_schema=False)
    @r.get("/ui/api", summary="The API documentation (HTML, offline)")
    def api_page() -> Any:
        spec = openapi()
        return render("api.html", nav=nav, page="API", ops=operations(spec), spec=spec,
                      error=spec.get("components", {}).get("schemas", {}).get("Error", {}))

    return r
