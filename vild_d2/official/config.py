"""``cfg.MODEL.VILD.OFFICIAL``: the options of the official (TensorFlow) ViLD architecture that
detectron2's config has no key for (vild_d2/official, docs/OFFICIAL.md)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_official_config"]


def add_official_config(cfg) -> None:
    """Add ``cfg.MODEL.VILD.OFFICIAL`` (the official model's defaults) to ``cfg``, which must
    already have ``cfg.MODEL.VILD``."""
    _C = cfg.MODEL.VILD
    _C.OFFICIAL = CN()
    # Norm of every official module: "BN" (batch statistics in training), "SyncBN" (the
    # official TPU recipe), "FrozenBN" (fine-tuning / inference only).
    _C.OFFICIAL.NORM = "BN"
    # tf.layers.batch_normalization's settings: epsilon 1e-4, TF momentum 0.997, i.e.
    # PyTorch momentum 1 - 0.997 (PyTorch weighs the new batch, TF the running value).
    _C.OFFICIAL.BN_EPS = 1e-4
    _C.OFFICIAL.BN_MOMENTUM = 0.003
    # Test-time input: the image's longer side is resized to IMAGE_SIZE (TF's legacy bilinear
    # resize, no half-pixel centres) and the image padded to IMAGE_SIZE x IMAGE_SIZE; boxes are
    # clipped to that canvas, [0, IMAGE_SIZE - 1], as the official code does. In training the
    # mapper's image (e.g. large-scale jitter) is padded to IMAGE_SIZE x IMAGE_SIZE.
    _C.OFFICIAL.IMAGE_SIZE = 1024
    # Anchor size in units of the level's stride (anchor side = ANCHOR_SIZE * 2^level); the
    # ratios are MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS, read as width / height.
    _C.OFFICIAL.ANCHOR_SIZE = 8.0
    # Post-processing (postprocess.pre_nms_num_boxes): per class, the top-scoring boxes kept
    # before its NMS; then MODEL.ROI_HEADS.NMS_THRESH_TEST and TEST.DETECTIONS_PER_IMAGE.
    _C.OFFICIAL.PRE_NMS_TOPK_PER_CLASS = 1000
