"""Bridges for running on the pure-Python detectron2 0.6 install with current numpy/Pillow.

Each bridge is applied only when its gap is detected, changes no installed file, and is listed in
:data:`APPLIED` (name -> one-line reason) once :func:`apply_bridges` has run. ``import vild_d2``
runs it before anything imports ``detectron2.layers`` or ``detectron2.data``.

* ``detectron2._C``: the registry sdist has no compiled extension, yet ``detectron2.layers`` imports
  ``_C`` at module load. A placeholder module lets the pure-Python parts (RoIAlign and NMS go
  through torchvision) load; any compiled op (including ``torch.ops.detectron2.nms_rotated``)
  raises :class:`CompiledOpsUnavailable` saying how to get a source build.
* ``PIL.Image.LINEAR``: removed in Pillow 10, referenced by ``detectron2.data.transforms`` at class
  definition time; it was always an alias of ``BILINEAR``.
* ``np.float`` / ``np.int`` / ``np.str`` / ``np.object``: removed in numpy 1.24, used by
  ``lvis.LVISEval.accumulate`` and by detectron2 0.6 (class histogram, VOC loader); they were
  always aliases of the builtins.
* ``create_ddp_model`` on a CPU: detectron2's (which ``DefaultTrainer`` wraps the model with)
  passes the local rank as a CUDA device id, which DDP refuses for a model on the CPU; the
  bridge leaves ``device_ids`` out there (multi-process CPU training, ``vild_d2.engine.launch``).
* ``detectron2.export``: its ``__init__`` imports the Caffe2 exporter, which needs ``caffe2``
  (not in torch 2.x). Applied lazily, by :func:`tracing_adapter_class`: the package is loaded
  without that ``__init__`` (``TracingAdapter`` and the TorchScript helpers need no Caffe2).
"""

import importlib.machinery
import importlib.util
import sys
import types

__all__ = [
    "APPLIED",
    "CompiledOpsUnavailable",
    "apply_bridges",
    "has_compiled_ops",
    "tracing_adapter_class",
]

APPLIED = {}

_SOURCE_BUILD_HINT = (
    "Install detectron2 from source with its compiled ops instead, e.g. "
    "`pip install 'git+https://github.com/facebookresearch/detectron2.git'` "
    "(needs internet and a C++/CUDA toolchain); see the README."
)


class CompiledOpsUnavailable(AttributeError):
    """A detectron2 operation needs ``detectron2._C``, which this install does not have."""


class _MissingCompiledOps(types.ModuleType):
    """Stands in for ``detectron2._C`` on a pure-Python detectron2 install."""

    def __init__(self):
        super().__init__("detectron2._C")
        self.__spec__ = importlib.machinery.ModuleSpec(
            "detectron2._C", None, origin="vild_d2.compat (no compiled ops)"
        )

    # Used by detectron2.utils.collect_env, which default_setup() calls.
    @staticmethod
    def get_compiler_version():
        return "none (pure-Python detectron2, see vild_d2.compat)"

    @staticmethod
    def get_cuda_version():
        return "none (pure-Python detectron2, see vild_d2.compat)"

    @staticmethod
    def has_cuda():
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise CompiledOpsUnavailable(
            f"detectron2._C.{name} is a compiled detectron2 op (deformable conv, rotated boxes, "
            f"rotated RoIAlign, fast COCO eval), but this detectron2 was installed as pure Python "
            f"without compiled ops. {_SOURCE_BUILD_HINT}"
        )


def has_compiled_ops() -> bool:
    """True if detectron2's C++/CUDA extension is really installed (not the placeholder)."""
    module = sys.modules.get("detectron2._C")
    if module is not None:
        return not isinstance(module, _MissingCompiledOps)
    return importlib.util.find_spec("detectron2._C") is not None


_TORCH_OPS = None  # keeps the placeholder op library alive


def _define_missing_torch_ops():
    """``nms_rotated`` is reached through ``torch.ops.detectron2`` (registered by ``_C``): a
    placeholder op that explains itself instead of torch's "no such operator"."""
    global _TORCH_OPS
    import torch

    if _TORCH_OPS is not None:
        return

    def nms_rotated(boxes, scores, iou_threshold):
        return sys.modules["detectron2._C"].nms_rotated  # raises CompiledOpsUnavailable

    _TORCH_OPS = torch.library.Library("detectron2", "DEF")
    _TORCH_OPS.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")
    _TORCH_OPS.impl("nms_rotated", nms_rotated, "CompositeExplicitAutograd")


def _bridge_detectron2_c():
    import detectron2

    if has_compiled_ops():
        return
    stub = _MissingCompiledOps()
    sys.modules["detectron2._C"] = stub
    detectron2._C = stub
    _define_missing_torch_ops()
    APPLIED["detectron2._C"] = "no compiled detectron2 ops: placeholder that explains itself"


def _bridge_pil_linear():
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return
    Image.LINEAR = Image.Resampling.BILINEAR
    APPLIED["PIL.Image.LINEAR"] = "Pillow >= 10 removed it; alias of BILINEAR"


_NUMPY_ALIASES = {"float": float, "int": int, "str": str, "object": object}


def _bridge_numpy_aliases():
    import numpy as np

    missing = [name for name in _NUMPY_ALIASES if name not in vars(np)]
    # numpy < 1.24 still has them (with a deprecation warning): nothing to do.
    if not missing or np.lib.NumpyVersion(np.__version__) < "1.24.0":
        return
    for name in missing:
        setattr(np, name, _NUMPY_ALIASES[name])
    APPLIED["numpy aliases"] = f"numpy >= 1.24 removed np.{{{','.join(missing)}}}; builtins"


def _bridge_ddp_on_cpu():
    from detectron2 import engine
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "vild_d2_bridge", False):
        return

    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        if "device_ids" not in kwargs and next(model.parameters()).device.type == "cpu":
            kwargs["device_ids"] = None  # a CPU module takes none (DDP refuses [local_rank])
        return original(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model.vild_d2_bridge = True
    create_ddp_model.__doc__ = original.__doc__
    # DefaultTrainer.__init__ looks the name up in detectron2.engine.defaults.
    defaults.create_ddp_model = engine.create_ddp_model = create_ddp_model
    APPLIED["create_ddp_model on CPU"] = "detectron2 passes a CUDA device id DDP refuses on CPU"


def apply_bridges():
    """Apply every bridge whose gap is present; idempotent. Returns :data:`APPLIED`."""
    _bridge_detectron2_c()
    _bridge_pil_linear()
    _bridge_numpy_aliases()
    _bridge_ddp_on_cpu()  # imports detectron2.engine: after the bridges its import needs
    return APPLIED


def tracing_adapter_class():
    """detectron2's ``TracingAdapter`` class, through the ``detectron2.export`` bridge when
    ``caffe2`` is missing (see the module docstring)."""
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ModuleNotFoundError as e:
        if "caffe2" not in str(e):
            raise
    spec = importlib.util.find_spec("detectron2.export")
    package = types.ModuleType("detectron2.export")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["detectron2.export"] = package
    from detectron2.export.flatten import TracingAdapter

    package.TracingAdapter = TracingAdapter
    APPLIED["detectron2.export"] = "its __init__ needs caffe2 (not in torch 2.x); loaded without it"
    return TracingAdapter
