"""Model runtime, fine-tuning, checkpoint registry and training jobs for the SAM backend.

The core: no HTTP, no network, no Label Studio JSON (ml_backend/ converts at the edge). Its public names:
"""
from .active import ActiveDecoders, ServedDecoder
from .calibration import Calibration, fit_calibration
from .cache import DiskEmbeddings, EmbeddingCache, image_key
from .data import DataError, Dataset, ImageSamples, Sample, assign_splits, dataset_summary, held_out_sets, load_coco
from .decoder import decoder_copy
from .files import write_atomic
from .finetune import (FineTuneConfig, ObjectResult, TrainingEmbeddings, evaluate, evaluate_objects, fine_tune, make_loss,
                       train_and_register)
from .images import MAX_PIXELS, decode_image
from .losses import LOSSES, SeedMSELoss, WindowDiceLoss
from .jobs import Dispatcher, Job, JobStore, TriggerPolicy, project_lock, run_job
from .models import VARIANTS, LoadedModel, ModelLoadError, load_model
from .quality import MaskQuality, expected_iou, measure_quality, task_score
from .registry import PROJECT_NAME, Registry, RegistryError
from .runtime import BASE_VERSION, Segmenter
from .score_metrics import score_report
from .types import Box, Embedding, Mask, Point, Prompts

__all__ = [
    "ActiveDecoders", "ServedDecoder", "DiskEmbeddings", "EmbeddingCache", "image_key", "DataError", "Dataset",
    "ImageSamples", "Sample", "assign_splits", "dataset_summary", "load_coco", "decoder_copy", "write_atomic",
    "LOSSES", "SeedMSELoss", "WindowDiceLoss", "make_loss", "FineTuneConfig", "TrainingEmbeddings", "evaluate", "fine_tune", "train_and_register", "MAX_PIXELS",
    "decode_image", "Dispatcher", "Job", "JobStore", "TriggerPolicy", "project_lock", "run_job", "VARIANTS",
    "LoadedModel", "ModelLoadError", "load_model", "PROJECT_NAME", "Registry", "RegistryError", "BASE_VERSION",
    "Segmenter", "Box", "Embedding", "Mask", "Point", "Prompts", "Calibration", "fit_calibration", "held_out_sets",
    "ObjectResult", "evaluate_objects", "MaskQuality", "expected_iou", "measure_quality", "score_report", "task_score",
]
