"""FLOPs and collectives read from compiled HLO text (xtrainer/planning/hlo_stats.py): loop trip counts,
padded convolutions, collectives split into async parts. No TPU compiler needed."""

import pytest

from xtrainer.planning.hlo_stats import analyze, ring_factor

# A loop of 6 iterations around a fused dot, an async all-gather split into two copies that share a
# channel id (XLA:TPU's start/done fusions), a convolution and an all-reduce over 4 devices.
MODULE = """HloModule m, is_scheduled=true

%fused_dot (p0: bf16[8,16], p1: bf16[16,32]) -> bf16[8,32] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,32]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (param: (s32[], bf16[8,16], bf16[16,32])) -> (s32[], bf16[8,16], bf16[16,32]) {
  %param = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%param), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%gte.0, %one)
  %x = bf16[8,16]{1,0} get-tuple-element(%param), index=1
  %w = bf16[16,32]{1,0} get-tuple-element(%param), index=2
  %fusion.1 = bf16[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %ag.start = bf16[64,32]{1,0} all-gather(%fusion.1), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}
  %ag.done = bf16[64,32]{1,0} all-gather(%fusion.1), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %t = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) tuple(%next, %x, %w)
}

%cond (param.c: (s32[], bf16[8,16], bf16[16,32])) -> pred[] {
  %param.c = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param.c), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x.1 = f32[] parameter(0)
  %y.1 = f32[] parameter(1)
  ROOT %sum = f32[] add(%x.1, %y.1)
}

ENTRY %main (a: bf16[8,16], b: bf16[16,32]) -> bf16[8,16] {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,32]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %copy.z = s32[] copy(%zero)
  %init = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) tuple(%copy.z, %a, %b)
  %loop = (s32[], bf16[8,16]{1,0}, bf16[16,32]{1,0}) while(%init), condition=%cond, body=%body
  %conv = bf16[8,32]{1,0} convolution(%a, %b), dim_labels=bf_io->bf
  %ar = f32[8,32]{1,0} all-reduce(%conv), channel_id=9, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %r = bf16[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_loop_bodies_count_once_per_iteration():
    stats = analyze(MODULE)
    assert stats.loops == [("loop", 6)]
    dot, conv = 2 * 8 * 32 * 16, 2 * 8 * 32 * 16
    assert stats.flops == 6 * dot + conv


def test_collectives_dedupe_async_copies_and_scale_by_trips():
    stats = analyze(MODULE)
    gather, reduce = stats.collectives["all-gather"], stats.collectives["all-reduce"]
    assert gather.count == 6  # one per iteration, not two
    assert gather.bytes == 6 * 64 * 32 * 2
    assert gather.ring_bytes == pytest.approx(gather.bytes * 7 / 8)
    assert reduce.count == 1 and reduce.bytes == 8 * 32 * 4
    assert reduce.ring_bytes == pytest.approx(reduce.bytes * 2 * 3 / 4)


def test_padded_convolution_counts_only_real_inputs():
    # XLA:TPU writes batched matmuls as convolutions over a padded dim; padding positions do no work.
    module = """HloModule c

ENTRY %main (l: bf16[4,8,16], r: bf16[4,16,32]) -> bf16[4,8,32] {
  %l = bf16[4,8,16]{2,1,0} parameter(0)
  %r = bf16[4,16,32]{2,1,0} parameter(1)
  ROOT %conv = bf16[4,8,32]{2,1,0} convolution(%l, %r), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=0bf_0io->0bf
}
"""
    # Output position o reads input o + k - 3 for window position k: 1 + 2 + 3 + 4 real pairs.
    assert analyze(module).flops == 2 * (8 * 32) * 16 * 10


def test_ring_factor():
    assert ring_factor("all-gather", 1) == 0.0
    assert ring_factor("all-reduce", 4) == pytest.approx(1.5)
    assert ring_factor("reduce-scatter", 8) == pytest.approx(7 / 8)


def test_a_compiled_scan_on_cpu_counts_every_iteration():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def loss(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

    layers, rows, width = 5, 32, 64
    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((layers, width, width)), jnp.ones((rows, width))).compile()
    stats = analyze(compiled.as_text())
    # Forward and two backward matmuls per layer; XLA's own cost analysis counts the loop body once.
    assert stats.flops == layers * 3 * 2 * rows * width * width
    assert compiled.cost_analysis()["flops"] < stats.flops / 2


# XLA:TPU's windowed-einsum loops: the counter is tuple element 2, the condition compares it with 8, and the
# body (unrolled by two) uses counter + 1 for its second chunk but puts counter + 2 back: 4 iterations.
WINDOWED = """HloModule w, is_scheduled=true

%wbody (wp: (bf16[8,16], bf16[16,32], u32[])) -> (bf16[8,16], bf16[16,32], u32[]) {
  %wp = (bf16[8,16]{1,0}, bf16[16,32]{1,0}, u32[]) parameter(0)
  %x = bf16[8,16]{1,0} get-tuple-element(%wp), index=0
  %w = bf16[16,32]{1,0} get-tuple-element(%wp), index=1
  %k = u32[] get-tuple-element(%wp), index=2
  %one = u32[] constant(1)
  %two = u32[] constant(2)
  %second = u32[] add(%k, %one)
  %d1 = bf16[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %d2 = bf16[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %next = u32[] add(%k, %two)
  ROOT %wt = (bf16[8,16]{1,0}, bf16[16,32]{1,0}, u32[]) tuple(%x, %w, %next)
}

%wcond (wc: (bf16[8,16], bf16[16,32], u32[])) -> pred[] {
  %wc = (bf16[8,16]{1,0}, bf16[16,32]{1,0}, u32[]) parameter(0)
  %i = u32[] get-tuple-element(%wc), index=2
  %n = u32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[8,16], b: bf16[16,32]) -> bf16[8,16] {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,32]{1,0} parameter(1)
  %zero = u32[] constant(0)
  %init = (bf16[8,16]{1,0}, bf16[16,32]{1,0}, u32[]) tuple(%a, %b, %zero)
  %loop = (bf16[8,16]{1,0}, bf16[16,32]{1,0}, u32[]) while(%init), condition=%wcond, body=%wbody
  ROOT %r = bf16[8,16]{1,0} get-tuple-element(%loop), index=0
}
"""


def test_a_loop_counter_elsewhere_in_the_tuple_with_a_step_of_two():
    stats = analyze(WINDOWED)
    assert stats.loops == [("loop", 4)]
    assert stats.flops == 4 * 2 * (2 * 8 * 32 * 16)
