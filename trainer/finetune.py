"""Decoder-only fine-tuning of SAM on box-prompted masks, evaluation, and the gated registry write.

Image and prompt encoders stay frozen; each image is encoded once (the embedding goes to the disk cache that
serving reads, under the same key) and reused every epoch. Only a copy of the mask decoder is trained, through
the same windowed forward that serves masks (`decoder.window_logits`).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from segment_anything.modeling import MaskDecoder

from .calibration import Calibration, fit_calibration
from .cache import DiskEmbeddings, EmbeddingCache, image_key
from .data import DataError, Dataset, ImageSamples, Sample, held_out_sets
from .decoder import UPSCALE, decoder_copy, prepare_image, window_logits
from .evidence import GATE_IMAGES_WANTED, MIN_GATE_IMAGES, MIN_GATE_OBJECTS, measure, promotion_decision
from .losses import LOSSES, SeedMSELoss, WindowDiceLoss
from .quality import MaskQuality
from .registry import Registry, RegistryError
from .runtime import BASE_VERSION, Segmenter
from .score_metrics import score_report
from .types import Box, Embedding, Prompts

log = logging.getLogger(__name__)

SIZES = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, float("inf")))


@dataclass
class FineTuneConfig:
    """Hyper-parameters; all of them go into the version's manifest."""

    epochs: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    loss: str = "dice-bce"  # Dice + BCE + IoU-head MSE; dice-focal: focal instead of BCE; seed-mse: the popular recipe
    iou_loss_weight: float = 1.0
    max_objects_per_image: int = 4  # per epoch
    max_objects_per_epoch: int = 2048
    max_val_objects: int = 1000
    box_jitter: float = 0.05  # each box side moves by up to this fraction of the box's size
    patience: int = 3  # epochs without a better val mIoU before stopping
    seed: int = 0
    margin: float = 0.005  # the gate's mIoU gain must exceed this with 95 % confidence (trainer/evidence.py)
    min_gate_objects: int = MIN_GATE_OBJECTS  # fewer gate objects (or images): kept, never promoted
    min_gate_images: int = MIN_GATE_IMAGES


class TrainingEmbeddings:
    """Image embeddings for training, from the disk cache serving uses (same key), computed once when missing.

    recompute=True bypasses every cache (to measure what caching saves).
    """

    def __init__(self, segmenter: Segmenter, disk: DiskEmbeddings | None, max_mb: float = 2048,
                 recompute: bool = False) -> None:
        self.segmenter = segmenter
        self.cache = EmbeddingCache(max_mb, disk)
        self.recompute = recompute
        self._keys: dict[str, str] = {}
        self.computed = 0

    def get(self, image: ImageSamples) -> Embedding:
        if self.recompute:
            self.computed += 1
            return self.segmenter.embed(image.load_image())
        pixels = None
        key = self._keys.get(image.image_id)
        if key is None:
            pixels = image.load_image()
            key = self._keys[image.image_id] = image_key(self.segmenter.encoder_identity, pixels)

        def compute() -> Embedding:
            self.computed += 1
            return self.segmenter.embed(pixels if pixels is not None else image.load_image())

        return self.cache.get_or_compute(key, compute)[0]


# -- geometry ---------------------------------------------------------------------------------------------
def input_boxes(boxes: list[Box], embedding: Embedding) -> torch.Tensor:
    """Boxes in original pixels -> (B, 4) in the model's input frame, on the embedding's device."""
    return torch.tensor([embedding.box_to_input(b) for b in boxes], dtype=torch.float32,
                        device=embedding.features.device)


def low_res_target(sample: Sample, embedding: Embedding, low_res: int = 256) -> torch.Tensor:
    """The GT mask in the decoder's low-res frame: (low_res, low_res) float in [0, 1] (area-averaged)."""
    new_h, new_w = embedding.resized_size
    size = embedding.input_size
    mask = cv2.resize(sample.mask.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA)
    frame = np.zeros((size, size), dtype=np.float32)
    frame[:new_h, :new_w] = mask
    if size != low_res:
        frame = cv2.resize(frame, (low_res, low_res), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(frame)


def jitter(box: Box, rng: np.random.Generator, fraction: float, width: int, height: int) -> Box:
    """Move each side by up to fraction of the box's width/height (uniform), clipped to the image."""
    if fraction <= 0:
        return box
    w, h = box.x1 - box.x0, box.y1 - box.y0
    dx0, dy0, dx1, dy1 = rng.uniform(-fraction, fraction, 4) * np.array([w, h, w, h])
    moved = Box(box.x0 + dx0, box.y0 + dy0, box.x1 + dx1, box.y1 + dy1, box.label).clipped(width, height)
    return box if moved.is_empty else moved


def sam_forward(segmenter: Segmenter, decoder: MaskDecoder, embedding: Embedding,
                boxes: list[Box]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's own decoder forward, as the popular recipe runs it: -> low-res logits (B, 1, 256, 256), IoU (B, 1)."""
    prompt_encoder = segmenter.model.sam.prompt_encoder
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=None, boxes=input_boxes(boxes, embedding), masks=None)
        image_pe = prompt_encoder.get_dense_pe()
    return decoder(image_embeddings=embedding.features, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                   dense_prompt_embeddings=dense, multimask_output=False)


def window_forward(segmenter: Segmenter, decoder: MaskDecoder, embedding: Embedding,
                   boxes: list[Box]) -> tuple[list[torch.Tensor], torch.Tensor, list[tuple[int, int, int, int]]]:
    """The serving decoder path, differentiable: per box, logits on its window of the low-res frame (serving
    predicts background outside it), the predicted IoUs (B,), and the windows (y0, x0, y1, x1) in low-res pixels.
    """
    prompt_encoder = segmenter.model.sam.prompt_encoder
    with torch.no_grad():
        sparse, _ = prompt_encoder(points=None, boxes=input_boxes(boxes, embedding), masks=None)
    image = prepare_image(decoder, prompt_encoder, embedding.features)
    grid_windows = [segmenter.grid_window(embedding, box, ()) for box in boxes]
    logits, iou = window_logits(decoder, image, sparse, grid_windows)
    return logits, iou, [tuple(UPSCALE * v for v in window) for window in grid_windows]


def make_loss(config: FineTuneConfig) -> WindowDiceLoss | SeedMSELoss:
    """The loss object config.loss names, with config's IoU-head weight."""
    loss = LOSSES[config.loss]
    return replace(loss, iou_weight=config.iou_loss_weight) if isinstance(loss, WindowDiceLoss) else loss


def sample_loss(segmenter: Segmenter, decoder: MaskDecoder, embedding: Embedding, samples: list[Sample],
                boxes: list[Box], loss: WindowDiceLoss | SeedMSELoss) -> torch.Tensor:
    """The training loss of some objects of one image, prompted with the given (jittered) boxes."""
    embedding = embedding.to(segmenter.model.device)
    if not loss.on_windows:
        logits, _ = sam_forward(segmenter, decoder, embedding, boxes)
        return loss(logits, embedding, [s.mask for s in samples])
    logits, iou_pred, windows = window_forward(segmenter, decoder, embedding, boxes)
    low_res = UPSCALE * embedding.features.shape[-1]
    targets = [low_res_target(s, embedding, low_res).to(embedding.features.device) for s in samples]
    return loss(logits, iou_pred, targets, windows)


# -- evaluation -------------------------------------------------------------------------------------------
def size_class(area: int) -> str:
    return next(name for name, low, high in SIZES if low <= area < high)


@dataclass(frozen=True)
class ObjectResult:
    """One evaluated object: its image, label, size class, the served score, the true IoU, the score's signals."""

    image_id: str
    label: str
    size: str
    score: float
    iou: float
    quality: MaskQuality | None = None


def evaluate_objects(segmenter: Segmenter, embeddings: TrainingEmbeddings, images: list[ImageSamples],
                     decoder: MaskDecoder | None = None, max_objects: int | None = None,
                     calibration: Calibration | None = None) -> list[ObjectResult]:
    """Every object box-prompted through the serving path (`Segmenter.decode`): its score and true IoU."""
    results: list[ObjectResult] = []
    for image in images:
        samples = image.samples
        if max_objects is not None:
            samples = samples[: max(0, max_objects - len(results))]
        if not samples:
            break
        embedding = embeddings.get(image)
        masks = segmenter.decode(embedding, Prompts(boxes=tuple(s.box for s in samples)), decoder, calibration)
        for sample, mask in zip(samples, masks):
            pred, truth = mask.full(), sample.mask
            union = np.logical_or(pred, truth).sum()
            iou = float(np.logical_and(pred, truth).sum() / union) if union else 1.0
            results.append(ObjectResult(image.image_id, sample.label, size_class(sample.area), mask.score, iou,
                                        mask.quality))
    return results


def evaluate(segmenter: Segmenter, embeddings: TrainingEmbeddings, images: list[ImageSamples],
             decoder: MaskDecoder | None = None, max_objects: int | None = None,
             calibration: Calibration | None = None) -> dict:
    """Box-prompted mIoU through the serving path, per label and per object size, and how well the scores
    rank and predict the IoUs (`score_metrics.score_report`)."""
    return summarise(evaluate_objects(segmenter, embeddings, images, decoder, max_objects, calibration))


def mean_iou(ious: list[float]) -> float | None:
    return round(float(np.mean(ious)), 5) if ious else None


def summarise(objects: list[ObjectResult]) -> dict:
    def group(rows: list[float]) -> dict:
        return {"miou": mean_iou(rows), "n_objects": len(rows)}

    ious = [o.iou for o in objects]
    return {**group(ious),
            "per_label": {label: group([o.iou for o in objects if o.label == label])
                          for label in sorted({o.label for o in objects})},
            "by_size": {name: group([o.iou for o in objects if o.size == name]) for name, _, _ in SIZES},
            "score": score_report([o.image_id for o in objects], [o.score for o in objects], ious)}


# -- training ---------------------------------------------------------------------------------------------
@dataclass
class FineTuneResult:
    state: dict[str, torch.Tensor]  # the best epoch's decoder weights
    val_miou_start: float | None  # the starting decoder's val mIoU (epoch 0)
    val_miou_best: float | None
    best_epoch: int
    curves: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_miou, objects, seconds
    val_objects: list[ObjectResult] = field(default_factory=list)  # the best epoch's early-stopping set, scored


def epoch_plan(images: list[ImageSamples], config: FineTuneConfig, epoch: int) -> list[tuple[ImageSamples, list[int]]]:
    """Seeded: shuffled images, up to max_objects_per_image random objects each, max_objects_per_epoch in all."""
    rng = np.random.default_rng([config.seed, epoch])
    plan, total = [], 0
    for index in rng.permutation(len(images)):
        image = images[index]
        k = min(config.max_objects_per_image, len(image.samples), config.max_objects_per_epoch - total)
        if k <= 0:
            break
        plan.append((image, sorted(rng.choice(len(image.samples), k, replace=False).tolist())))
        total += k
    return plan


def fine_tune(segmenter: Segmenter, dataset: Dataset, embeddings: TrainingEmbeddings, config: FineTuneConfig,
              start_state: dict[str, torch.Tensor] | None = None, progress: bool = True,
              loss: WindowDiceLoss | SeedMSELoss | None = None) -> FineTuneResult:
    """Train a copy of the mask decoder on the train split; early-stop on the mIoU of the held-out images set apart
    for it (`held_out_sets`; "val" in the curves), keep the best epoch.
    loss: a loss object (trainer.losses); default: the one config.loss names."""
    from tqdm import tqdm

    if loss is None and config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(LOSSES)}")
    loss_fn = loss or make_loss(config)
    torch.manual_seed(config.seed)
    train, (val, _) = dataset.split("train"), held_out_sets(dataset.images, config.min_gate_objects,
                                                            config.min_gate_images, GATE_IMAGES_WANTED)
    if not train:
        raise DataError("no training images (the train split is empty)")
    decoder = decoder_copy(segmenter.model.sam.mask_decoder, start_state, trainable=True)
    # fused: one kernel per tensor; the per-op loop costs ~1.7 s a step on a busy 2-core machine
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)

    def val_objects() -> list[ObjectResult]:
        return evaluate_objects(segmenter, embeddings, val, decoder_copy(decoder), config.max_val_objects)

    def miou(objects: list[ObjectResult]) -> float | None:
        return mean_iou([o.iou for o in objects])

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in decoder.state_dict().items()}

    start = miou(val_objects())
    best = FineTuneResult(snapshot(), start, None, 0)
    log.info("epoch", extra={"epoch": 0, "epochs": config.epochs, "val_miou": start})  # the starting decoder
    for epoch in range(1, config.epochs + 1):
        began, losses, rng = time.perf_counter(), [], np.random.default_rng([config.seed, epoch, 1])
        plan = epoch_plan(train, config, epoch)
        for image, picks in tqdm(plan, desc=f"epoch {epoch}/{config.epochs}", disable=not progress,
                                 file=sys.stderr, leave=False):
            embedding = embeddings.get(image)
            samples = [image.samples[i] for i in picks]
            height, width = embedding.original_size
            boxes = [jitter(s.box, rng, config.box_jitter, width, height) for s in samples]
            value = sample_loss(segmenter, decoder, embedding, samples, boxes, loss_fn)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            losses.append(value.item())
        trained = time.perf_counter() - began
        objects = val_objects()
        epoch_miou = miou(objects)
        best.curves.append({"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5), "val_miou": epoch_miou,
                            "objects": sum(len(p) for _, p in plan), "train_seconds": round(trained, 2),
                            "seconds": round(time.perf_counter() - began, 2)})
        log.info("epoch", extra={"epochs": config.epochs, **best.curves[-1]})
        if epoch_miou is None or best.best_epoch == 0 or epoch_miou > best.val_miou_best:  # no val: the last epoch
            best.state, best.val_miou_best, best.best_epoch = snapshot(), epoch_miou, epoch
            best.val_objects = objects
        elif epoch - best.best_epoch >= config.patience and epoch < config.epochs:
            log.info("early stop", extra={"epoch": epoch, "best_epoch": best.best_epoch})  # no better val mIoU since
            break
    return best


# -- gated registry write -----------------------------------------------------------------------------------
def train_and_register(segmenter: Segmenter, dataset: Dataset, registry: Registry, model_dir: Path | str,
                       config: FineTuneConfig, progress: bool = True) -> dict:
    """Fine-tune from the active version (or base), write a new version always, activate it if it wins, prune.

    The held-out images split in two (`held_out_sets`): one picks the best epoch and fits the score's
    recalibration, the other (the gate set) alone decides promotion and measures the calibrated score.
    Returns the report (version, promoted, reason, gate and early-stopping mIoUs, gate score metrics, ...).
    """
    began = time.perf_counter()
    model = segmenter.model
    parent, start_state, start_calibration = registry.active(), None, None
    if parent is not None:
        try:
            registry.check_base_model(parent, model.identity)
            start_state = registry.load_decoder(parent)
            start_calibration = Calibration.from_dict(registry.manifest(parent).get("calibration"))
        except RegistryError:
            log.warning("active version %s was trained on another base model: comparing with base", parent)
            parent = None
    embeddings = TrainingEmbeddings(segmenter, DiskEmbeddings(Path(model_dir) / "embeddings"))
    result = fine_tune(segmenter, dataset, embeddings, config, start_state, progress)
    early_stop, gate_images = held_out_sets(dataset.images, config.min_gate_objects, config.min_gate_images,
                                            GATE_IMAGES_WANTED)
    new_decoder = segmenter.fine_tuned_decoder(result.state)
    fitted = result.val_objects  # the early-stopping set, scored by the best epoch's decoder
    calibration = fit_calibration(np.array([o.score for o in fitted]), np.array([o.iou for o in fitted]))
    current_decoder = segmenter.fine_tuned_decoder(start_state) if start_state is not None else None
    current_objects = evaluate_objects(segmenter, embeddings, gate_images, current_decoder, config.max_val_objects,
                                       start_calibration)
    gate_current = summarise(current_objects)
    gate_objects = evaluate_objects(segmenter, embeddings, gate_images, new_decoder, config.max_val_objects)
    gate_new = summarise([replace(o, score=calibration(o.score)) for o in gate_objects] if calibration
                         else gate_objects)
    compared = parent or BASE_VERSION
    evidence = measure([o.iou for o in gate_objects], [o.iou for o in current_objects],
                       [o.image_id for o in gate_objects])  # the same objects in the same order: paired
    promoted, reason = promotion_decision(evidence, config.margin, compared, config.min_gate_objects,
                                          config.min_gate_images)
    metrics = {"gate_miou_current": gate_current["miou"], "gate_miou_new": gate_new["miou"], "compared_with": compared,
               "gate_images": len(gate_images), "gate_objects": gate_new["n_objects"], **evidence.as_dict(),
               "early_stop_images": len(early_stop), "early_stop_miou_start": result.val_miou_start,
               "early_stop_miou_best": result.val_miou_best, "best_epoch": result.best_epoch,
               "epochs_run": len(result.curves), "gate_score": gate_new["score"],
               "gate_score_uncalibrated": summarise(gate_objects)["score"] if calibration else gate_new["score"],
               "gate_score_current": gate_current["score"], "curves": result.curves,
               "embeddings_computed": embeddings.computed, "seconds": round(time.perf_counter() - began, 1)}
    manifest = {"base_model": {"identity": model.identity, "variant": model.variant,
                               "weights_sha256": model.weights_sha256, "input_size": model.input_size},
                "parent": parent, "data": dataset.summary, "hyperparameters": asdict(config), "metrics": metrics,
                "calibration": calibration.as_dict() if calibration else None, "promoted": promoted,
                "reason": reason}
    version = registry.write_version(result.state, manifest)
    if promoted:
        registry.activate(version)
    pruned = registry.prune()
    log.info("version written", extra={"version": version, "promoted": promoted, "reason": reason,
                                       "gate_images": evidence.images, "gate_objects": evidence.objects,
                                       **evidence.as_dict()})
    return {"version": version, "promoted": promoted, "reason": reason, "active": registry.active(),
            "model_version": segmenter.model_version(registry.active() or BASE_VERSION), "pruned": pruned,
            "calibrated": calibration is not None, **{k: v for k, v in metrics.items() if k != "curves"},
            "curves": result.curves}
