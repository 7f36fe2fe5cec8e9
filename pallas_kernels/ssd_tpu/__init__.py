"""Mosaic (Pallas TPU) kernels of the Mamba-2 SSD, forward and backward: ``impl="pallas_tpu"``.

Entry point: :func:`pallas_kernels.ssd_tpu.ops.ssd_tpu_core` (the core used by
``mamba2_jax.ssd.ssd(..., impl="pallas_tpu")``, which under a mesh runs it per shard through
:func:`mamba2_jax.ssd.sharded.sharded_ssd`: Mosaic kernels cannot be auto-partitioned).
The caller chooses interpret mode (``interpret=True``: ``ssd`` does so when compiling for the
CPU) and the core split (``split=tensorcores(device kind)``); the real TPU compiler is
exercised from a CPU host by ``python -m pallas_kernels.ssd_tpu.compile_check``.

Design
------
* **Two fused kernels, one parallel axis.** Grid (units, chunks, head blocks): the leading
  axis flattens (batch, group, core split) and is the only "parallel" one, so a megacore chip
  (v4, v5p: two TensorCores behind one device) splits it even under sharded training, where
  batch and groups per device are 1: there the group's head blocks are split in two halves
  (``ops.core_split`` of ``split=ops.tensorcores(device kind)``; one split elsewhere). Chunks and head
  blocks are "arbitrary", head blocks innermost: per (chunk, group) C·Bᵀ (Q x Q, fp32
  accumulate, causal/segment mask) is computed once, at head block 0, into a VMEM scratch
  shared by every head block, and in the backward dB and dC are accumulated over the heads in
  fp32 VMEM scratch and written once per (chunk, group) in B's dtype (with a core split: one fp32
  partial per split, summed by XLA). Per head:
  diagonal block, state -> output, chunk state, and the state update ``h <- decay * h + S``
  carried in a VMEM scratch (head blocks, hb, P, N) fp32 across the chunk axis. h0 is read and
  the final state written only at the first / last chunk (their block index stays put at the
  other steps, so the pipeline neither refetches nor writes them per chunk). In the VJP forward
  the kernel also writes the state entering every chunk (b, H, T, P, N) fp32 (chunk-level
  states only). The D skip is fused (y + D x per lane, D (H,) or (H, P)) and y is written in
  the input dtype.
* **Backward** is one Pallas kernel visiting the chunks in reverse (index_map t -> T-1-t), with
  the state gradient carried in VMEM scratch (init from d final_state, d h0 written at the
  end). It recomputes C·Bᵀ (once per chunk and group), the Q x Q decay matrix (directly in
  transposed [s, l] order) and C·hᵀ; nothing Q x Q is stored. It returns dx (+ D dy, in the
  input dtype), per-chunk dD partials, dB/dC, d h0 and, per token, d dt and the terms of the
  cancellation-free log-decay gradient (``pallas_kernels/log_decay.py``, shared with the GPU
  kernel and the xla path): row / column sums of the off-diagonal pair terms, the chunk-state
  term and the carried decay, assembled by XLA into d dA with a reverse and an exclusive
  cumsum. The custom VJP is over the per-token log-decay dA (its chunk cumsum taken inside),
  so no undecayed diagonal term ever enters (the rows-minus-columns form it replaces lost all
  of dA's digits with bf16 inputs at chunk 256). dMᵀ = (dt x) dyᵀ, whose entries feed the pair
  sums, is computed to fp32 accuracy (a bf16 hi/lo split of dt x: two MXU passes).
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
  The Q x Q work is lane-dense regardless.
* **States (P, N), N on the lanes.** The state tensors in HBM (h0, the final state, the
  chunk-entry states, d final_state, d h0) are (P, N) per head: with P = 64 on the lanes they
  would pad to 128 lanes, twice the bytes of the largest saved residual. The state products are
  NT (y_off = C hᵀ, dxw = B dSᵀ) and TN (S = (x w)ᵀ B, dprev = (dy e)ᵀ C), so B and C are read
  as they are, with no transposed copies.
* **VMEM budget.** The head block is the largest divisor of H/G (<= 8 forward, <= 4 backward; a
  multiple of 128 lanes when packed) whose program fits 16 MiB of VMEM
  (``kernel.vmem_bytes``, the smallest default scoped limit); when one head does not fit, a
  ValueError names chunk, headdim and d_state.
* **Precision.** MXU operands in the input dtype (bf16 stays bf16, fp32 uses
  ``Precision.HIGHEST``), ``preferred_element_type=float32`` everywhere, all elementwise
  math and the carried state in fp32.
* **Chunk length.** Q = min(chunk_size, L) rounded up to a multiple of 8 (sublane rule);
  L is padded to T·Q after the dt prologue with dt = 0 and x = B = C = 0 (identity steps),
  segment ids edge-padded.
"""
