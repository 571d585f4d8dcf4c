"""Logical axis names of the reference models, and mapping them to mesh axes.

Owns the vocabulary of logical names and two helpers a backend uses to place parameters.
Every parameter of `LlamaForCausalLM` and `BertForSequenceClassification` records one logical
name (or None = never sharded) per dimension in its flax variable metadata (`out_sharding` on
flax >= 0.12, `sharding_names` on flax 0.11), so `nnx.get_partition_spec` under
`flax.linen.logical_axis_rules(...)` works too; the helpers here work on both flax versions.

Logical names:
    vocab     vocabulary rows of token embeddings / columns of the LM head
    embed     model width (hidden_size) on every weight that reads or writes the residual stream
    mlp       feed-forward intermediate width (intermediate_size)
    heads     query attention heads (also the output projection's head axis)
    kv_heads  key/value heads; separate from `heads` so GQA models with few kv heads can
              replicate them while query heads are split
    kv        per-head feature width (head_dim)
    norm      scale/bias vectors of RMSNorm/LayerNorm (normally replicated)
    None      small axes never worth sharding: BERT positions, token types, class labels,
              the pooler's output width

Parameters are not sharded at construction unless flax eager sharding is on *and* a mesh and
logical rules are active (`with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):`);
otherwise the names are recorded and the backend places the values, e.g. by jitting the
constructor with `out_shardings` built from `logical_partition_specs`.

The forward passes carry no activation sharding annotations, so they expect meshes whose axes are
`AxisType.Auto` (GSPMD propagation). Under an Explicit-axes mesh (jax.make_mesh's default on
jax >= 0.8) the embedding gather asks for an explicit out_sharding and fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from ._nn import variable_names

LOGICAL_AXIS_NAMES: tuple[str, ...] = ("vocab", "embed", "mlp", "heads", "kv_heads", "kv", "norm")

# An example mapping for a ("data", "fsdp", "tensor") mesh: FSDP over the model width,
# tensor parallelism over vocab/MLP/heads. Backends may pass any rules of this shape.
EXAMPLE_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("norm", None),
)


def logical_axes(model: nnx.Module) -> dict[str, tuple[str | None, ...] | None]:
    """{'model/layers/0/self_attn/q_proj/kernel': ('embed', 'heads', 'kv'), ...} for every Param."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            out["/".join(map(str, path))] = variable_names(node)
    return out


def _to_spec(names: Sequence[str | None] | None, rules: Mapping[str, Any]) -> PartitionSpec:
    if names is None:
        return PartitionSpec()
    used: set[str] = set()
    axes = []
    for name in names:
        mesh_axes = rules.get(name) if name is not None else None
        flat = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        # A mesh axis may appear only once per PartitionSpec; a later dimension that maps to an
        # axis already used stays replicated instead of failing.
        if any(a in used for a in flat):
            mesh_axes, flat = None, ()
        used.update(flat)
        axes.append(mesh_axes)
    return PartitionSpec(*axes)


def logical_partition_specs(model_or_state: Any, rules: Iterable[tuple[str, Any]]) -> Any:
    """A pytree shaped like `nnx.state(model)` whose leaves are PartitionSpecs.

    `rules` maps logical names to mesh axis names (a name, a tuple of names, or None), e.g.
    `EXAMPLE_RULES`. Unknown logical names and unannotated variables are replicated. Use the result
    with `jax.lax.with_sharding_constraint` / `jax.jit(out_shardings=...)` after wrapping in
    `NamedSharding(mesh, spec)`.
    """
    rules = dict(rules)
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return jax.tree.map(
        lambda v: _to_spec(variable_names(v), rules) if isinstance(v, nnx.Variable) else PartitionSpec(),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
