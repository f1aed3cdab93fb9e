"""Every setting of the backend, declared once as data: its attribute, default, environment variable and one-line
doc (`setting(...)` below). `Settings.from_env` reads the variables named here; the README's settings tables,
docker/.env.example and docker/docker-compose.yml's backend environment are checked against this declaration by
tests/test_settings_docs.py."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from trainer.inference_runtime import InferenceRuntime  # light: no torch


def _bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def setting(default, env: str, doc: str, secret: bool = False):
    """One setting: its default, the environment variable it is read from and its one-line doc; a secret is kept
    out of repr and logged only as whether it is set."""
    return field(default=default, repr=not secret, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class Settings:
    label_studio_url: str | None = setting(None, "LABEL_STUDIO_URL", "where /data/upload images and annotations live")
    label_studio_api_key: str | None = setting(None, "LABEL_STUDIO_API_KEY",
            "legacy token or personal access token (never logged)", secret=True)
    backend_url: str = setting("http://localhost:9090", "BACKEND_URL",
            "this backend as Label Studio reaches it (connect)")
    model_dir: Path = setting(Path("models"), "MODEL_DIR", "fine-tuned versions, job records, embedding cache")
    sam_model: str = setting("lite_medsam", "SAM_MODEL", "lite_medsam | mobile_sam | vit_b | vit_l | vit_h")
    sam_checkpoint: str | None = setting(None, "SAM_CHECKPOINT", "weights file (lite_medsam: shipped default)")
    sam_checkpoint_sha256: str | None = setting(None, "SAM_CHECKPOINT_SHA256", "checked before loading when set")
    device: str = setting("cpu", "DEVICE", "cpu | cuda")
    encoder_bf16: bool = setting(False, "ENCODER_BF16", "bf16 autocast for the image encoder (CPU)")
    decoder_bf16: bool = setting(False, "DECODER_BF16", "bf16 autocast for the mask decoder (CPU)")
    inference_runtime: InferenceRuntime = setting(InferenceRuntime.AUTO, "INFERENCE_RUNTIME",
            "image encoder runtime: auto (onnxruntime on a CPU, torch on CUDA or with ENCODER_BF16) | torch | "
            "onnxruntime (fp32; exported in the background at start, torch serves until then)")
    export_dir: Path | None = setting(None, "EXPORT_DIR",
            "where exported encoders are cached (default MODEL_DIR/exports; backends of a host may share one)")
    cache_mb: float = setting(512.0, "EMBEDDING_CACHE_MB", "in-memory embedding cache bound")
    disk_cache: bool = setting(True, "EMBEDDING_DISK_CACHE", "also keep embeddings under MODEL_DIR")
    disk_cache_mb: float = setting(8192.0, "EMBEDDING_DISK_CACHE_MB", "disk embedding cache bound (LRU by last use)")
    predict_deadline_s: float = setting(75.0, "PREDICT_DEADLINE_S",
            "time budget of one /predict, below Label Studio's ML_TIMEOUT_PREDICT (default 100)")
    predict_concurrency: int = setting(2, "PREDICT_CONCURRENCY", "tasks a worker computes at once (editor calls first)")
    encoder_batch: int = setting(0, "ENCODER_BATCH",
            "images per encoder forward in pre-warm and bulk jobs (0: 8 on CUDA, 1 on CPU)")
    prefetch_images: int = setting(4, "PREFETCH_IMAGES", "decoded images in flight per /predict call")
    prewarm: bool = setting(True, "PREWARM", "embed deferred and newly imported tasks' images in the background")
    prewarm_queue: int = setting(20000, "PREWARM_QUEUE", "images waiting to be pre-warmed, at most")
    torch_threads: int = setting(0, "TORCH_THREADS", "intra-op threads per worker (0 = torch default)")
    image_timeout_s: float = setting(15.0, "IMAGE_TIMEOUT_S", "per image download")
    max_image_pixels: int = setting(40_000_000, "MAX_IMAGE_PIXELS", "larger images are refused")
    max_image_bytes: int = setting(64 * 1024 * 1024, "MAX_IMAGE_BYTES", "larger image downloads are refused")
    allowed_image_hosts: str = setting("", "ALLOWED_IMAGE_HOSTS",
            "comma-separated hosts besides Label Studio's for http(s) image URLs (name, name:port, *.example.com)")
    allow_private_image_hosts: bool = setting(False, "ALLOW_PRIVATE_IMAGE_HOSTS",
            "allow-listed hosts may be loopback/private/CGNAT")
    basic_auth_user: str | None = setting(None, "BASIC_AUTH_USER",
            "with BASIC_AUTH_PASS, HTTP basic auth on all routes but /health")
    basic_auth_pass: str | None = setting(None, "BASIC_AUTH_PASS",
            "with BASIC_AUTH_USER, the basic auth password (never logged)", secret=True)
    auth_token: str | None = setting(None, "AUTH_TOKEN",
            'require "Authorization: Bearer <token>" on all routes but /health (never logged)', secret=True)
    max_tasks: int = setting(100_000, "MAX_TASKS_PER_REQUEST",
            "a whole Data-Manager selection (the deadline defers the rest)")
    max_boxes: int = setting(500, "MAX_BOXES_PER_TASK", "boxes in one task")
    max_clicks: int = setting(100, "MAX_CLICKS_PER_TASK", "keypoints in one interactive prompt")
    max_body_mb: float = setting(128.0, "MAX_BODY_MB", "request body limit (10,000 tasks with boxes: ~30 MB)")
    log_level: str = setting("INFO", "LOG_LEVEL", "DEBUG | INFO | WARNING | ERROR")
    log_format: str = setting("json", "LOG_FORMAT", "json (one object per line) | text (for people)")
    bind: str | None = setting(None, "BIND", "gunicorn's address (host:port); default: see `listen`")
    port: int = setting(9090, "PORT", "the port when BIND is not set")
    workers: int = setting(1, "WORKERS", "gunicorn worker processes (each loads the model)")
    threads: int = setting(16, "THREADS", "per worker (cheap: PREDICT_CONCURRENCY bounds the compute)")
    worker_timeout_s: int = setting(300, "TIMEOUT", "gunicorn's worker timeout (Label Studio waits <= 100 s)")
    redis_url: str | None = setting(None, "REDIS_URL", "run training jobs on RQ workers instead of embedded")
    training_runner: str = setting("auto", "TRAINING_RUNNER", "auto | embedded | worker | rq | off")
    training_concurrency: int = setting(1, "TRAINING_CONCURRENCY",
            "jobs run at once on a host, across projects (one per project)")
    training_lock_ttl_s: float = setting(60.0, "TRAINING_LOCK_TTL_S",
            "with REDIS_URL, a project lock expires this long after its worker stops renewing it")
    min_annotations: int = setting(10, "MIN_ANNOTATIONS", "new completed annotations that start a job")
    train_debounce_s: float = setting(30.0, "TRAIN_DEBOUNCE_S", "quiet time after the last annotation event")
    train_epochs: int = setting(8, "TRAIN_EPOCHS", "fine-tuning epochs per job")
    train_objects_per_image: int = setting(4, "TRAIN_OBJECTS_PER_IMAGE", "objects per image per epoch")
    prelabel_on_promote: bool = setting(False, "PRELABEL_ON_PROMOTE",
            "pre-label the whole project after a version is promoted")
    promotion_margin: float = setting(0.005, "PROMOTION_MARGIN",
            "gate-set mIoU a new version must gain over the active one (95 % lower bound); negative: always")
    keep_versions: int = setting(5, "KEEP_VERSIONS", "newest versions kept (plus the active one)")

    @property
    def runner(self) -> str:
        """Who runs training jobs: embedded (a thread in each backend worker), worker (a separate
        `python -m ml_backend worker` process), rq (RQ workers on REDIS_URL) or off."""
        if self.training_runner != "auto":
            return self.training_runner
        return "rq" if self.redis_url else "embedded"

    @property
    def auth_required(self) -> bool:
        """Every route but /health asks for credentials (BASIC_AUTH_USER + _PASS, or AUTH_TOKEN)."""
        return bool((self.basic_auth_user and self.basic_auth_pass) or self.auth_token)

    @property
    def listen(self) -> str:
        """Where gunicorn listens: BIND if set; else PORT on 127.0.0.1 (this host only) while the backend asks for
        no credentials, on 0.0.0.0 (every interface) once it does. The docker image sets BIND=0.0.0.0:9090."""
        if self.bind:
            return self.bind
        return f"{'0.0.0.0' if self.auth_required else '127.0.0.1'}:{self.port}"

    def loggable(self) -> dict:
        """Every setting for the start line: secrets only as whether they are set."""
        values = {}
        for declared in fields(self):
            value = getattr(self, declared.name)
            if not declared.repr:  # the secrets (secret=True): LABEL_STUDIO_API_KEY, BASIC_AUTH_PASS, AUTH_TOKEN
                value = value is not None
            values[declared.name] = str(value) if isinstance(value, Path) else value
        return values

    @property
    def exports(self) -> Path:
        """EXPORT_DIR, or MODEL_DIR/exports."""
        return Path(self.export_dir) if self.export_dir else Path(self.model_dir) / "exports"

    @property
    def encoder_batch_size(self) -> int:
        if self.encoder_batch > 0:
            return self.encoder_batch
        return 8 if self.device.startswith("cuda") else 1

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values = {}
        for declared in fields(cls):
            name = declared.metadata["env"]
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            kind = type(declared.default) if declared.default is not None else str
            try:
                values[declared.name] = (_bool(raw) if kind is bool else Path(raw) if isinstance(declared.default, Path)
                                         else kind(raw))
            except ValueError as exc:
                raise SystemExit(f"setting {name}={raw!r} is invalid: {exc}")
        return cls(**values)

    @classmethod
    def declared(cls) -> dict[str, tuple[str, object, str]]:
        """Environment variable -> (attribute, default, doc), in declaration order."""
        return {f.metadata["env"]: (f.name, f.default, f.metadata["doc"]) for f in fields(cls)}
