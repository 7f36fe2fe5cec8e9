"""Mosaic (Pallas TPU) kernels of the Mamba-2 SSD, forward and backward: ``impl="pallas_tpu"``.

Entry point: :func:`pallas_kernels.ssd_tpu.ops.ssd_tpu_core` (the core used by
``mamba2_jax.ssd.ssd(..., impl="pallas_tpu")``); under a mesh use
:func:`pallas_kernels.sharded.sharded_ssd` (Mosaic kernels cannot be auto-partitioned).
On CPU the kernels run in interpret mode (``interpret=None``); the real TPU compiler is
exercised from a CPU host by ``python -m pallas_kernels.ssd_tpu.compile_check``.

Design
------
* **Two fused kernels.** Forward: grid (b, G, head blocks, chunks); per program the group's
  C·Bᵀ (Q x Q, fp32 accumulate, causal/segment mask) is computed once and shared by the ``hb``
  heads of the block (all heads of one group; ``hb`` = largest divisor of H/G <= 8), then for
  each head: diagonal block, state -> output, chunk state, and the state update
  ``h <- decay * h + S`` carried in a VMEM scratch (hb, N, P) fp32 across the chunk axis.
  The chunk axis is last and "arbitrary" (``pltpu.CompilerParams(dimension_semantics=
  ("parallel", "parallel", "parallel", "arbitrary"))``); the state is initialised from h0
  under ``pl.when(program_id(3) == 0)`` and written to the resident final-state block at the
  last chunk. In the VJP forward the kernel also writes the state entering every chunk
  (b, H, T, N, P) fp32 (as axlearn does: chunk-level states only).
* **Backward** is one Pallas kernel visiting the chunks in reverse (index_map t -> T-1-t), with
  the state gradient carried in VMEM scratch (init from d final_state, d h0 written at the
  end). It recomputes C·Bᵀ (once per program), the Q x Q decay matrix (directly in transposed
  [s, l] order so every matmul is NN or NT), the chunk state (for the state leaving the
  chunk, needed by d Acs_end) and C·h; nothing Q x Q is stored. It returns dx, d dt,
  d Acs (row, column and chunk-end terms summed into one lane-dense row), dB/dC per head
  block (summed by XLA when a group spans several head blocks) and d h0. The d Acs formulation
  is the chunked XLA path's (mamba2_jax/ssd/chunked.py): rows Σ_p dy·y, columns −dt·ddt,
  chunk end Σ dS ⊙ h_next; XLA differentiates Acs = cumsum(dt·A), the softplus/bias/clip
  prologue and the D skip.
* **No in-kernel cumsum.** Acs = cumsum(dt·A) is computed by XLA in fp32 and passed with the
  other per-token factors (dt, wexp = exp(min(Acs_end − Acs, 0)) masked to the chunk's last
  segment, e = exp(Acs) masked to the segment entering the chunk, the chunk decay with the
  segment "keep" folded in) as one (8, Q) fp32 tile per head and chunk — lane-dense in HBM.
  The kernel transposes that tile once per head on the XLU to get the (Q, 1) columns.
  (A first version passed (Q, 5) column blocks: XLA pads their minor dim to 128 lanes in HBM,
  25x the bytes; the compile check showed 433 -> 98 MiB accessed per device for the 130m
  forward after the change.)
* **Masks before exp.** Q x Q exponents are ``where(mask, min(Acs_l − Acs_s, 0), −inf)`` so
  masked entries are exactly 0 and no inf can meet a 0 (strong decays are tested).
  Segment resets are masks (never dA = −inf), as in chunked.py: intra-chunk
  seg[l] == seg[s]; chunk state only from the chunk's last segment; carried state zeroed when
  the segment at the chunk end differs from the one at the previous chunk end (0 before
  chunk 0, so h0 applies to the first run only); state -> output only for rows in the segment
  entering the chunk.
* **headdim 64: packing (no padding).** x, y, dx, dy stay in their natural layout, reshaped
  for free to (b, L, H·P), and are blocked (Q, hb·P): one block carries the hb heads of a
  head block side by side in the lanes (P = 64: two heads per 128-lane tile; the 130m/2.7b
  shapes use hb = 8 forward, 4 backward = 512/256 lanes). Each head is a static lane slice of
  the block with its own decay (the head loop is unrolled because lane offsets must be
  static). Chosen over padding P to 128 (2x x/y HBM traffic and 2x MXU work on zeros) and over
  a head-major (b, H, L, P) layout with full-dim (Q, 64) blocks (legal for Mosaic, but XLA
  has to transpose x, y, dy and dx in HBM and each (Q, 64) tile is half-empty; the compile
  check showed fwd+bwd temp memory for the 130m layer going 25.9 -> 13.9 MiB per device, and
  for 2.7b 150 -> 70 MiB, when switching to packing). The head-major path remains the fallback
  whenever no head block fills a multiple of 128 lanes (e.g. an odd number of heads per group
  at P = 64, or small test headdims), chosen by ``ops.pick_layout``; both are tested.
  States (N = 128, P) are per head in VMEM; the Q x Q work is lane-dense regardless.
* **Layouts for NN matmuls.** States are kept transposed, (N, P); XLA also passes per-chunk
  transposed copies Bᵀ, Cᵀ (N, Q) so that the chunk state S = Bᵀ(x·w), dprev = Cᵀ(dy·e),
  C·Bᵀ and B·Cᵀ are NN; the remaining ones are NT (q·kᵀ form). One TN matmul remains (dC from
  the Q x Q dCBᵀ), which Mosaic compiles.
* **Precision.** MXU operands in the input dtype (bf16 stays bf16, fp32 uses
  ``Precision.HIGHEST``), ``preferred_element_type=float32`` everywhere, all elementwise
  math and the carried state in fp32.
* **Chunk length.** Q = min(chunk_size, L) rounded up to a multiple of 8 (sublane rule);
  L is padded to T·Q after the dt prologue with dt = 0 and x = B = C = 0 (identity steps),
  segment ids edge-padded.
"""
