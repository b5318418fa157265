"""Data-parallel training, evaluation and precompute in several CPU processes (gloo, through
vild_d2.engine.launch), on a tiny shapes world.

Equivalence: one config at global batch 4, as 1 process x 4 images and as 2 processes x 2,
from the same initial weights. The 2-process run sees the same images per step because
detectron2's TrainingSampler gives rank r the items r, r + 2, ... of one shared shuffled
sequence (and every image of the world is square: one aspect-ratio group, no loader workers).
Data-parallel training averages the processes' gradients, each of a per-process mean; the
config makes the denominators of those means equal in every process, and removes every random
choice, so that both runs compute the same thing up to float rounding:

* no flip and one input size; masks off (their loss is a mean over the process's foreground);
* the RPN takes every anchor (its loss is normalised by a constant); the RoI heads take every
  one of 32 proposals per image (no ground truth appended, positive fraction 1);
* every image has M distillation boxes (the distillation loss is a mean over them).
"""

import vild_d2  # noqa: F401  (first: compat bridges)

import filecmp
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vild_d2 import ViLDCheckpointer
from vild_d2.engine import Trainer, launch
from vild_d2.engine.launch import ProcessDiedError, usable_cpus
from benchmarks.train_processes import train_in_processes
from tiny_world import M, TINY_OPTS, tiny_config, tool_world  # tests/ helper

# Trains, evaluates or starts processes: minutes on a CPU (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow

VARIANTS = {"text": "vild_text", "vild": "vild", "ensemble": "vild_ensemble"}
ITERS = 3
EQUIVALENCE_OPTS = [
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.RANDOM_FLIP",
    "none",
    "MODEL.MASK_ON",
    "False",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "100000",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "32",
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT",
    "False",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "64",
    "MODEL.ROI_HEADS.POSITIVE_FRACTION",
    "1.0",
    "SOLVER.IMS_PER_BATCH",
    "4",
    "SOLVER.BASE_LR",
    "0.01",
    "SOLVER.WARMUP_ITERS",
    "0",
    "SOLVER.MAX_ITER",
    str(ITERS),
    "DATASETS.TEST",
    "()",
]
# float32 sums in another order (RoIs are sampled in a random order; the gradients of two
# halves are added, not of the whole): losses agree to 1e-5 relative, weights to 1e-5
# absolute, while the steps move them by ~1e-2.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def env_world(tmp_path_factory, tiny_clip_path):
    """The tiny world and its store; subprocesses register it as shapes_* from
    $DETECTRON2_DATASETS, this process as dist_*."""
    return tool_world(tmp_path_factory.mktemp("dist"), tiny_clip_path, "dist", threads=1)


@pytest.fixture(scope="module")
def trained(env_world):
    """Each variant trained ITERS steps from the same saved initial weights in 1 process and in
    2 (plus a SyncBN ensemble in 2); returns the two records."""
    root, common = env_world["root"], env_world["common"]
    runs = {1: {}, 2: {}}
    (root / "init").mkdir()
    for variant, name in VARIANTS.items():
        config_file = f"configs/Shapes/{name}.yaml"
        opts = [*common, *EQUIVALENCE_OPTS]
        cfg = tiny_config(
            config_file,
            env_world["clip"],
            root / "cache",
            *opts,
            "DATASETS.TRAIN",
            f"('{env_world['world']['train']}',)",
        )
        torch.manual_seed(0)
        ViLDCheckpointer(Trainer.build_model(cfg), str(root / "init")).save(variant)
        init = ["MODEL.WEIGHTS", str(root / "init" / f"{variant}.pth")]
        for n in (1, 2):
            out = ["OUTPUT_DIR", str(root / f"p{n}" / variant)]
            runs[n][variant] = [config_file, [*opts, *init, *out]]
    # The official head's batch norm, synchronised over the processes. torch's SyncBatchNorm
    # ("SyncBN") refuses CPU tensors; detectron2's NaiveSyncBatchNorm does the same all-reduce
    # over gloo. ViLDConvFCHead puts it after each FC too, as the official head.
    runs[2]["syncbn"] = [
        "configs/Shapes/vild_ensemble.yaml",
        [
            *common,
            "MODEL.ROI_BOX_HEAD.NAME",
            "ViLDConvFCHead",
            "MODEL.ROI_BOX_HEAD.NORM",
            "naiveSyncBN_N",
            "MODEL.ROI_MASK_HEAD.NORM",
            "naiveSyncBN_N",
            "SOLVER.MAX_ITER",
            "2",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(root / "p2" / "syncbn"),
        ],
    ]
    env = env_world["env"]
    return {n: train_in_processes(runs[n], n, root / f"record{n}.json", env=env) for n in (1, 2)}


def _max_diffs(a: dict, b: dict):
    abs_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    rel_diff = max(((a[k] - b[k]).abs() / b[k].abs().clamp(min=1e-3)).max().item() for k in a)
    return abs_diff, rel_diff


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_train_like_one(trained, env_world, variant):
    one, two = trained[1][variant], trained[2][variant]
    assert set(one["losses"]) == set(two["losses"])
    if variant != "text":
        assert "loss_distill" in one["losses"]
    worst = 0.0
    for key, values in one["losses"].items():
        assert len(values) == len(two["losses"][key]) == ITERS
        for a, b in zip(values, two["losses"][key]):
            worst = max(worst, abs(a - b) / max(abs(a), 1e-6))
    weights = {}
    for n in (1, 2):
        path = Path(trained[n][variant]["output_dir"]) / "model_final.pth"
        weights[n] = torch.load(path, weights_only=False)["model"]
    init = torch.load(env_world["root"] / "init" / f"{variant}.pth", weights_only=False)["model"]
    params = [k for k in init if k in weights[1] and init[k].is_floating_point()]
    w1, w2 = ({k: weights[n][k].double() for k in params} for n in (1, 2))
    abs_diff, rel_diff = _max_diffs(w2, w1)
    moved = max((w1[k] - init[k].double()).abs().max().item() for k in params)
    print(
        f"\n{variant}: losses max rel diff {worst:.2e}; weights after {ITERS} steps max abs "
        f"diff {abs_diff:.2e} (max rel {rel_diff:.2e}), largest update {moved:.2e}"
    )
    assert worst <= LOSS_RTOL
    assert abs_diff <= WEIGHT_ATOL and moved > 100 * WEIGHT_ATOL


def test_syncbn_head_trains_across_processes(trained):
    record = trained[2]["syncbn"]
    losses = record["losses"]
    assert all(len(v) == 2 and all(torch.isfinite(torch.tensor(v))) for v in losses.values())
    assert min(losses["loss_distill"]) > 0
    state = torch.load(Path(record["output_dir"]) / "model_final.pth", weights_only=False)
    # The image branch's FC norm (batch statistics over both processes' boxes) was updated.
    key = "roi_heads.image_box_head.fc_norms.0.running_var"
    assert key in state["model"] and not torch.allclose(state["model"][key], torch.ones(1))


def _train_net(env, *args, ok=True):
    proc = subprocess.run(
        [sys.executable, "tools/train_net.py", *args], env=env, capture_output=True, text=True
    )
    log = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, log[-4000:]
    return log


def test_checkpoints_resume_across_world_sizes(trained, env_world, tmp_path):
    """A 2-process run's checkpoint (written once, by rank 0, with the vocabulary) resumes in 1
    process; a 1-process run's in 2 processes, here as two "machines" of one process each."""
    env = env_world["env"]
    checkpoint = torch.load(
        Path(trained[2]["vild"]["output_dir"]) / "model_final.pth", weights_only=False
    )
    assert checkpoint["iteration"] == ITERS - 1
    # No test dataset: the test vocabulary is the training one (the base classes).
    assert checkpoint["vocabulary"]["names"] == env_world["world"]["spec"].base
    common = [
        "--config-file",
        "configs/Shapes/vild.yaml",
        "--resume",
        *env_world["common"],
        *EQUIVALENCE_OPTS,
        "SOLVER.MAX_ITER",
        str(ITERS + 1),
    ]
    for n in (2, 1):
        out = tmp_path / f"from{n}"
        shutil.copytree(trained[n]["vild"]["output_dir"], out)
        if n == 2:
            log = _train_net(env, *common, "OUTPUT_DIR", str(out))
        else:
            url = f"tcp://127.0.0.1:{_free_port()}"
            machines = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "tools/train_net.py",
                        "--num-machines",
                        "2",
                        "--machine-rank",
                        str(r),
                        "--dist-url",
                        url,
                        *common,
                        "OUTPUT_DIR",
                        str(out),
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for r in (0, 1)
            ]
            logs = [m.communicate(timeout=300)[0] for m in machines]
            assert [m.returncode for m in machines] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
            log = logs[0]
            assert "World size: 2" in log
        assert f"Starting training from iteration {ITERS}" in log
        assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == ITERS


def test_evaluation_in_two_processes_equals_one(trained, env_world, tmp_path):
    env = env_world["env"]
    weights = Path(trained[1]["ensemble"]["output_dir"]) / "model_final.pth"
    common = [
        "--config-file",
        "configs/Shapes/vild_ensemble.yaml",
        "--eval-only",
        *env_world["common"],
        "MODEL.MASK_ON",
        "False",
        "MODEL.WEIGHTS",
        str(weights),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "-1.0",
    ]
    results = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        log = _train_net(env, "--num-gpus", str(n), *common, "OUTPUT_DIR", str(out))
        assert log.count("copypaste: Task: bbox") == 1  # printed (evaluated) once, by rank 0
        inference = out / "inference" / "shapes_val"
        results[n] = json.loads((inference / "results.json").read_text())
        detections = json.loads((inference / "lvis_instances_results.json").read_text())
        assert detections, "no detections to evaluate"
        results[n]["detections"] = len(detections)
    assert results[2] == results[1]
    assert set(results[1]["bbox"]) >= {"AP", "APr", "APc", "APf"}


# --- bad input ------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_taken_port_is_named(env_world):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        log = _train_net(
            env_world["env"],
            "--num-gpus",
            "2",
            "--dist-url",
            f"tcp://127.0.0.1:{port}",
            "--config-file",
            "configs/Shapes/vild.yaml",
            ok=False,
        )
    assert f"port {port} cannot be used" in log


def test_without_dist_url_one_machine_picks_a_free_port():
    """detectron2's default is one fixed port per user (two jobs on a machine collide); ours is
    "auto" on one machine, and several machines must name machine 0's address."""
    spec = importlib.util.spec_from_file_location("vild_train_net_tool", "tools/train_net.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_args(["--num-gpus", "2"]).dist_url == "auto"
    url = "tcp://10.0.0.1:29500"
    assert tool.parse_args(["--num-machines", "2", "--dist-url", url]).dist_url == url
    with pytest.raises(SystemExit):
        tool.parse_args(["--num-machines", "2", "--machine-rank", "1"])


def test_missing_rank_times_out_naming_it(env_world):
    url = f"tcp://127.0.0.1:{_free_port()}"
    log = _train_net(
        env_world["env"],
        "--num-machines",
        "2",
        "--machine-rank",
        "0",
        "--dist-url",
        url,
        "--dist-timeout",
        "4",
        "--config-file",
        "configs/Shapes/vild.yaml",
        ok=False,
    )
    assert "1 of 2 ranks never joined" in log and "rank(s) [1] are missing" in log


@pytest.mark.slow
def test_missing_rank_0_is_one_clear_line(tmp_path):
    """Machine 1 started, machine 0 not: one line naming the address and what to check, not
    torch's TCPStore retries with their C++ stack frames."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "tools/train_net.py",
            "--num-machines",
            "2",
            "--machine-rank",
            "1",
            "--dist-url",
            url,
            "--dist-timeout",
            "3",
            "--config-file",
            "configs/Shapes/vild.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"could not reach machine 0 (--machine-rank 0) at {url} within 3 s" in errors[0]
    assert "--dist-url" in errors[0] and "port" in errors[0]
    assert "frame #" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - start < 120


def _dies_on_rank_1(how):
    """main_func of the launch tests: rank 1 dies while rank 0 waits for it at a barrier."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(28, "No space left on device")
    dist.barrier()  # would wait for rank 1 until the (30 min) timeout


@pytest.mark.slow
@pytest.mark.skipif(usable_cpus() < 2, reason="two CPU processes")
@pytest.mark.parametrize(
    "how, error, message",
    [
        ("kill", ProcessDiedError, r"rank 1 \(pid \d+\) was killed by signal SIGKILL"),
        ("raise", Exception, r"No space left on device"),
    ],
)
def test_a_dying_process_ends_the_launch_naming_why(how, error, message):
    start = time.monotonic()
    with pytest.raises(error, match=message):
        launch(_dies_on_rank_1, 2, dist_url="auto", args=(how,))
    assert time.monotonic() - start < 60


def test_more_processes_than_the_machine_serves_are_refused():
    def never(*_):
        raise AssertionError("started")

    if torch.cuda.is_available():
        n, match = torch.cuda.device_count() + 1, "GPU"
    else:
        n, match = usable_cpus() + 1, f"may use {usable_cpus()} core"
    with pytest.raises(ValueError, match=match):
        launch(never, n, dist_url="auto")


def test_ranks_with_other_configs_are_refused(env_world):
    url = f"tcp://127.0.0.1:{_free_port()}"
    machines = [
        subprocess.Popen(
            [
                sys.executable,
                "tools/train_net.py",
                "--num-machines",
                "2",
                "--machine-rank",
                str(r),
                "--dist-url",
                url,
                "--dist-timeout",
                "60",
                "--config-file",
                "configs/Shapes/vild.yaml",
                *env_world["common"],
                "SOLVER.BASE_LR",
                str(0.01 * (r + 1)),
            ],
            env=env_world["env"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = [m.communicate(timeout=300)[0] for m in machines]
    for m, log in zip(machines, logs):
        assert m.returncode != 0
        assert "SOLVER.BASE_LR: 0.01 on rank 0, 0.02 on rank 1" in log, log[-3000:]


# --- precompute -----------------------------------------------------------------------------


def test_concurrent_shard_processes_write_the_one_process_store(env_world, tmp_path):
    """Proposals: 2 processes started at once with --shard 0/1; CLIP targets: torchrun with 2
    processes (--shard-from-env). Both stores are byte-identical to one process's."""
    env = env_world["env"]
    rpn = env_world["stores"]["rpn"].MODEL.WEIGHTS
    proposals = [
        "tools/precompute_proposals.py",
        "--config-file",
        "configs/Shapes/rpn.yaml",
        "--dataset",
        "shapes_train_base",
        "--num-proposals",
        str(M),
        "--chunk-size",
        "2",
        "--num-workers",
        "0",
        *TINY_OPTS,
        "MODEL.WEIGHTS",
        rpn,
    ]

    def start(*args):
        return subprocess.Popen(
            [sys.executable, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait(*procs):
        for p in procs:
            out = p.communicate(timeout=300)[0]
            assert p.returncode == 0, out[-3000:]

    one, many = tmp_path / "one", tmp_path / "many"
    wait(
        start(*proposals, "--output", str(one / "props")),
        *[
            start(
                *proposals, "--output", str(many / "props"), "--shard", str(i), "--num-shards", "2"
            )
            for i in (0, 1)
        ],
    )
    _same_store(one / "props", many / "props")

    targets = [
        "tools/precompute_clip_embeddings.py",
        "--proposals",
        str(one / "props"),
        "--dataset",
        "shapes_train_base",
        "--clip",
        env_world["clip"],
        "--chunk-size",
        "2",
        "--num-workers",
        "0",
        "--max-proposals",
        str(M),
    ]
    wait(
        start(*targets, "--output", str(one / "targets")),
        start(
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *targets,
            "--output",
            str(many / "targets"),
            "--shard-from-env",
        ),
    )
    _same_store(one / "targets", many / "targets")


def _same_store(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and len(names) > 2, names
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


# --- tools -----------------------------------------------------------------------------------


def test_precompute_benchmark_compares_the_job_with_its_clip_forward(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/benchmark.py",
            "--quick",
            "--task",
            "precompute",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    per_s = report["precompute_crops_per_s"]
    assert per_s["end_to_end"] > 0 and per_s["clip_forward"] > 0
    ratio = report["ratios"]["precompute_end_to_end_vs_clip_forward"]
    assert ratio == pytest.approx(per_s["end_to_end"] / per_s["clip_forward"], rel=1e-12)


def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cuda"] == torch.cuda.is_available()
    assert set(report["checks"]) == {"crops", "clip", "train_fp16", "inference", "ddp"}
    if not torch.cuda.is_available():
        assert all(v == "skipped: no CUDA" for v in report["checks"].values())
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--print-requirements"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fvcore==" in proc.stdout and "clip-anytorch==" in proc.stdout


def test_shard_from_env_reads_torchrun_and_slurm():
    from argparse import Namespace

    from cli.precompute import shard_from_env  # tools/cli

    def shard(environ):
        args = Namespace(shard=0, num_shards=1, shard_from_env=True, device="cpu")
        shard_from_env(args, environ)
        return args.shard, args.num_shards

    assert shard({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8)
    assert shard(
        {
            "SLURM_ARRAY_TASK_ID": "12",
            "SLURM_ARRAY_TASK_MIN": "10",
            "SLURM_ARRAY_TASK_COUNT": "4",
            "SLURM_PROCID": "0",
        }
    ) == (2, 4)
    assert shard({"SLURM_PROCID": "5", "SLURM_NTASKS": "6"}) == (5, 6)
    with pytest.raises(ValueError, match="--shard I --num-shards N"):
        shard({})
