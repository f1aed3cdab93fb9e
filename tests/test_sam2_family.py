"""SAM 2.1 behind the family seam against transformers' own Sam2 pipeline, on identical tiny random weights.

The checkpoint is written as a user has it: the Hugging Face model directory (config.json + model.safetensors of the
video model, `save_pretrained`). The reference loads it with `Sam2Model.from_pretrained`, prepares inputs with
`Sam2Processor`, runs the model's forward (single mask) and `post_process_masks`; ours is the split `embed` +
`decode` with `Frame`'s mapping. Random weights: what is compared is the computation, not mask quality.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference loads the local directory; never the hub

from trainer.families import DecodeRequest, FamilyLoadError  # noqa: E402
from trainer.families import sam2 as sam2_family  # noqa: E402
from trainer.images import decode_image  # noqa: E402
from trainer.types import Box, Point  # noqa: E402

TINY = dict(backbone={"hidden_size": 16, "embed_dim_per_stage": [16, 32, 64, 128],
                      "num_attention_heads_per_stage": [1, 1, 2, 2], "blocks_per_stage": [1, 1, 2, 1],
                      "global_attention_blocks": [3]},
            vision={"fpn_hidden_size": 32}, prompt_encoder={"hidden_size": 32},
            mask_decoder={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32})
VIDEO = dict(memory_attention_hidden_size=32, memory_attention_num_layers=1,
             memory_attention_feed_forward_hidden_size=64, memory_encoder_hidden_size=32,
             memory_encoder_output_channels=16, mask_downsampler_embed_dim=32, memory_fuser_embed_dim=32,
             memory_fuser_intermediate_dim=64)
VARIANT = sam2_family.Sam2Variant("sam2.1_test_tiny", "2.1", hf_repo="a tiny test model", **TINY)
LOGIT_ATOL = 1e-4  # logits here span about +-2
IOU_ATOL = 1e-5


def write_model_dir(path, generation: str = "2.1", backbone: dict | None = None, seed: int = 0):
    """A random-weight SAM 2 / 2.1 video model saved as the Hugging Face repository lays it out."""
    from transformers import Sam2VideoConfig, Sam2VideoModel

    vision = {"backbone_config": {"model_type": "sam2_hiera_det_model", **(backbone or TINY["backbone"])},
              "backbone_channel_list": list(reversed((backbone or TINY["backbone"])["embed_dim_per_stage"])),
              **TINY["vision"]}
    newer = generation == "2.1"
    config = Sam2VideoConfig(vision_config=vision, prompt_encoder_config=TINY["prompt_encoder"],
                             mask_decoder_config=TINY["mask_decoder"], enable_occlusion_spatial_embedding=newer,
                             enable_temporal_pos_encoding_for_object_pointers=newer, **VIDEO)
    torch.manual_seed(seed)  # buffers (the prompt encoder's random Fourier features) come from the global generator
    model = Sam2VideoModel(config)
    randomize(model, seed)
    model.save_pretrained(path)
    return path


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random at a scale that keeps activations O(1) (fan-in scaled weights, norms near 1): the
    library's init leaves some tensors constant, and its small scales give logits of +-0.03 that hide errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.ndim >= 2:
                tensor.copy_(noise / math.sqrt(tensor[0].numel()))
            else:
                tensor.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("sam2.1-hiera-test"))


@pytest.fixture(scope="module")
def family(model_dir):
    return sam2_family.load(VARIANT, model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import Sam2ImageProcessor, Sam2Model, Sam2Processor

    model = Sam2Model.from_pretrained(model_dir).eval()
    return model, Sam2Processor(image_processor=Sam2ImageProcessor())


def textured(height: int, width: int, seed: int = 1) -> np.ndarray:
    """An RGB uint8 image with smooth regions and edges (random pixels would make every logit noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 255 / width), (y * 255 / height), ((x + y) % 97) * 2.6], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(15, 60)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return image.astype(np.uint8)


def exif_rotated(height: int, width: int) -> np.ndarray:
    """A JPEG stored sideways with EXIF orientation 6, decoded as Label Studio shows it."""
    stored = Image.fromarray(textured(width, height, seed=2))  # stored (width x height), shown rotated
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    image = decode_image(buffer.getvalue(), max_pixels=10_000_000)
    assert image.shape[:2] == (height, width)
    return image


@pytest.fixture(scope="module", params=["odd", "exif"])
def encoded(request, family, reference):
    """An odd-sized image (or an EXIF-rotated photo), our embedding of it and the library's: they must agree."""
    model, processor = reference
    image = textured(333, 517) if request.param == "odd" else exif_rotated(333, 517)
    inputs = processor(images=image, return_tensors="pt")
    torch.testing.assert_close(family.preprocess([image]), inputs["pixel_values"], atol=1e-5, rtol=0)
    embedding = family.embed(image)
    with torch.no_grad():
        s0, s1, features = model.get_image_embeddings(inputs["pixel_values"])
    for name, theirs in (("features", features), ("high_res_s1", s1), ("high_res_s0", s0)):
        torch.testing.assert_close(embedding.maps[name], theirs, atol=1e-5, rtol=1e-5)
    return image, embedding, [s0, s1, features], inputs["original_sizes"]


def reference_forward(reference, encoded, boxes=None, points=None, labels=None, mask=None):
    """transformers' pipeline on the library's own embedding: processor (prompts) -> Sam2Model.forward (one mask
    per prompt) -> post_process_masks. -> low-res logits (N, 256, 256), IoUs (N,), masks (N, H, W)."""
    model, processor = reference
    _, _, image_embeddings, original_sizes = encoded
    inputs = processor(original_sizes=original_sizes, input_boxes=boxes, input_points=points, input_labels=labels,
                       return_tensors="pt")
    extra = {"input_masks": mask[None, None]} if mask is not None else {}
    with torch.no_grad():
        out = model(image_embeddings=image_embeddings, multimask_output=False, **extra,
                    **{k: v for k, v in inputs.items() if k != "original_sizes"})
    full = processor.post_process_masks(out.pred_masks, original_sizes)[0]
    return out.pred_masks[0, :, 0], out.iou_scores[0, :, 0], full[:, 0].numpy()


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def assert_matches(embedding, results, reference_output):
    ref_logits, ref_iou, ref_masks = reference_output
    assert len(results) == len(ref_logits)
    for i, result in enumerate(results):
        assert result.logits.shape == (256, 256) and (result.y0, result.x0) == (0, 0)
        torch.testing.assert_close(result.logits, ref_logits[i], atol=LOGIT_ATOL, rtol=0)
        assert result.iou == pytest.approx(float(ref_iou[i]), abs=IOU_ATOL)
        crop, top, left = embedding.frame.low_res_to_original(result.logits)
        assert (top, left) == (0, 0) and crop.shape == ref_masks[i].shape
        ours = (crop > 0).numpy()
        assert ours.any() and not ours.all(), "a degenerate mask would prove nothing"
        assert mask_iou(ours, ref_masks[i]) >= 0.99


@pytest.mark.parametrize("threshold", [0.0, 1.01], ids=["token0", "multimask-fallback"])
def test_decode_matches_transformers(family, reference, encoded, threshold, monkeypatch):
    """Boxes, clicks (positive and negative), box + click, and the previous logits as mask input, under both of the
    library's single-mask choices (the stability threshold forces one: 0 keeps token 0, above 1 always falls back
    to the best multimask output)."""
    for decoder in (family.base_decoder, reference[0].mask_decoder):
        monkeypatch.setattr(decoder, "dynamic_multimask_stability_thresh", threshold)
    image, embedding, _, _ = encoded
    assert embedding.frame.original_size == image.shape[:2] == (333, 517)
    assert embedding.frame.resized_size == (1024, 1024)
    assert {k: tuple(v.shape) for k, v in embedding.maps.items()} == {
        "features": (1, 32, 64, 64), "high_res_s1": (1, 8, 128, 128), "high_res_s0": (1, 4, 256, 256)}
    assert embedding.nbytes == 4 * 32 * (64 * 64 + 128 * 128 // 4 + 256 * 256 // 8)

    boxes = [Box(40, 30, 200, 180), Box(300.5, 100, 510, 320), Box(0, 0, 517, 333)]
    assert_matches(embedding, family.decode(embedding, [DecodeRequest(box=b) for b in boxes]),
                   reference_forward(reference, encoded, boxes=[[[b.x0, b.y0, b.x1, b.y1] for b in boxes]]))

    clicks = (Point(120, 100), Point(400, 250, positive=False))
    assert_matches(embedding, family.decode(embedding, [DecodeRequest(points=clicks)]),
                   reference_forward(reference, encoded, points=[[[[p.x, p.y] for p in clicks]]], labels=[[[1, 0]]]))

    box, click = boxes[1], Point(420, 200)
    prompts = dict(boxes=[[[box.x0, box.y0, box.x1, box.y1]]], points=[[[[click.x, click.y]]]], labels=[[[1]]])
    (refined,) = family.decode(embedding, [DecodeRequest(box=box, points=(click,))])
    assert_matches(embedding, [refined], reference_forward(reference, encoded, **prompts))

    previous = refined.logits  # the interactive loop: the last low-res logits go back in as the mask prompt
    (again,) = family.decode(embedding, [DecodeRequest(box=box, points=(click,), mask_input=previous)])
    assert_matches(embedding, [again], reference_forward(reference, encoded, mask=previous, **prompts))
    assert not torch.allclose(again.logits, refined.logits), "the mask input must change the result"


def test_windows_and_batches_compute_the_same_logits(family):
    """A window computes exactly the cells of the full frame it covers; a batch of boxes equals one at a time."""
    image = textured(333, 517)
    embedding = family.embed(image)
    decoder = family.decoder_copy()
    decoder.dynamic_multimask_via_stability = False  # the fallback's stability is measured on what is computed
    boxes = [Box(40, 30, 200, 180), Box(300, 100, 510, 320)]
    full = family.decode(embedding, [DecodeRequest(box=b) for b in boxes], decoder)
    windowed = family.decode(embedding, [DecodeRequest(box=b, window=embedding.frame.grid_window(b))
                                         for b in boxes], decoder)
    alone = family.decode(embedding, [DecodeRequest(box=boxes[1])], decoder)
    for whole, part in zip(full, windowed):
        assert part.logits.shape[0] < 256 and part.logits.shape[1] < 256
        h, w = part.logits.shape
        torch.testing.assert_close(part.logits, whole.logits[part.y0:part.y0 + h, part.x0:part.x0 + w],
                                   atol=1e-4, rtol=1e-4)
        assert part.iou == pytest.approx(whole.iou, abs=1e-5)
    torch.testing.assert_close(alone[0].logits, full[1].logits, atol=1e-4, rtol=1e-4)


def test_fine_tuning_trains_the_decoder_only(family):
    """Gradients reach the decoder's trainable parameters through the windowed decode; conv_s0/conv_s1 (applied at
    embed time, cached) stay frozen; a saved state loads back strictly and is refused by another base model."""
    embedding = family.embed(textured(200, 300))
    decoder = family.decoder_copy(trainable=True)
    box = Box(20, 20, 150, 120)
    (out,) = family.decode(embedding, [DecodeRequest(box=box, window=embedding.frame.grid_window(box))], decoder)
    (out.logits.sigmoid().mean() + out.predicted_iou).backward()
    trained = {n for n, p in decoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "iou_prediction_head.proj_out.weight" in trained and "upscale_conv2.weight" in trained
    assert not any(n.startswith(("conv_s0", "conv_s1")) for n, p in decoder.named_parameters() if p.requires_grad)
    state = family.decoder_state(decoder)
    assert family.decoder_copy(state).training is False
    family.check_decoder_metadata(family.decoder_metadata())
    with pytest.raises(FamilyLoadError, match="not for sam2.1 sam2.1_test_tiny"):
        family.check_decoder_metadata({**family.decoder_metadata(), "base_model": "vit_b-01ec64aaaaaa"})


def test_embedding_round_trips_through_cache_tensors(family):
    from trainer.families import ImageEmbedding

    embedding = family.embed(textured(120, 90))
    again = ImageEmbedding.from_tensors(embedding.tensors(), embedding.metadata())
    assert again.frame == embedding.frame and list(again.maps) == list(embedding.maps)
    assert all(torch.equal(again.maps[k], embedding.maps[k]) for k in embedding.maps)


# -- refusals --------------------------------------------------------------------------------------------------
def test_sam2_weights_for_a_sam2_1_variant_are_refused(tmp_path):
    older = write_model_dir(tmp_path / "sam2-hiera-test", generation="2")
    with pytest.raises(FamilyLoadError, match=r"holds SAM 2 weights .*sam2\.1_test_tiny needs SAM 2\.1 weights"):
        sam2_family.load(VARIANT, older)


def test_another_size_is_refused_naming_both(tmp_path):
    bigger = dict(TINY["backbone"], blocks_per_stage=[1, 2, 3, 1], global_attention_blocks=[4])
    directory = write_model_dir(tmp_path / "bigger", backbone=bigger)
    with pytest.raises(FamilyLoadError, match=r"Hiera with 7 blocks.*does not fit sam2\.1_test_tiny.*unexpected"):
        sam2_family.load(VARIANT, directory)


def test_a_sam1_checkpoint_is_refused(tmp_path):
    from trainer.models import build_network

    path = tmp_path / "mobile_sam.pt"
    torch.save(build_network("mobile_sam")[0].state_dict(), path)
    with pytest.raises(FamilyLoadError, match=r"mobile_sam\.pt is a SAM 1 checkpoint .*sam2\.1_hiera_tiny needs"):
        sam2_family.load("sam2.1_hiera_tiny", path)


def test_missing_damaged_and_wrong_hash_are_refused(tmp_path, model_dir):
    with pytest.raises(FamilyLoadError, match="has no model.safetensors"):
        sam2_family.load(VARIANT, tmp_path)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(FamilyLoadError, match="cannot read checkpoint"):
        sam2_family.load(VARIANT, bad)
    with pytest.raises(FamilyLoadError, match="expected 000000"):
        sam2_family.load(VARIANT, model_dir, expected_sha256="000000")
