#!/usr/bin/env bash
# The shapes-world ablations of docs/SHAPES.md, run side by side on one GPU machine (16 cores):
#   d1200: the default world at 1200 iterations, plus three checks of single settings of ViLD
#          (distillation weight, gradient clipping, learning rate), trained in parallel;
#   s1200: a second world (seed 1, other novel categories) at 1200 iterations;
#   d600:  the default world at 600 iterations;
#   o1200: the default world at 1200 iterations with the first teacher (object crops only).
# Each run is `demo/run_shapes.py ablation` exactly as on a CPU, plus MODEL.DEVICE $DEVICE.
#
# Usage: OUT=results/ bash demo/gpu_ablations.sh
#   SMOKE=1 DEVICE=cpu: the same at toy size, to try the script on a CPU.
# A machine without the stack installed can take its pure-Python packages from a folder on
# PYTHONPATH (SITE, default .site/): detectron2 fvcore iopath yacs omegaconf hydra antlr4 lvis
# clip ftfy wcwidth termcolor pkg_resources setuptools, plus pycocotools built for its Python.
set -u
OUT=${OUT:-gpu_results}
SITE=${SITE:-$PWD/.site}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-520}  # seconds for the runs; what finished by then is collected
LONG=1200
SHORT=600
FIRST_STEPS=600  # the first teacher's schedule (object crops)
TINY=()
if [ -n "${SMOKE:-}" ]; then
  LONG=4
  SHORT=2
  FIRST_STEPS=3
  TINY=(--num-train 8 --num-val 4 --teacher-steps 3 --teacher-crops 2 --proposals 16
        --rpn-iters 4)
fi
mkdir -p "$OUT" runs
export PYTHONPATH="$SITE:$PWD:$PWD/runtime" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3 MKL_NUM_THREADS=3
python3 -c "import torch, detectron2, clip, lvis, pycocotools, vild_d2
print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
  || exit 3

OPTS=(MODEL.DEVICE "$DEVICE" DATALOADER.NUM_WORKERS 3)
SECOND=(--seed 1 --novel "red circle" "orange square" "yellow triangle" "green star"
        "blue cross" "purple heart")

run() {  # name, then run_shapes.py arguments
  local name=$1
  shift
  local start=$SECONDS
  timeout "$BUDGET" python3 demo/run_shapes.py ablation --output "runs/$name" \
    --datasets "worlds/$name" --teacher-device "$DEVICE" "${TINY[@]}" "$@" --opts "${OPTS[@]}" \
    > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" >> "$OUT/status.txt"
}

# d1200's checks: each trains the vild variant with one override, in its own process, once
# d1200's common stages (world ... targets) exist; the pipeline finds those cached.
cat > runs/checks.py <<'PY'
import multiprocessing as mp
import sys

sys.path.insert(0, "demo")
from shapes_pipeline import REPO, ShapesOptions, ShapesPipeline  # noqa: E402

ITERS, TINY, OPTS = int(sys.argv[1]), sys.argv[2], tuple(sys.argv[3:])
CHECKS = {
    "vild_w1.41": ("MODEL.VILD.DISTILL_WEIGHT", "1.41"),  # the L1 sum's scale at D = 64 vs 512
    "vild_noclip": ("SOLVER.CLIP_GRADIENTS.ENABLED", "False"),
    "vild_lr0.01": ("SOLVER.BASE_LR", "0.01"),
}


def check(name):
    small = dict(num_train=8, num_val=4, teacher_steps=3, teacher_crops=2, proposals=16)
    options = ShapesOptions(output="runs/d1200", datasets="worlds/d1200", iters=ITERS,
                            extra_opts=OPTS, teacher_device=OPTS[1], **(small if TINY else {}))
    pipeline = ShapesPipeline(options, REPO)
    pipeline.run_common()  # cached: d1200 made every common stage with the same options
    pipeline.run_variant("vild", name=name, overrides=CHECKS[name])


if __name__ == "__main__":
    with mp.Pool(len(CHECKS)) as pool:
        pool.map(check, CHECKS)
PY
checks() {
  until [ -f runs/d1200/stages/targets.json ]; do sleep 5; done
  timeout "$BUDGET" python3 runs/checks.py "$LONG" "${SMOKE:-}" "${OPTS[@]}" \
    > "$OUT/checks.log" 2>&1
  echo "checks: exit $?" >> "$OUT/status.txt"
}

run d1200 --iters "$LONG" &
checks &
run s1200 --iters "$LONG" "${SECOND[@]}" &
run d600 --iters "$SHORT" &
run o1200 --iters "$LONG" --teacher-data crops --teacher-steps "$FIRST_STEPS" &
wait
# Every results.json written, finished ablations' tables and stage times, in one archive.
tar czf "$OUT/results.tgz" runs/*/ablation.* runs/*/run_ablation.json runs/*/stages \
  runs/*/teacher/*.json runs/*/*/inference/shapes_val/results.json 2>/dev/null
cat "$OUT/status.txt"
