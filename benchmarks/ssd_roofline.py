"""Roofline of one SSD layer (the scan only: no projections/conv/norm) for the published shapes.

    python benchmarks/ssd_roofline.py            # prints the markdown tables of ssd_roofline.md

Counts per token (b = 1), chunk Q, headdim P, d_state N, H heads, G groups; one multiply-add
= 2 FLOPs; causal Q x Q products count their lower half (Q*K per token instead of 2*Q*K).

Algorithmic FLOPs (what any chunked SSD must do; CB once per group):
  fwd  = G*Q*N (C B^T) + H*(Q*P (diag) + 2PN (chunk states) + 2PN (state -> output))
  bwd  = G*3*Q*N (CB recompute, dCB -> dB, dC) + H*(2*Q*P (dM, M^T dy) + 8PN (dstates, dC_off,
         dB_state, dx_state))
What the kernels execute (FLOPs and bytes per launch, from the compiled programs):
benchmarks/ssd_audit.py.
Elementwise work (exp of the Q x Q decay, masks) is ~Q/2 exps per token and head, not counted.

HBM bytes (a lower bound: every input read once, every output written once):
  fwd  = x, dt, B, C read; y written; chunk-entry states (P*N*4/Q per token and head) written
  bwd  = x, dt, B, C, dy, states read; dx, ddt, dB, dC written
"""

from __future__ import annotations

MODELS = {  # name: d_model -> H = 2 * d_model / 64
  "130m": 768,
  "370m": 1024,
  "780m": 1536,
  "1.3b": 2048,
  "2.7b": 2560,
}
P, N, G, Q = 64, 128, 1, 256
DEVICES = {
  # name: (FLOP/s for the dot dtype, HBM bytes/s)
  "H100 fp32 (CUDA cores, IEEE)": (67e12, 3.35e12),
  "H100 fp32 in / TF32 dots": (495e12, 3.35e12),
  "H100 bf16 (tensor cores)": (989e12, 3.35e12),
  "TPU v5e bf16": (197e12, 819e9),
}


def flops_per_token(H):
  fwd = G * Q * N + H * (Q * P + 4 * P * N)
  bwd = G * 3 * Q * N + H * (2 * Q * P + 8 * P * N)
  return fwd, bwd


def bytes_per_token(H, s):
  """s: bytes per element of x/B/C/y (4 fp32, 2 bf16); dt and states are fp32."""
  st = P * N * 4 / Q  # chunk-entry states (fp32) per token and head
  fwd = H * P * s * 2 + H * 4 + 2 * G * N * s + H * st
  bwd = H * P * s * 3 + H * 4 * 2 + 2 * G * N * s * 2 + H * st  # x, dy read; dx written
  return fwd, bwd


def table():
  out = []
  out.append(
    "| model | H | FLOP/token fwd | fwd+bwd | bytes/token fwd fp32 / bf16 | fwd+bwd fp32 / bf16 |"
  )
  out.append("|---|---|---|---|---|---|")
  for m, d in MODELS.items():
    H = 2 * d // 64
    f, b = flops_per_token(H)
    b4, b2 = bytes_per_token(H, 4), bytes_per_token(H, 2)
    out.append(
      f"| {m} | {H} | {f / 1e6:.2f} M | {(f + b) / 1e6:.2f} M "
      f"| {b4[0] / 1e3:.1f} / {b2[0] / 1e3:.1f} kB | {sum(b4) / 1e3:.1f} / {sum(b2) / 1e3:.1f} kB |"
    )
  out.append("")
  out.append(
    "Floor time per layer (b = 1), max(FLOPs / peak, bytes / bandwidth), algorithmic FLOPs; "
    "the bound that applies in brackets (C = compute, M = memory):"
  )
  out.append("")
  hdr = "| model | L | pass | " + " | ".join(DEVICES) + " |"
  out.append(hdr)
  out.append("|" + "---|" * (3 + len(DEVICES)))
  for m in ("130m", "2.7b"):
    H = 2 * MODELS[m] // 64
    f, b = flops_per_token(H)
    for L in (2048, 8192):
      for name, fl in (("fwd", f), ("fwd+bwd", f + b)):
        cells = []
        for dev, (peak, bw) in DEVICES.items():
          s = 2 if "bf16" in dev else 4
          by = bytes_per_token(H, s)
          by = by[0] if name == "fwd" else sum(by)
          tc, tm = fl * L / peak, by * L / bw
          cells.append(f"{max(tc, tm) * 1e6:.1f} µs [{'C' if tc >= tm else 'M'}]")
        out.append(f"| {m} | {L} | {name} | " + " | ".join(cells) + " |")
  return "\n".join(out)


if __name__ == "__main__":
  print(table())
