"""Settings taken from the environment, read once at an entry point (CLI, flow, service, benchmark).

They say *where* things are and *who* may change them (tracking server, project folder, API key, URL
policy), never how a model is trained: that is params.yaml. Library code receives a
:class:`Settings` object; nothing below the entry points reads ``os.environ``.

=============================  ======================================================  =========================
variable                       meaning                                                 default
=============================  ======================================================  =========================
CELLSCAN_HOME                  the project folder (params.yaml, data/, mlflow/)        the working directory
MLFLOW_TRACKING_URI            MLflow tracking and registry server                     sqlite in <home>/mlflow
CELLSCAN_MODEL_NAME            registered model name                                   cellscan
PREFECT_API_URL                a Prefect server: trainings run as its deployments     none: a child process
CELLSCAN_PREDICTION_DB         prediction log (SQLAlchemy URL, e.g. postgresql+...)   sqlite in <home>/monitoring
CELLSCAN_MONITOR_DIR           kept images and drift reports                          <home>/monitoring
CELLSCAN_KEEP_IMAGES_DAYS      days predicted images are kept (0: none)               30
CELLSCAN_PREDICTION_LOG        0: the service logs no predictions                     1
CELLSCAN_API_KEY               key for the routes that change data or models          none
CELLSCAN_API_KEY_FILE          file holding that key (first line)                      none
CELLSCAN_OPEN                  1: allow changes without a key (logs a warning)        0
CELLSCAN_URL_ALLOWLIST         hosts, host:port or CIDRs allowed despite being private none
CELLSCAN_FILE_URL_DIR          file:// URLs allowed inside this folder                 none
CELLSCAN_FETCH_TIMEOUT         seconds for a whole URL fetch                           5
CELLSCAN_FETCH_MAX_BYTES       largest download                                        20 MiB
CELLSCAN_POLL_SECONDS          how often the service checks the champion alias         10
CELLSCAN_MAX_PENDING_JOBS      trainings waiting or running before 429                 2
CELLSCAN_JOB_TIMEOUT           seconds a waiting /retrain or /anomaly waits            3600
CELLSCAN_RUNTIME               keras, or onnx / tflite: the service scores through     keras
                               the champion's export (made on demand when missing)
CELLSCAN_ALLOWED_HOSTS         Host header names accepted besides localhost and the    none
                               address connected to ("*": any)
CELLSCAN_MAX_BODY_BYTES        largest multipart request body (JSON: 1 MiB)            64 MiB
CELLSCAN_MAX_IMAGE_PIXELS      largest image the service decodes (width x height)      16,777,216
CELLSCAN_MAX_FETCHES           URL fetches running at once                             8
=============================  ======================================================  =========================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cellscan.errors import ConfigError

OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "BENTOML_DO_NOT_TRACK": "True",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Prefect's temporary local API needs longer than its default on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def setup_offline() -> None:
    """Switch every component's telemetry off (call at an entry point, before importing MLflow, Prefect, BentoML)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def _num(env: Mapping[str, str], key: str, default: float, cast: type = float) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return cast(raw)
    except ValueError:
        msg = f"environment: {key} must be a number, got {raw!r}"
        raise ConfigError(msg) from None


def _key(env: Mapping[str, str]) -> str | None:
    key = env.get("CELLSCAN_API_KEY", "").strip()
    path = env.get("CELLSCAN_API_KEY_FILE", "").strip()
    if not key and path:
        try:
            key = Path(path).read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            msg = f"environment: CELLSCAN_API_KEY_FILE {path!r} cannot be read or is empty"
            raise ConfigError(msg) from None
    return key or None


RUNTIMES = ("keras", "onnx", "tflite")


def _runtime(env: Mapping[str, str]) -> str:
    value = env.get("CELLSCAN_RUNTIME", "").strip().lower() or "keras"
    if value not in RUNTIMES:
        msg = f"environment: CELLSCAN_RUNTIME must be one of: {', '.join(RUNTIMES)}, got {value!r}"
        raise ConfigError(msg)
    return value


@dataclass(frozen=True)
class Settings:
    """Where the project, the tracking server and the orchestrator are, and the service's policy."""

    home: Path
    tracking_uri: str
    model_name: str = "cellscan"
    prefect_api_url: str | None = None
    prediction_db: str = ""  # empty: sqlite in monitor_dir (from_env fills it in)
    monitor_dir: Path = Path("monitoring")
    keep_images_days: float = 30.0
    prediction_log: bool = True
    api_key: str | None = field(default=None, repr=False)
    open_mode: bool = False
    url_allowlist: tuple[str, ...] = ()
    file_url_dir: Path | None = None
    fetch_timeout_s: float = 5.0
    fetch_max_bytes: int = 20 * 1024 * 1024
    poll_seconds: float = 10.0
    max_pending_jobs: int = 2
    job_timeout_s: float = 3600.0
    runtime: str = "keras"
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_fetches: int = 8

    @classmethod
    def from_env(cls, root: Path | str | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Read the environment once (``root`` overrides CELLSCAN_HOME)."""
        env = os.environ if env is None else env
        home = Path(root or env.get("CELLSCAN_HOME", ".")).resolve()
        fdir = env.get("CELLSCAN_FILE_URL_DIR", "").strip()
        mdir = Path(env.get("CELLSCAN_MONITOR_DIR") or home / "monitoring").resolve()
        return cls(
            home=home,
            tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
            model_name=env.get("CELLSCAN_MODEL_NAME") or "cellscan",
            prefect_api_url=env.get("PREFECT_API_URL") or None,
            prediction_db=env.get("CELLSCAN_PREDICTION_DB") or f"sqlite:///{mdir / 'predictions.db'}",
            monitor_dir=mdir,
            keep_images_days=_num(env, "CELLSCAN_KEEP_IMAGES_DAYS", 30.0),
            prediction_log=env.get("CELLSCAN_PREDICTION_LOG", "1").strip().lower() not in ("0", "false", "no"),
            api_key=_key(env),
            open_mode=env.get("CELLSCAN_OPEN", "").strip().lower() in ("1", "true", "yes"),
            url_allowlist=tuple(a.strip() for a in env.get("CELLSCAN_URL_ALLOWLIST", "").split(",") if a.strip()),
            file_url_dir=Path(fdir).resolve() if fdir else None,
            fetch_timeout_s=_num(env, "CELLSCAN_FETCH_TIMEOUT", 5.0),
            fetch_max_bytes=int(_num(env, "CELLSCAN_FETCH_MAX_BYTES", 20 * 1024 * 1024, int)),
            poll_seconds=_num(env, "CELLSCAN_POLL_SECONDS", 10.0),
            max_pending_jobs=int(_num(env, "CELLSCAN_MAX_PENDING_JOBS", 2, int)),
            job_timeout_s=_num(env, "CELLSCAN_JOB_TIMEOUT", 3600.0),
            runtime=_runtime(env),
            allowed_hosts=tuple(h.strip() for h in env.get("CELLSCAN_ALLOWED_HOSTS", "").split(",") if h.strip()),
            max_body_bytes=int(_num(env, "CELLSCAN_MAX_BODY_BYTES", 64 * 1024 * 1024, int)),
            max_image_pixels=int(_num(env, "CELLSCAN_MAX_IMAGE_PIXELS", 4096 * 4096, int)),
            max_fetches=int(_num(env, "CELLSCAN_MAX_FETCHES", 8, int)),
        )
