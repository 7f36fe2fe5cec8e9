"""Counting what compiled programs move and compute: the bytes of HLO instructions and the dot
FLOPs of Pallas kernels (used by benchmarks/ssd_audit.py; see its docstring for the rules).

``hlo_traffic(hlo_text)``: per kernel custom call (tpu_custom_call / __gpu$xla.gpu.triton) the
bytes of its operands and results, padded as the HLO layout's tile says, and the totals of
XLA's other entry instructions. ``pallas_calls(jaxpr)`` / ``kernel_work(eqn)``: the pallas_call
equations of a program's jaxpr and the dot FLOPs each executes, its body evaluated at every
grid point with loop trip counts and pl.when branches resolved from the program ids.
"""

from __future__ import annotations

import itertools
import math
import re

KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton")
FREE_OPS = {
  "parameter",
  "constant",
  "bitcast",
  "get-tuple-element",
  "tuple",
  "copy-done",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
}
ITEMSIZE = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
_ARRAY = re.compile(r"\b(" + "|".join(ITEMSIZE) + r")\[([\d,]*)\](\{[^{}]*\})?")


# ----------------------------------------------------------------------------- HLO text


def array_bytes(dtype, dims, layout):
  """(bytes, in_vmem) of one array: dims padded to the layout's first tile (T(a,b) applies
  to the minor physical dims); memory space S(1) = TPU VMEM."""
  dims = [int(d) for d in dims.split(",") if d]
  phys = list(dims)
  if layout and dims:
    m2m = layout[1:-1].split(":")[0]
    order = [int(v) for v in m2m.split(",") if v.strip()]
    if len(order) == len(dims):
      phys = [dims[i] for i in reversed(order)]
    tile = re.search(r"T\(([\d,]+)\)", layout)
    if tile:
      t = [int(v) for v in tile.group(1).split(",")]
      for k, tk in enumerate(reversed(t)):
        if k < len(phys):
          phys[-1 - k] = -(-phys[-1 - k] // tk) * tk
  vmem = bool(layout) and "S(1)" in layout
  return math.prod(phys) * ITEMSIZE[dtype], vmem


def shapes_bytes(type_text):
  """(total bytes, VMEM bytes, [(dtype, dims)]) of an HLO type (array or tuple)."""
  total = vmem = 0
  sig = []
  for m in _ARRAY.finditer(type_text):
    nb, in_vmem = array_bytes(m.group(1), m.group(2), m.group(3))
    total += nb
    vmem += nb if in_vmem else 0
    sig.append(f"{m.group(1)}[{m.group(2)}]")
  return total, vmem, sig


def _closing(text, start):
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1, "{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def parse_instruction(line):
  m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
  if not m:
    return None
  rest = line[m.end() :]
  end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
  rtype, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([a-z][\w-]*)\(", rest)
  if not op:
    return None
  close = _closing(rest, op.end() - 1)
  operands = re.findall(r"%([\w.\-]+)", rest[op.end() : close - 1])
  attrs = rest[close:]
  target = re.search(r'custom_call_target="([^"]+)"', attrs)
  return dict(
    name=m.group(1),
    type=rtype,
    opcode=op.group(1),
    operands=operands,
    target=target.group(1) if target else None,
    attrs=attrs,
  )


def entry_instructions(hlo):
  lines, inside = [], False
  for line in hlo.splitlines():
    if line.startswith("ENTRY "):
      inside = True
    elif inside and line.startswith("}"):
      break
    elif inside:
      ins = parse_instruction(line)
      if ins:
        lines.append(ins)
  return lines


def _kernel_name(ins):
  m = re.search(r'\bname = "([^"]+)"', ins["attrs"])  # Triton backend_config
  return m.group(1) if m else ins["name"]


def _declared_flops(ins):
  m = re.search(r'"cost_estimate":\{"flops":"(\d+)"', ins["attrs"])
  return int(m.group(1)) if m else None


def hlo_traffic(hlo):
  """Per-kernel records and the XLA-op totals of the entry computation."""
  types, kernels = {}, []
  xla = dict(bytes=0, vmem_bytes=0, count=0)
  for ins in entry_instructions(hlo):
    types[ins["name"]] = ins["type"]
    if ins["opcode"] in FREE_OPS:
      continue
    if ins["opcode"] == "copy-start":
      # an async copy between memory spaces (TPU HBM -> VMEM prefetch of an operand): the
      # array's traffic is already counted, as if in HBM, by the instruction reading it
      continue
    res = shapes_bytes(ins["type"])
    ops = [shapes_bytes(types.get(o, "")) for o in ins["operands"]]
    rd, rv = sum(o[0] for o in ops), sum(o[1] for o in ops)
    if ins["target"] in KERNEL_TARGETS:
      kernels.append(
        dict(
          name=_kernel_name(ins),
          read=rd,
          written=res[0],
          vmem=rv + res[1],
          declared_flops=_declared_flops(ins),
          sig=res[2],
        )
      )
    else:
      xla["bytes"] += rd + res[0]
      xla["vmem_bytes"] += rv + res[1]
      xla["count"] += 1
  return kernels, xla


# ----------------------------------------------------------------------------- kernel jaxprs

_SCALAR_OPS = {
  "add": lambda a, b: a + b,
  "sub": lambda a, b: a - b,
  "mul": lambda a, b: a * b,
  "div": lambda a, b: int(a / b) if isinstance(a, int) else a / b,
  "rem": lambda a, b: int(math.fmod(a, b)) if isinstance(a, int) else math.fmod(a, b),
  "max": max,
  "min": min,
  "neg": lambda a: -a,
  "abs": abs,
  "lt": lambda a, b: a < b,
  "le": lambda a, b: a <= b,
  "gt": lambda a, b: a > b,
  "ge": lambda a, b: a >= b,
  "eq": lambda a, b: a == b,
  "ne": lambda a, b: a != b,
  "and": lambda a, b: a & b,
  "or": lambda a, b: a | b,
  "not": lambda a: not a,
  "select_n": lambda p, *cs: cs[int(p)],
  "clamp": lambda lo, x, hi: min(max(x, lo), hi),
  "sign": lambda a: (a > 0) - (a < 0),
}


def _sub_jaxprs(params):
  for v in params.values():
    for j in v if isinstance(v, (list, tuple)) else [v]:
      inner = getattr(j, "jaxpr", j)
      if hasattr(inner, "eqns"):
        yield inner


def _value(env, v):
  if hasattr(v, "val"):  # Literal
    val = v.val
    return val.item() if hasattr(val, "item") and getattr(val, "ndim", 0) == 0 else val
  return env.get(v)


def _scalar(eqn, ins):
  fn = _SCALAR_OPS.get(eqn.primitive.name)
  if eqn.primitive.name == "convert_element_type" and ins[0] is not None:
    kind = eqn.params["new_dtype"].kind
    return {"b": bool, "i": int, "u": int}.get(kind, float)(ins[0])
  if fn is None or any(i is None or hasattr(i, "shape") for i in ins):
    return None
  if any(getattr(o.aval, "shape", None) != () for o in eqn.outvars):
    return None
  return fn(*ins)


def _dot_flops(eqn):
  (lc, _), _ = eqn.params["dimension_numbers"]
  k = math.prod(eqn.invars[0].aval.shape[d] for d in lc)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * k


def _loop(eqn, ins, pid):
  """FLOPs of a scan (static length) or a fori-style while loop (carry = (i, upper, ...))."""
  if eqn.primitive.name == "scan":
    body = eqn.params["jaxpr"].jaxpr
    return eqn.params["length"] * jaxpr_flops(body, [None] * len(body.invars), pid)
  nc = eqn.params["cond_nconsts"] + eqn.params["body_nconsts"]
  lo, hi = ins[nc], ins[nc + 1]
  if not isinstance(lo, int) or not isinstance(hi, int):
    raise ValueError("while loop with a trip count not known from the program ids")
  body = eqn.params["body_jaxpr"].jaxpr
  return max(0, hi - lo) * jaxpr_flops(body, [None] * len(body.invars), pid)


def jaxpr_flops(jaxpr, args, pid):
  """dot_general FLOPs of one kernel-body run at program ids ``pid`` (scalar integer work
  is evaluated so that loop bounds and pl.when predicates are known)."""
  return _run(jaxpr, args, pid)[0]


def _eqn(eqn, ins, pid):
  """(FLOPs, output values or None) of one equation."""
  name = eqn.primitive.name
  if name == "program_id":
    return 0, [pid[eqn.params["axis"]]]
  if name == "dot_general":
    return _dot_flops(eqn), None
  if name in ("scan", "while"):
    return _loop(eqn, ins, pid), None
  if name == "cond":
    sub = [_run(b.jaxpr, ins[1:], pid) for b in eqn.params["branches"]]
    if ins[0] is not None:
      return sub[int(ins[0])]
    return max(f for f, _ in sub), None
  inner = next(_sub_jaxprs(eqn.params), None)
  if inner is not None:  # pjit, closed_call, custom_jvp_call ...
    return _run(inner, ins[-len(inner.invars) :] if inner.invars else [], pid)
  return 0, [_scalar(eqn, ins)]


def _run(jaxpr, args, pid):
  env = dict(zip(jaxpr.invars, args))
  flops = 0
  for eqn in jaxpr.eqns:
    f, outs = _eqn(eqn, [_value(env, v) for v in eqn.invars], pid)
    flops += f
    for v, o in zip(eqn.outvars, outs or []):
      if o is not None:
        env[v] = o
  return flops, [_value(env, v) for v in jaxpr.outvars]


def pallas_calls(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for sub in _sub_jaxprs(eqn.params):
      yield from pallas_calls(sub)


def kernel_work(eqn):
  """(name, grid, dot FLOPs over the whole grid, result signature) of one pallas_call."""
  grid = tuple(int(g) for g in eqn.params["grid_mapping"].grid)
  body = eqn.params["jaxpr"]
  nargs = len(body.invars)
  flops = sum(
    jaxpr_flops(body, [None] * nargs, pid) for pid in itertools.product(*(range(g) for g in grid))
  )
  info = eqn.params.get("name") or eqn.params.get("name_and_src_info")
  name = getattr(info, "name", info)
  sig = [
    f"{o.aval.dtype.name.replace('bfloat', 'bf').replace('float', 'f')}"
    f"[{','.join(str(d) for d in o.aval.shape)}]"
    for o in eqn.outvars
  ]
  return dict(name=name, grid="x".join(map(str, grid)), dot_flops=flops, sig=sig)
