"""
Exact resume: the training loader's position and the RNG states, saved in every checkpoint.

detectron2's training loader restarts its shuffled stream at the first item on ``--resume``,
and the global RNGs (RoI sampling in the model, augmentations in the mapper) are left as the
new process seeded them, so a run killed and resumed diverges from one that was not. Here:

* the stream is detectron2's sampler (``DATALOADER.SAMPLER_TRAIN``, one shared seed, rank r
  taking the items r, r + W, ...); a resume skips the items this rank already consumed
  (indices only: it replays the sampler, not the mapper);
* each item is mapped with python's, numpy's and torch's RNGs seeded from (sampler seed, its
  position in the global stream) and restored afterwards, so an item's augmentation depends on
  neither the loader worker that maps it nor what ran before it, and mapping in the main process
  leaves the training's RNG streams untouched;
* the aspect-ratio grouping (as detectron2's :class:`AspectRatioGroupedDataset`: w > h and
  w <= h) records the (position, index) of the items it holds back, and a resume maps them
  again;
* the trainer saves the global RNG states (python, numpy, torch CPU, CUDA) with them
  (:func:`capture_rng_state`); with several processes, every rank's, gathered to rank 0 by
  :class:`ResumeStateHook`.

Shape shorthand: k = an item's position in this rank's stream; global position = rank + k * W.
"""

import contextlib
import itertools
import logging
import operator
import random
from typing import Callable, List, Optional

import numpy as np
import torch
from detectron2.data import DatasetFromList
from detectron2.data.build import worker_init_reset_seed
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = [
    "ResumableTrainLoader",
    "ResumeStateHook",
    "build_resumable_train_loader",
    "capture_rng_state",
    "restore_rng_state",
    "preserved_rng_state",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict:
    """The global RNG states of this process: python, numpy, torch CPU and (when CUDA is in
    use) the current CUDA device's; only tensors, numbers and tuples, so that a checkpoint
    holding it loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Set the global RNGs to a :func:`capture_rng_state` result."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value):
    # random.setstate wants tuples; a checkpoint may give lists back.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@contextlib.contextmanager
def preserved_rng_state():
    """Within the block, the global RNGs may be used; afterwards they are as before (e.g. an
    evaluation during training leaves the training's random choices as they would have been)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


@contextlib.contextmanager
def _seeded_rngs(seed: int, position: int):
    """python, numpy and torch's CPU RNG seeded from (seed, position) within the block."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    words = np.random.SeedSequence([seed, position]).generate_state(2)
    np.random.seed(int(words[0]))
    random.seed(int(words[1]))
    # The CPU generator only: torch.manual_seed would also reseed (and so move) CUDA's.
    torch.default_generator.manual_seed((int(words[0]) << 32) | int(words[1]))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


# ----------------------------------------------------------------------------- the data stream
class _Stream(IterableDataset):
    """This rank's infinite stream of (k, index, mapped dict), from k = ``start`` on; in loader
    workers, worker w of n yields the items with (k - start) % n == w (the loader takes them
    round-robin, so in stream order)."""

    def __init__(self, dataset, mapper, sampler, seed: int, start: int):
        self.dataset = dataset
        self.mapper = mapper
        self.sampler = sampler
        self.seed = seed
        self.start = start
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        items = itertools.islice(iter(self.sampler), self.start, None)
        for k, index in enumerate(items, self.start):
            if (k - self.start) % workers == worker:
                yield k, index, self.map(k, index)

    def map(self, k: int, index: int) -> dict:
        """The mapped item at position ``k`` (dataset item ``index``): the same wherever and
        whenever it is mapped."""
        with _seeded_rngs(self.seed, self.rank + k * self.world_size):
            for attempt in range(1, 1000):
                mapped = self.mapper(self.dataset[index])
                if mapped is not None:
                    return mapped
                # As detectron2's MapDataset: another item instead (here a seeded choice).
                if attempt == 3:
                    logger.warning(f"Failed to apply the mapper to item {index} 3 times")
                index = int(np.random.randint(len(self.dataset)))
        raise RuntimeError(f"the mapper returned None for 1000 items in a row (item {index})")


class ResumableTrainLoader:
    """
    detectron2's training loader (an infinite iterable of batches: lists of ``batch_size``
    mapped dicts, grouped by aspect ratio if asked) whose position is saved and restored by
    :meth:`state_dict` / :meth:`load_state_dict`. Load the state before iterating starts.
    """

    def __init__(
        self,
        dataset,
        mapper: Callable,
        make_sampler: Callable[[int], torch.utils.data.Sampler],
        seed: int,
        *,
        batch_size: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
    ):
        """
        Args:
            dataset: a map-style dataset of dataset dicts.
            make_sampler: the sampler of a seed (this rank's part of the shared stream).
            seed: the sampler's seed; it also seeds each item's augmentation.
            batch_size: images per batch of this process.
        """
        self.dataset = dataset
        self.mapper = mapper
        self.make_sampler = make_sampler
        self.batch_size = batch_size
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        self.seed = int(seed)
        self.sampler = make_sampler(self.seed)
        self._consumed = 0  # items of this rank's stream taken into buckets or batches
        self._buckets: List[list] = [[], []]  # (k, index, mapped dict) held back per group
        self._started = False

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "rank": comm.get_rank(),
            "world_size": comm.get_world_size(),
            "batch_size": self.batch_size,
            "consumed": self._consumed,
            "buckets": [[(k, i) for k, i, *_ in b] for b in self._buckets],
        }

    def load_state_dict(self, state: dict) -> None:
        if self._started:
            raise RuntimeError("the training loader's state must be loaded before iterating")
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self.sampler = self.make_sampler(self.seed)
        self._consumed = int(state["consumed"])
        self._buckets = [[(int(k), int(i)) for k, i in b] for b in state["buckets"]]

    def __iter__(self):
        self._started = True
        stream = _Stream(self.dataset, self.mapper, self.sampler, self.seed, self._consumed)
        # Items held back when the state was saved: mapped again (the same, by their position).
        self._buckets = [[(k, i, stream.map(k, i)) for k, i, *_ in b] for b in self._buckets]
        loader = DataLoader(
            stream,
            num_workers=self.num_workers,
            collate_fn=operator.itemgetter(0),  # items one by one, not batched
            worker_init_fn=worker_init_reset_seed,
            # The loader draws its workers' base seed from this, not from the global RNG.
            generator=torch.Generator().manual_seed(self.seed),
        )
        for k, index, mapped in loader:
            group = 0
            if self.aspect_ratio_grouping and not mapped["width"] > mapped["height"]:
                group = 1
            bucket = self._buckets[group]
            bucket.append((k, index, mapped))
            self._consumed = k + 1
            if len(bucket) == self.batch_size:
                batch = [d for _, _, d in bucket]
                del bucket[:]
                # The state between two batches is what state_dict() saves.
                yield batch


def build_resumable_train_loader(cfg, mapper, dicts: list) -> ResumableTrainLoader:
    """:class:`ResumableTrainLoader` as ``build_detection_train_loader(cfg, mapper=mapper,
    dataset=dicts)`` configures detectron2's: ``DATALOADER.SAMPLER_TRAIN`` (TrainingSampler,
    RepeatFactorTrainingSampler, RandomSubsetTrainingSampler), ``SOLVER.IMS_PER_BATCH`` over
    the processes, ``DATALOADER.ASPECT_RATIO_GROUPING`` and ``NUM_WORKERS``."""
    dataset = DatasetFromList(dicts, copy=False)
    name = cfg.DATALOADER.SAMPLER_TRAIN
    logger.info(f"Using training sampler {name}")
    if name == "TrainingSampler":

        def make_sampler(seed):
            return TrainingSampler(len(dataset), seed=seed)

    elif name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD
        )

        def make_sampler(seed):
            return RepeatFactorTrainingSampler(factors, seed=seed)

    elif name == "RandomSubsetTrainingSampler":
        ratio = cfg.DATALOADER.RANDOM_SUBSET_RATIO

        def make_sampler(seed):
            return RandomSubsetTrainingSampler(
                len(dataset), ratio, seed_shuffle=seed, seed_subset=(seed + 1) % 2**31
            )

    else:
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN {name!r}: vild_d2 trains with 'TrainingSampler', "
            "'RepeatFactorTrainingSampler' or 'RandomSubsetTrainingSampler'"
        )
    world_size = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total <= 0 or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {total}: the global batch must be a positive multiple of "
            f"the {world_size} process(es)"
        )
    return ResumableTrainLoader(
        dataset,
        mapper,
        make_sampler,
        comm.shared_random_seed(),  # as detectron2's samplers: drawn after the seeding
        batch_size=total // world_size,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


# ----------------------------------------------------------------------------- trainer side
def local_resume_state(trainer) -> dict:
    """This process's part of a checkpoint's ``"resume"`` entry: RNG states and, when the
    trainer's loader is resumable, its position."""
    loader = getattr(trainer._trainer, "data_loader", None)
    data = loader.state_dict() if isinstance(loader, ResumableTrainLoader) else None
    return {"rng": capture_rng_state(), "data": data}


class ResumeStateHook(HookBase):
    """With several processes: on the iterations where the checkpointer saves (every
    ``period`` and the last), gathers every rank's :func:`local_resume_state` to the trainer
    (``trainer.gathered_resume_state``), since only rank 0 writes the checkpoint. Place it
    just before the checkpointer hook."""

    def __init__(self, period: int, max_iter: int):
        self.period = period
        self.max_iter = max_iter

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self.period == 0 or it >= self.max_iter - 1:
            states = comm.all_gather(local_resume_state(self.trainer))
            self.trainer.gathered_resume_state = (it, states)


def resume_state(trainer) -> Optional[dict]:
    """The checkpoint's ``"resume"`` entry: every rank's state, or None when it was not
    gathered for this iteration (a save outside the checkpoint hook, with several processes)."""
    world_size = comm.get_world_size()
    if world_size == 1:
        return {"world_size": 1, "ranks": [local_resume_state(trainer)]}
    gathered = getattr(trainer, "gathered_resume_state", None)
    if gathered is None or gathered[0] != trainer.iter:
        return None
    return {"world_size": world_size, "ranks": gathered[1]}


def load_resume_state(trainer, state: Optional[dict]) -> Optional[dict]:
    """Give the trainer's loader its saved position; return the RNG state to set when training
    starts (None when it cannot be restored exactly: a checkpoint of another number of
    processes, or without a resume entry; the stream then goes on at about the same place)."""
    loader = getattr(trainer._trainer, "data_loader", None)
    if not isinstance(loader, ResumableTrainLoader):
        return None
    world_size, rank = comm.get_world_size(), comm.get_rank()
    ranks = (state or {}).get("ranks") or []
    if state is not None and state.get("world_size") == world_size and len(ranks) == world_size:
        mine = ranks[rank]
        if mine.get("data") is not None:
            loader.load_state_dict(mine["data"])
            return mine["rng"]
    # Approximate: as many images per process as this run's batch has taken so far.
    saved = next((r["data"] for r in ranks if r.get("data")), None)
    approx = {
        "seed": saved["seed"] if saved else loader.seed,
        "consumed": (trainer.iter + 1) * loader.batch_size,
        "buckets": [[], []],
    }
    loader.load_state_dict(approx)
    if state is not None and state.get("world_size") not in (None, world_size):
        why = f"it was written by {state['world_size']} process(es), this run has {world_size}"
    else:
        why = "it has no data-stream state (written by an older vild_d2?)"
    logger.warning(
        f"Resuming at iteration {trainer.iter + 1} but not exactly: {why}. The data stream "
        f"goes on at image {approx['consumed']} of each process and the RNGs are not restored."
    )
    return None
