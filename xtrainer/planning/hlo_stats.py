"""Per-device FLOPs and collective traffic of a compiled (SPMD-partitioned, optimized) XLA program.

XLA's `cost_analysis()` counts the body of a `while` loop once, whatever its trip count, so a step
with a scanned layer stack or a scanned gradient-accumulation window is undercounted by the trip
count (measured: 5.0e12 against 1.1e14 FLOPs for a scanned 7B step). This module reads the
compiled HLO text instead:

- FLOPs: every `dot` (2 x output elements x contracted size) and `convolution` (2 x output elements
  x kernel input features x kernel window; XLA:TPU writes most matmuls as convolutions), inside
  fusions and calls, with each `while` body multiplied by its trip count (read from the loop's
  condition, initial counter and increment). Elementwise work is left out: it is not model FLOPs.
- Collectives: all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute (their
  async `-start` forms included), with the bytes each moves on one device and the size of its
  device group, also multiplied by loop trip counts. XLA:TPU splits one async collective into start,
  continuation and done fusions that each hold a copy of it; copies share a channel id and are
  counted once per loop body.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16, "token": 0}
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclass
class Instruction:
    name: str
    shape: str  # the result type text, e.g. "bf16[2,64]{1,0}" or "(s32[], f32[4])"
    op: str
    operands: list[str]
    attrs: str  # everything after the operand list
    constant: int | None = None  # the value of an integer scalar `constant` (loop bounds and counters)
    raw_operands: str = ""  # the text between the parentheses (a parameter's index, a constant's value)
    root: bool = False

    @property
    def parameter_index(self) -> int | None:
        return int(self.raw_operands) if self.op == "parameter" and self.raw_operands.strip().isdigit() else None

    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(self.shape)]


@dataclass
class Collective:
    """One collective kind's totals on one device for one step."""

    count: int = 0
    bytes: float = 0.0  # the larger of the data in and out, per device, summed over executions
    ring_bytes: float = 0.0  # what a ring algorithm sends from one device (see `ring_factor`)


@dataclass
class HloStats:
    """What one device does in one execution of the program."""

    flops: float = 0.0
    hbm_bytes: float = 0.0  # bytes read and written by the program's kernels (an estimate; see _op_traffic)
    collectives: dict[str, Collective] = field(default_factory=dict)
    loops: list[tuple[str, int]] = field(default_factory=list)  # (while instruction, trip count)
    unknown_custom_calls: int = 0  # custom calls whose FLOPs are not known (e.g. hand-written kernels)

    def collective_bytes(self) -> dict[str, float]:
        return {kind: c.bytes for kind, c in self.collectives.items()}


def _split_type(text: str) -> tuple[str, str]:
    """(type text, rest) for text that starts with an HLO type (a tuple type may nest parentheses)."""
    if not text.startswith("("):
        end = text.find(" ")
        return (text, "") if end < 0 else (text[:end], text[end + 1:])
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return text[: i + 1], text[i + 1:].lstrip()
    return text, ""


def _split_call(text: str) -> tuple[str, str, str]:
    """(op name, operand text, attributes) of `op(operands), attrs`."""
    open_at = text.find("(")
    if open_at < 0:
        return text.strip(), "", ""
    depth = 0
    for i in range(open_at, len(text)):
        depth += text[i] == "("
        depth -= text[i] == ")"
        if depth == 0:
            return text[:open_at].strip(), text[open_at + 1: i], text[i + 1:]
    return text[:open_at].strip(), text[open_at + 1:], ""


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str | None, dict[str, Instruction]]:
    """(computation name -> instructions, entry computation name, instruction name -> instruction)."""
    computations: dict[str, list[Instruction]] = {}
    by_name: dict[str, Instruction] = {}
    entry = None
    current = None
    for line in text.splitlines():
        if not line.startswith(" "):
            match = _COMPUTATION.match(line)
            if match:
                current = match.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            elif line.startswith("}"):
                current = None
            continue
        match = _INSTRUCTION.match(line)
        if current is None or not match:
            continue
        shape, rest = _split_type(line[match.end():])
        op, operand_text, attrs = _split_call(rest)
        instruction = Instruction(match.group(2), shape, op, re.findall(r"%([\w.\-]+)", operand_text), attrs,
                                  raw_operands=operand_text, root=bool(match.group(1)))
        computations[current].append(instruction)
        by_name[instruction.name] = instruction
    return computations, entry, by_name


def _elements(dims: tuple[int, ...]) -> int:
    return math.prod(dims) if dims else 1


def _nbytes(instruction: Instruction) -> float:
    """The largest array of an instruction's result (a tuple's biggest member)."""
    return max((_elements(dims) * _DTYPE_BYTES.get(dtype, 4) for dtype, dims in instruction.arrays()), default=0)


def _dims_attr(attrs: str, key: str) -> list[int]:
    match = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _dot_flops(instruction: Instruction, by_name: dict[str, Instruction]) -> float:
    arrays = instruction.arrays()
    if not arrays or not instruction.operands:
        return 0.0
    lhs = by_name.get(instruction.operands[0])
    lhs_dims = lhs.arrays()[0][1] if lhs is not None and lhs.arrays() else ()
    contracted = _elements(tuple(lhs_dims[d] for d in _dims_attr(instruction.attrs, "lhs_contracting_dims")
                                 if d < len(lhs_dims)))
    return 2.0 * _elements(arrays[0][1]) * contracted


def _convolution_flops(instruction: Instruction, by_name: dict[str, Instruction]) -> float:
    """2 x (output batch x output features) x kernel input features x valid (input, window) pairs per
    spatial dim. XLA:TPU writes batched matmuls as convolutions that slide over a padded batch or
    head dim; padding positions do no work, so they are not counted."""
    arrays = instruction.arrays()
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attrs)
    if not arrays or len(instruction.operands) < 2 or labels is None:
        return 0.0
    lhs, rhs = by_name.get(instruction.operands[0]), by_name.get(instruction.operands[1])
    if lhs is None or rhs is None or not lhs.arrays() or not rhs.arrays():
        return 0.0
    lhs_dims, rhs_dims, out_dims = lhs.arrays()[0][1], rhs.arrays()[0][1], arrays[0][1]
    lhs_labels, rhs_labels, out_labels = labels.groups()
    if len(lhs_labels) != len(lhs_dims) or len(rhs_labels) != len(rhs_dims) or len(out_labels) != len(out_dims):
        return 0.0
    window = _window(instruction.attrs, sum(ch.isdigit() for ch in rhs_labels))
    pairs = 1
    for d, spec in enumerate(window):
        digit = str(d)
        pairs *= _valid_pairs(lhs_dims[lhs_labels.index(digit)], out_dims[out_labels.index(digit)],
                              rhs_dims[rhs_labels.index(digit)], spec)
    non_spatial = out_dims[out_labels.index("b")] * out_dims[out_labels.index("f")]
    return 2.0 * non_spatial * rhs_dims[rhs_labels.index("i")] * pairs


def _window(attrs: str, rank: int) -> list[dict[str, int]]:
    """Per spatial dim: size, stride, padding, dilations of a convolution's `window={...}`."""
    specs = [dict(stride=1, low=0, high=0, lhs_dilate=1, rhs_dilate=1) for _ in range(rank)]
    match = re.search(r"window=\{([^}]*)\}", attrs)
    if not match:
        return specs
    for field_ in match.group(1).split():
        key, _, value = field_.partition("=")
        parts = value.split("x")
        for d, part in enumerate(parts[:rank]):
            if key == "pad":
                low, _, high = part.partition("_")
                specs[d]["low"], specs[d]["high"] = int(low), int(high)
            elif key in ("stride", "lhs_dilate", "rhs_dilate"):
                specs[d][key] = int(part)
    return specs


def _valid_pairs(in_size: int, out_size: int, win_size: int, spec: dict[str, int]) -> int:
    """(output position, window position) pairs of one spatial dim that read a real input element."""
    stride, low, ld, rd = spec["stride"], spec["low"], spec["lhs_dilate"], spec["rhs_dilate"]
    last = (in_size - 1) * ld  # the last real element of the (dilated) input
    total = 0
    for k in range(win_size):
        offset = k * rd - low  # input index = o * stride + offset
        first_o = max(0, -(-(-offset) // stride))  # smallest o with index >= 0
        last_o = min(out_size - 1, (last - offset) // stride) if last - offset >= 0 else -1
        if last_o < first_o:
            continue
        if ld == 1:
            total += last_o - first_o + 1
        else:
            total += sum(1 for o in range(first_o, last_o + 1) if (o * stride + offset) % ld == 0)
    return total


def _group_size(attrs: str) -> int:
    """Devices in one replica group of a collective (the three spellings XLA prints)."""
    mesh_form = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if mesh_form:
        sizes = {name.strip("' "): int(size) for name, size in re.findall(r"'?([\w]+)'?=(\d+)", mesh_form.group(1))}
        axes = [a.strip("' ") for a in mesh_form.group(2).split(",") if a.strip()]
        return math.prod(sizes.get(a, 1) for a in axes) or 1
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if listed:
        return len([d for d in listed.group(1).split(",") if d]) or 1
    pairs = re.search(r"source_target_pairs=\{([^}]*)\}", attrs)
    return 2 if pairs else 1


def ring_factor(kind: str, group: int) -> float:
    """Bytes a ring algorithm sends from one device, per byte of the collective's data (the larger side)."""
    if group <= 1:
        return 0.0
    share = (group - 1) / group
    return {"all-reduce": 2 * share, "collective-permute": 1.0}.get(kind, share)


def _collective_kind(instruction: Instruction) -> str | None:
    op = instruction.op
    for kind in COLLECTIVE_KINDS:
        if op == kind or op == kind + "-start":
            return kind
    return None


def _trip_count(loop: Instruction, computations, by_name) -> int:
    """A while loop's trip count from `counter < bound` in its condition, the counter's initial value and
    the step the body adds to it.

    The counter is the tuple element the condition compares (not always element 0: XLA:TPU's windowed
    einsum loops keep it further down), and its step is what the body's ROOT tuple puts back in that
    element (those loops are unrolled by two and add 2)."""
    condition = re.search(r"condition=%([\w.\-]+)", loop.attrs)
    body = re.search(r"body=%([\w.\-]+)", loop.attrs)
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
    if known:
        return int(known.group(1))
    if condition is None:
        return 1

    def through_copies(name):
        instruction, seen = by_name.get(name), 0
        while instruction is not None and instruction.op in ("copy", "bitcast", "convert") and seen < 8:
            instruction = by_name.get(instruction.operands[0]) if instruction.operands else None
            seen += 1
        return instruction

    def constant(name):
        instruction = through_copies(name)
        return instruction.constant if instruction is not None and instruction.op == "constant" else None

    def tuple_index(name):
        instruction = through_copies(name)
        if instruction is None or instruction.op != "get-tuple-element":
            return None
        found = re.search(r"index=(\d+)", instruction.attrs)
        return int(found.group(1)) if found else None

    bound, direction, counter = None, "LT", 0
    for instruction in computations.get(condition.group(1), []):
        if instruction.op == "compare" and len(instruction.operands) == 2:
            found = re.search(r"direction=(\w+)", instruction.attrs)
            direction = found.group(1) if found else "LT"
            bound = constant(instruction.operands[1])
            index = tuple_index(instruction.operands[0])
            counter = index if index is not None else 0
    if bound is None:
        return 1
    start = 0
    init = by_name.get(loop.operands[0]) if loop.operands else None
    if init is not None and init.op == "tuple" and len(init.operands) > counter:
        value = constant(init.operands[counter])
        start = value if value is not None else 0
    step = 1
    body_instructions = computations.get(body.group(1) if body else "", [])
    root = next((i for i in body_instructions if i.root), None)
    update = through_copies(root.operands[counter]) if root is not None and root.op == "tuple" and len(
        root.operands) > counter else None
    if update is not None and update.op == "add" and len(update.operands) == 2:
        for mine, other in (update.operands, update.operands[::-1]):
            if tuple_index(mine) == counter and constant(other):
                step = constant(other)
                break
    span = bound - start + (1 if direction == "LE" else 0)
    return max(1, -(-span // max(step, 1)))


# Instructions that move no data of their own: structure, aliases and the wrappers of async ops.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "optimization-barrier", "add-dependency",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done", "async-done",
               "async-update"}
_SLICING = {"dynamic-slice", "slice", "gather"}


def _op_traffic(instruction: Instruction, computations, by_name) -> float:
    """Bytes one top-level instruction reads and writes in HBM.

    A fusion that only slices an operand (a scanned layer reading its weights out of the stacked
    array) reads the slice, and one whose root is a dynamic-update-slice writes only the update.
    """
    if instruction.op in _NO_TRAFFIC or instruction.op.endswith("-done") or (
            instruction.op == "custom-call" and "AsyncCollective" in instruction.attrs):
        return 0.0
    fused = None
    if instruction.op == "fusion":
        callee = re.search(r"calls=%([\w.\-]+)", instruction.attrs)
        fused = computations.get(callee.group(1)) if callee else None
    params, users = {}, defaultdict(list)
    for inner in fused or []:
        if inner.op == "parameter":
            params[inner.parameter_index] = inner
        for operand in inner.operands:
            users[operand].append(inner)
    read = 0.0
    for position, operand in enumerate(instruction.operands):
        source = by_name.get(operand)
        if source is None:
            continue
        size = sum(_elements(d) * _DTYPE_BYTES.get(t, 4) for t, d in source.arrays())
        if fused:
            param = params.get(position)
            consumers = users.get(param.name, []) if param is not None else []
            if consumers and all(c.op in _SLICING for c in consumers):
                size = sum(_nbytes(c) for c in consumers)
        read += size
    written = sum(_elements(d) * _DTYPE_BYTES.get(t, 4) for t, d in instruction.arrays())
    if fused:
        root = next((inner for inner in fused if inner.root), fused[-1])
        roots = [by_name.get(o) for o in root.operands] if root is not None and root.op == "tuple" else [root]
        if roots and all(r is not None and r.op == "dynamic-update-slice" for r in roots):
            written = sum(_nbytes(by_name[r.operands[1]]) for r in roots if len(r.operands) > 1 and r.operands[1] in by_name)
    return read + written


def analyze(text: str) -> HloStats:
    """HloStats of one device for the compiled HLO module text (`compiled.as_text()`)."""
    computations, entry, by_name = parse_module(text)
    _read_constants(text, by_name)
    stats = HloStats()
    per_kind: dict[str, Collective] = defaultdict(Collective)
    flops_cache: dict[str, float] = {}

    def inner_flops(name: str, stack=()) -> float:
        """FLOPs of one execution of a computation (loops inside it multiplied by their trip counts)."""
        if name in flops_cache:
            return flops_cache[name]
        if name in stack:
            return 0.0
        total = 0.0
        for instruction in computations.get(name, []):
            if instruction.op == "dot":
                total += _dot_flops(instruction, by_name)
            elif instruction.op == "convolution":
                total += _convolution_flops(instruction, by_name)
            elif instruction.op == "while":
                trips = _trip_count(instruction, computations, by_name)
                body = re.search(r"body=%([\w.\-]+)", instruction.attrs)
                total += trips * inner_flops(body.group(1), stack + (name,)) if body else 0.0
                continue
            elif instruction.op == "conditional":
                branches = _BRANCHES.search(instruction.attrs)
                names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else [
                    callee for key, callee in _CALLEE.findall(instruction.attrs) if key.endswith("computation")]
                total += max((inner_flops(n, stack + (name,)) for n in names), default=0.0)
                continue
            for key, callee in _CALLEE.findall(instruction.attrs):
                if key in ("calls",):
                    total += inner_flops(callee, stack + (name,))
        flops_cache[name] = total
        return total

    def collectives(name: str, multiplier: float, stack=()) -> None:
        """Adds the collectives of one loop scope (a computation and the fusions it calls)."""
        seen_channels: set[str] = set()

        def visit(comp: str, depth_stack) -> None:
            for instruction in computations.get(comp, []):
                if instruction.op == "while":
                    trips = _trip_count(instruction, computations, by_name)
                    stats.loops.append((instruction.name, trips))
                    body = re.search(r"body=%([\w.\-]+)", instruction.attrs)
                    if body and body.group(1) not in depth_stack:
                        collectives(body.group(1), multiplier * trips, depth_stack + (comp,))
                    continue
                kind = _collective_kind(instruction)
                callee_names = [callee for key, callee in _CALLEE.findall(instruction.attrs) if key == "calls"]
                if kind is None and instruction.op == "fusion" and any(c.startswith("all-reduce-scatter")
                                                                       for c in callee_names):
                    kind = "reduce-scatter"  # XLA:TPU's reduce-scatter: an all-reduce fused with its slice
                if kind is not None:
                    channel = re.search(r"channel_id=(\d+)", instruction.attrs)
                    key = channel.group(1) if channel else None
                    if key is not None and key in seen_channels:
                        continue
                    if key is not None:
                        seen_channels.add(key)
                    operand_bytes = max((_nbytes(by_name[o]) for o in instruction.operands if o in by_name), default=0)
                    data = max(_nbytes(instruction), operand_bytes)
                    if instruction.op == "fusion":
                        inner = [i for c in callee_names for i in computations.get(c, []) if _collective_kind(i)]
                        attrs = inner[0].attrs if inner else instruction.attrs
                    else:
                        attrs = instruction.attrs
                    entry_ = per_kind[kind]
                    entry_.count += int(multiplier)
                    entry_.bytes += multiplier * data
                    entry_.ring_bytes += multiplier * data * ring_factor(kind, _group_size(attrs))
                    continue
                if instruction.op == "conditional":
                    branches = _BRANCHES.search(instruction.attrs)
                    for callee in re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []:
                        if callee not in depth_stack:
                            visit(callee, depth_stack + (comp,))
                    continue
                for callee in callee_names:
                    if callee not in depth_stack:
                        visit(callee, depth_stack + (comp,))

        visit(name, stack)

    def traffic(name: str, multiplier: float, stack=()) -> None:
        """HBM traffic of the kernels of one computation that is not a fusion body."""
        for instruction in computations.get(name, []):
            callees = []
            if instruction.op == "while":
                body = re.search(r"body=%([\w.\-]+)", instruction.attrs)
                if body:
                    callees.append((body.group(1), multiplier * _trip_count(instruction, computations, by_name)))
            elif instruction.op == "call":
                callees += [(c, multiplier) for k, c in _CALLEE.findall(instruction.attrs) if k == "to_apply"]
            elif instruction.op == "conditional":
                branches = _BRANCHES.search(instruction.attrs)
                names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
                callees += [(names[0], multiplier)] if names else []
            else:
                stats.hbm_bytes += multiplier * _op_traffic(instruction, computations, by_name)
            for callee, times in callees:
                if callee not in stack:
                    traffic(callee, times, stack + (name,))

    if entry is None:
        return stats
    traffic(entry, 1.0)
    stats.flops = inner_flops(entry)
    collectives(entry, 1.0)
    stats.collectives = dict(per_kind)
    stats.unknown_custom_calls = sum(
        1 for comp in computations.values() for i in comp
        if i.op == "custom-call" and "tpu_custom_call" in i.attrs)
    return stats


def _read_constants(text: str, by_name: dict[str, Instruction]) -> None:
    """Attaches integer scalar values to `constant` instructions (loop bounds and counters)."""
    for match in re.finditer(r"%([\w.\-]+)\s*=\s*[su]\d+\[\]\S*\s+constant\((-?\d+)\)", text):
        instruction = by_name.get(match.group(1))
        if instruction is not None:
            instruction.constant = int(match.group(2))
