"""COCO open-vocabulary evaluation: box AP50 and AP on the novel, base and all classes."""

import contextlib
import copy
import io
import itertools
import logging
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.logger import create_small_table
from pycocotools.cocoeval import COCOeval

__all__ = ["COCOOpenVocabularyEvaluator"]

logger = logging.getLogger(__name__)


class COCOOpenVocabularyEvaluator(COCOEvaluator):
    """
    detectron2's :class:`COCOEvaluator` (all its metrics), plus box AP50 and AP (IoU
    0.5:0.95) over the novel, the base and all classes, each from pycocotools' COCOeval
    restricted to that category subset (``params.catIds``). Results:
    ``results["bbox"]["AP50-novel" | "AP50-base" | "AP50-all" | "AP-novel" | "AP-base" |
    "AP-all"]``.

    Novel classes are the dataset metadata's ``novel_classes`` (names among ``thing_classes``);
    base = the others. A dataset whose ground-truth json is derived (``source_json_file`` in its
    metadata, e.g. ``vild_coco_2017_ov_val``) gets that json written first if needed.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks=None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        max_dets_per_image: Optional[int] = None,
        use_fast_impl: bool = True,
        novel_classes: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            novel_classes: overrides the metadata's ``novel_classes``.
            Others: as :class:`COCOEvaluator`.
        """
        meta = MetadataCatalog.get(dataset_name)
        if meta.get("source_json_file", None):
            from ..data.datasets import prepare_coco_ovd_json

            prepare_coco_ovd_json(dataset_name)
        super().__init__(
            dataset_name,
            tasks,
            distributed,
            output_dir,
            max_dets_per_image=max_dets_per_image,
            use_fast_impl=use_fast_impl,
        )
        classes = list(meta.thing_classes)
        novel = list(meta.get("novel_classes", []) if novel_classes is None else novel_classes)
        unknown = sorted(set(novel) - set(classes))
        if not novel or unknown:
            raise ValueError(
                f"{type(self).__name__} on {dataset_name!r} needs novel classes among its "
                f"thing_classes (metadata 'novel_classes'); got {novel if not novel else unknown}"
            )
        id_map = meta.get("thing_dataset_id_to_contiguous_id", None)
        # Without a map the parent leaves category ids as they are.
        if id_map:
            dataset_id = {v: k for k, v in id_map.items()}
        else:
            dataset_id = {i: i for i in range(len(classes))}
        self._contiguous_to_dataset_id = dataset_id
        novel_set = set(novel)
        self._category_subsets = {
            "novel": [dataset_id[i] for i, n in enumerate(classes) if n in novel_set],
            "base": [dataset_id[i] for i, n in enumerate(classes) if n not in novel_set],
            "all": [dataset_id[i] for i in range(len(classes))],
        }

    def _eval_predictions(self, predictions, img_ids=None):
        # Our own copy, mapped to dataset ids: the parent remaps its list in place.
        results = [
            dict(r, category_id=self._contiguous_to_dataset_id[r["category_id"]])
            for r in itertools.chain(*[p["instances"] for p in predictions])
        ]
        super()._eval_predictions(predictions, img_ids=img_ids)
        if not self._do_evaluation or "bbox" not in self._results:
            return
        aps = {s: self._aps(results, ids, img_ids) for s, ids in self._category_subsets.items()}
        split = {f"AP50-{subset}": ap[1] for subset, ap in aps.items()}
        split.update({f"AP-{subset}": ap[0] for subset, ap in aps.items()})
        counts = {k: len(v) for k, v in self._category_subsets.items()}
        logger.info(
            f"Open-vocabulary box AP50 and AP ({counts['novel']} novel / {counts['base']} "
            f"base / {counts['all']} classes): \n" + create_small_table(split)
        )
        self._results["bbox"].update(split)

    def _aps(self, results: List[Dict], cat_ids: List[int], img_ids=None) -> Tuple[float, float]:
        """Box (AP, AP50) in % over ``cat_ids`` by pycocotools; NaN without detections or
        ground truth there."""
        if not results:
            return float("nan"), float("nan")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
            coco_dt = self._coco_api.loadRes(copy.deepcopy(results))
            if self._use_fast_impl:
                from detectron2.evaluation.fast_eval_api import COCOeval_opt as evaluator_cls
            else:
                evaluator_cls = COCOeval
            coco_eval = evaluator_cls(self._coco_api, coco_dt, "bbox")
            coco_eval.params.catIds = list(cat_ids)
            coco_eval.params.maxDets = list(self._max_dets_per_image)
            if img_ids is not None:
                coco_eval.params.imgIds = img_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        # stats[0]: IoU 0.5:0.95, stats[1]: IoU 0.5; all areas, maxDets[2] detections per image
        ap, ap50 = coco_eval.stats[:2]
        return tuple(float(v * 100) if v >= 0 else float("nan") for v in (ap, ap50))
