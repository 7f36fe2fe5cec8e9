r"""Ahead-of-time compile of the full sharded train step for a TPU pod, on a CPU host.

  bash scripts/setup_tpu_venv.sh      # .venv-tpu: the project + jax[tpu] (libtpu from PyPI)
  .venv-tpu/bin/python -m experiments.train_compile --config=configs/train.py:130m \
      --topology=v5e:16x16 [--config.mesh_shape='(-1,4,1)' ...]

Like MaxText's train_compile.py: `jax.experimental.topologies` describes the pod's devices
(no TPU needed), the trainer's own `build()` makes the mesh, shardings and jitted step for
them, and `.lower().compile()` runs XLA:TPU and Mosaic (the Pallas SSD kernels, routed through
shard_map) for real. Prints per-device memory (compiled.memory_analysis()) against the chip's
HBM, FLOPs (cost_analysis()) and the model's FLOP count, and exits 1 when the step does not
compile or does not fit. Topology names: v5e:2x2, v5e:16x16, v5p:4x4x4, v6e:8x8, v4:2x2x2, ...
"""

import mamba2_jax.host_tuning  # noqa: F401  (first: malloc for XLA on CPU hosts; before numpy/jax)

import json
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # silences libtpu's host probing
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # and its hostname error (no pod here)

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

DEFAULT_CONFIG = "configs/train.py:tiny"
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, f"training config (default {DEFAULT_CONFIG})", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology name, e.g. v5e:16x16")
_HOSTS = flags.DEFINE_integer(
  "num_hosts",
  None,
  "data readers of the pod (for data.num_shards checks; default: its hosts, counting the hosts "
  "of one context group, which hold the same batch rows, as one)",
)
_RESULT_JSON = flags.DEFINE_string(
  "result_json",
  None,
  "also write the result as JSON to this file (fits, per-device bytes, times; on a failed "
  "compile the error and, for an HBM overflow, the temporaries XLA asked for)",
)

# HBM per chip (bytes), by device_kind prefix.
HBM = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5": 95 << 30, "TPU v6 lite": 32 << 30}


def _hbm(kind: str):
  for prefix, size in sorted(HBM.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return size
  return None


def _resolved_impl(impl, mesh):
  import jax  # pylint: disable=g-import-not-at-top
  from mamba2_jax.ssd import resolve_impl  # pylint: disable=g-import-not-at-top

  with jax.set_mesh(mesh):
    return resolve_impl(impl)


def compile_train_step(config, topology: str, num_hosts=None) -> dict:
  """Compiles the train step of `config` for `topology`; returns the analysis (raises on a
  compile error)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from mamba2_jax.flops import model_flops_per_token  # pylint: disable=g-import-not-at-top
  from mamba2_jax.train.config import validate  # pylint: disable=g-import-not-at-top
  from mamba2_jax.train.loop import build  # pylint: disable=g-import-not-at-top
  from mamba2_jax.train.sharding import data_readers, make_mesh  # pylint: disable=g-import-not-at-top

  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  devices = list(topo.devices)
  validate(config, num_devices=len(devices))
  mesh = make_mesh(config.mesh_shape, devices)
  # the pod's data readers: its hosts, less those that hold the same batch rows (one context
  # group's hosts read alike), as train_and_evaluate counts them
  rules, batch = config.logical_axis_rules, config.global_batch_size
  readers = num_hosts or data_readers(mesh, rules, batch)[1]
  if config.data.num_shards is None:
    config = config.copy_and_resolve_references()
    config.data.num_shards = readers
  model_cfg = validate(config, num_devices=len(devices), num_processes=readers)
  if mesh.shape["tensor"] > 1:
    model_cfg = model_cfg.replace(fused_in_proj=False)
  setup = build(config, model_cfg, mesh)
  rows = config.tbptt_segments * config.seq_len + 1
  batch = {
    "tokens": jax.ShapeDtypeStruct(
      (config.global_batch_size, rows), jnp.int32, sharding=setup.data_shard
    )
  }
  if config.data.packing == "segments":
    batch["segment_ids"] = batch["tokens"]
  state = {
    "params": setup.abstract_params,
    "opt_state": setup.abstract_opt,
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
  }
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # the SSD's impl="auto" and the Pallas routing see TPU devices
    lowered = setup.train_step.lower(state, batch)
  t_lower = time.perf_counter() - t0
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t0 - t_lower
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text() or ""
  tokens = config.global_batch_size * config.seq_len * config.tbptt_segments
  per_dev = {
    k: getattr(mem, f"{k}_size_in_bytes", 0)
    for k in ("argument", "output", "temp", "generated_code", "alias")
  }
  used = per_dev["argument"] + per_dev["output"] + per_dev["temp"] - per_dev["alias"]
  return {
    "topology": topology,
    "devices": len(devices),
    "device_kind": devices[0].device_kind,
    "mesh": dict(mesh.shape),
    "model": config.name,
    "params": model_cfg.num_params(),
    "ssd_impl": _resolved_impl(model_cfg.ssd_impl, mesh),
    "mosaic_kernels": text.count("tpu_custom_call"),
    "per_device_bytes": per_dev,
    "used_bytes": used,
    "hbm_bytes": _hbm(devices[0].device_kind),
    "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
    "model_flops_per_device": 3
    * model_flops_per_token(model_cfg, config.seq_len, "tpu")
    * tokens
    / len(devices),
    "lower_s": t_lower,
    "compile_s": t_compile,
  }


def _gib(b):
  return f"{b / 2**30:.2f} GiB"


def _write_result(r: dict):
  if _RESULT_JSON.value:
    with open(_RESULT_JSON.value, "w") as f:
      json.dump(r, f, indent=2)


def _hbm_overflow(message: str):
  """Bytes of HLO temporaries an XLA:TPU CompileTimeHbmOom message reports (None if another
  error), e.g. '... required for HLO temporaries (22.73G) exceeds available HBM (15.75G)'."""
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
  return None if m is None else float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024


def main(argv):
  del argv
  from mamba2_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  try:
    r = compile_train_step(_CONFIG.value, _TOPOLOGY.value, _HOSTS.value)
  except UserError:
    raise  # a config error: one line and exit 2 (experiments.cli)
  except Exception as e:  # noqa: BLE001 - report any compile failure plainly
    msg = f"{type(e).__name__}: {str(e)[:2000]}"
    _write_result(
      {
        "topology": _TOPOLOGY.value,
        "fits": False,
        "error": msg,
        "temp_bytes_required": _hbm_overflow(msg),
        "wall_s": time.perf_counter() - t0,
      }
    )
    print(f"train_compile: FAILED for {_TOPOLOGY.value}: {msg}", file=sys.stderr)
    sys.exit(1)
  r["fits"] = not (r["hbm_bytes"] and r["used_bytes"] > r["hbm_bytes"])
  r["wall_s"] = time.perf_counter() - t0
  _write_result(r)
  d = r["per_device_bytes"]
  print(
    f"train_compile: {r['model']} ({r['params']:,} params, ssd_impl={r['ssd_impl']}, "
    f"{r['mosaic_kernels']} Mosaic kernel calls) on {r['topology']}: {r['devices']} x "
    f"{r['device_kind']}, mesh {r['mesh']}"
  )
  print(
    f"  per device: arguments {_gib(d['argument'])}, outputs {_gib(d['output'])}, "
    f"temp {_gib(d['temp'])}, code {_gib(d['generated_code'])}; in use "
    f"{_gib(r['used_bytes'])}" + (f" of {_gib(r['hbm_bytes'])} HBM" if r["hbm_bytes"] else "")
  )
  print(
    f"  FLOPs per device and step: XLA {r['xla_flops_per_device']:.3e}, model "
    f"{r['model_flops_per_device']:.3e}; lower {r['lower_s']:.1f} s, compile "
    f"{r['compile_s']:.1f} s"
  )
  if r["hbm_bytes"] and r["used_bytes"] > r["hbm_bytes"]:
    print("train_compile: DOES NOT FIT in HBM", file=sys.stderr)
    sys.exit(1)
  print("train_compile: OK")


if __name__ == "__main__":
  cli.run(main, {"config": DEFAULT_CONFIG})
