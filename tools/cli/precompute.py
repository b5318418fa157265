"""The precompute tools' shared flags (``tools/precompute_proposals.py``,
``tools/precompute_clip_embeddings.py``): chunking, sharding (also from a launcher's
environment), loader processes."""

import os

import torch

__all__ = ["add_store_arguments", "shard_from_env"]


def add_store_arguments(parser, workers_help: str) -> None:
    """The precompute tools' common options: chunking, sharding, loader processes."""
    parser.add_argument("--chunk-size", type=int, default=64, help="images per store chunk")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument(
        "--shard-from-env",
        action="store_true",
        help="--shard/--num-shards from torchrun (RANK, WORLD_SIZE; GPU LOCAL_RANK), srun "
        "(SLURM_PROCID, SLURM_NTASKS; GPU SLURM_LOCALID) or a SLURM array (task id - min, "
        "task count)",
    )
    parser.add_argument("--num-workers", type=int, default=2, help=workers_help)


def shard_from_env(args, environ=None) -> None:
    """
    With ``args.shard_from_env``, set ``args.shard`` / ``args.num_shards`` from the launcher's
    environment, and ``args.device`` to the process's own GPU where one is meant ("cuda" or
    unset, several GPUs): torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; srun's
    ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``; or a SLURM array's
    ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT`` (contiguous
    ids, e.g. ``--array=0-7``; one task per GPU is the scheduler's business).
    """
    if not args.shard_from_env:
        return
    env = os.environ if environ is None else environ
    local = None
    if "RANK" in env and "WORLD_SIZE" in env:
        shard, num, local = env["RANK"], env["WORLD_SIZE"], env.get("LOCAL_RANK")
    elif "SLURM_ARRAY_TASK_ID" in env:
        shard = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        num = env["SLURM_ARRAY_TASK_COUNT"]
    elif "SLURM_PROCID" in env:
        shard, num, local = env["SLURM_PROCID"], env["SLURM_NTASKS"], env.get("SLURM_LOCALID")
    else:
        raise ValueError(
            "--shard-from-env: no RANK/WORLD_SIZE (torchrun), SLURM_PROCID (srun) or "
            "SLURM_ARRAY_TASK_ID (sbatch --array) in the environment; give --shard I "
            "--num-shards N instead"
        )
    args.shard, args.num_shards = int(shard), int(num)
    device = getattr(args, "device", None)
    if local is not None and device in ("", "cuda") and torch.cuda.device_count() > 1:
        args.device = f"cuda:{int(local)}"
