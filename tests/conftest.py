import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# JAX tests run on 8 fake CPU devices; this must be set before jax is first imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# In the XLA lane transformers would move its own Trainer (the parity baseline) onto the torch_xla
# device; the baseline is measured on CPU in both lanes. xtrainer's torch_xla tests use torch_xla
# directly, so this only affects transformers' own checks.
os.environ.setdefault("USE_TORCH_XLA", "0")
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _baseline_dataloaders_without_pinned_memory():
    """In the XLA lane, torch_xla registers a PrivateUse1 device without the hooks that pinned
    memory needs, so transformers' own Trainer (the parity baseline, which pins by default) fails
    in its DataLoader. The baseline's numerics do not depend on pinning: turn it off there."""
    import importlib.util

    if importlib.util.find_spec("torch_xla") is None or importlib.util.find_spec("torch") is None:
        return
    import torch.utils.data

    original = torch.utils.data.DataLoader.__init__

    def init(self, *args, **kwargs):
        kwargs["pin_memory"] = False
        original(self, *args, **kwargs)

    torch.utils.data.DataLoader.__init__ = init


_baseline_dataloaders_without_pinned_memory()


def _start_xla_cpu_runtime():
    """In the XLA lane, starts the torch_xla CPU runtime (4 SPMD devices) before any test module runs.

    Now: the autograd engine sizes its device queues at the process's first backward pass, and an
    XLA runtime started after that crashes every XLA backward (pytorch/xla#4174); test modules run
    CPU backward passes in any order. Unoptimised XLA:CPU compiles: the programs of the tests are
    tiny, so LLVM optimisation is nearly all of their compile time. XLA_FLAGS is read once, when the
    runtime starts; its previous value is put back for the other tests (JAX reads it later).
    """
    import importlib.util

    if importlib.util.find_spec("torch_xla") is None:
        return
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ.setdefault("CPU_NUM_DEVICES", "4")
    import torch_xla.runtime as xr

    before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{before or ''} --xla_backend_optimization_level=0".strip()
    try:
        xr.use_spmd()
        assert xr.global_runtime_device_count() == 4
    finally:
        if before is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = before


_start_xla_cpu_runtime()


# The XLA lane exists for the Colab TPU stack: torch_xla, torchax, and transformers/jax versions
# that differ from the main lane's. It runs the tests that exercise that stack (the torch_xla and
# torchax backends, the parity tests against transformers 5.15, the backend-neutral unit tests,
# the Colab notebook, and every test parametrised over torch_xla/torchax); the main lane runs the
# whole suite. XTRAINER_XLA_LANE_FULL=1 runs everything in the XLA lane too.
_XLA_LANE_DIRS = ("tests/backends/torch_xla/", "tests/backends/torchax/", "tests/parity/", "tests/unit/")
_XLA_LANE_WORDS = ("torch_xla", "torchax", "xla", "colab")


def _in_xla_lane_selection(nodeid: str) -> bool:
    return nodeid.startswith(_XLA_LANE_DIRS) or any(word in nodeid.lower() for word in _XLA_LANE_WORDS)


def pytest_collection_modifyitems(config, items):
    import importlib.util

    if importlib.util.find_spec("torch_xla") is None or os.environ.get("XTRAINER_XLA_LANE_FULL") == "1":
        return
    keep, drop = [], []
    for item in items:
        (keep if _in_xla_lane_selection(item.nodeid) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
