"""Which backend a run takes on a TPU pod (backends/registry.py: pod_backend, tpu_host_count).

torch_xla 2.9 drives one host per process group in xtrainer, so backend="auto" sends a PyTorch model on a
multi-host slice to jax through torchax, which has multi-host; a single host keeps torch_xla."""

import pytest
import torch

from xtrainer.backends import registry
from xtrainer.backends.registry import MULTI_HOST_TORCH_ROUTE, pod_backend, resolve_backend_name, tpu_host_count

ALL = ["torch", "jax", "torch_xla"]


def test_a_torch_model_on_a_multi_host_slice_goes_to_jax(monkeypatch):
    monkeypatch.setattr(registry, "_importable", lambda name: True)
    assert pod_backend("torch", 16, ALL) == ("jax", MULTI_HOST_TORCH_ROUTE)
    assert pod_backend("torch", 1, ALL)[0] == "torch_xla"
    assert pod_backend("torch", 1, ["torch", "jax"])[0] == "jax"  # no torch_xla: torchax on one host too
    assert pod_backend("flax", 64, ALL)[0] == "jax"
    assert "backend='jax'" in MULTI_HOST_TORCH_ROUTE and "torchax" in MULTI_HOST_TORCH_ROUTE
    monkeypatch.setattr(registry, "_importable", lambda name: False)
    backend, reason = pod_backend("torch", 4, ALL)
    assert backend == "jax" and "pip install 'xtrainer[xla]'" in reason


def test_hosts_of_the_slice_come_from_the_tpu_environment(monkeypatch):
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    assert tpu_host_count() == 1
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-128")
    assert tpu_host_count() == 16  # the v5p-128 preset: 64 chips on 16 VMs
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
    assert tpu_host_count() == 4


@pytest.mark.parametrize("hosts, expected", [("w0", "torch_xla"), ("w0,w1", "jax")])
def test_auto_picks_the_route_for_a_torch_model_on_a_tpu_host(monkeypatch, hosts, expected):
    monkeypatch.setattr(registry, "detect_accelerator", lambda: "tpu")
    monkeypatch.setattr(registry, "available_backends", lambda: list(ALL))
    monkeypatch.setattr(registry, "_importable", lambda name: True)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", hosts)
    assert resolve_backend_name("auto", torch.nn.Linear(2, 2)) == expected
