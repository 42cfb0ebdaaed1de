"""The Triton kernels of ``serving.kernels.w4a16`` as plain functions: ``w4a16._jitted`` wraps them with
``triton.jit`` at first use (compiled, or interpreted under TRITON_INTERPRET=1). Layout and arithmetic: see
``serving.kernels.w4a16``'s docstring. Imports triton: import this module only where a kernel runs."""

import triton.language as tl

# Only builtins of triton.language here (tl.full, tl.reduce), none of its @jit helpers (tl.zeros, tl.sum): those are
# wrapped when triton is imported, so a process that imported triton before setting TRITON_INTERPRET=1 (GPTQModel
# imports it) could not interpret them. The interpreter sums with numpy when the combine is _sum_combine.


def w4a16_gemv_kernel(x_ptr, w_ptr, sz_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr,
                M, N, K, K8, chunks_per_group, chunks_per_split, stride_xm, stride_om, magic,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_J: tl.constexpr,
                HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, SCALE_W: tl.constexpr, DOT: tl.constexpr,
                PREFETCH: tl.constexpr):
    """out[:M] = x[:M] @ W over K slice ``pid_k`` of N tile ``pid_n``. Three inner loops, picked at compile time:
    one row (2-D tiles, the batch-1 case), several rows on CUDA cores (3-D tiles), several rows through
    ``tl.dot`` (BLOCK_M >= 16, rows past M masked: the integer weights (q - z) are exact in fp16)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_i = tl.arange(0, 32)
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, K8 // 32)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K8 + offs_i[None, :]
    if DOT:
        acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    elif BLOCK_M == 1:
        acc = tl.full([BLOCK_N, 32], 0.0, tl.float32)
    else:
        acc = tl.full([BLOCK_M, BLOCK_N, 32], 0.0, tl.float32)
    if PREFETCH:  # the next chunk's words are in flight while this chunk is unpacked (Triton does not
        # pipeline loads that feed no tl.dot: num_stages leaves this loop's SASS unchanged)
        w_next = tl.load(w_ptrs + c0 * 32, mask=n_ok[:, None] & (tl.full([1, 32], c0, tl.int32) < c1), other=0)
    for c in range(c0, c1):
        if PREFETCH:
            w = w_next
            w_next = tl.load(w_ptrs + (c + 1) * 32, mask=n_ok[:, None] & (tl.full([1, 32], c + 1, tl.int32) < c1),
                             other=0)
        else:
            w = tl.load(w_ptrs + c * 32, mask=n_ok[:, None], other=0)
        w_hi = w >> 12
        if DOT:
            part = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
        elif BLOCK_M == 1:
            part = tl.full([BLOCK_N, 32], 0.0, tl.float32)
        else:
            part = tl.full([BLOCK_M, BLOCK_N, 32], 0.0, tl.float32)
        for j in tl.static_range(8):
            if j % GROUP_J == 0:
                # no run-time division inside the loop (an integer divide is ~25 instructions in SASS)
                if GROUP_J < 8:
                    g = c * (8 // GROUP_J) + j // GROUP_J
                else:
                    g = c // chunks_per_group
                sz = sz_ptr + (g * N + offs_n) * 2
                s = tl.load(sz, mask=n_ok, other=0.0).to(tl.float32)
                z = tl.load(sz + 1, mask=n_ok, other=0.0).to(tl.float32)
            if j < 5:
                src = w
                e = j
            else:
                src = w_hi
                e = j - 3  # nibbles 5..7 at bits 8..19 of w >> 12: never at bit 0, where ptxas splits the mask
            kk = c * 256 + 32 * j + offs_i
            if HAS_PERM:
                kx = tl.load(perm_ptr + kk)
            else:
                kx = kk
            f = ((src & (15 << (4 * e))) | magic).to(tl.float32, bitcast=True)  # magic: 0x4B000000 (w4a16.MAGIC)
            d = f - (8388608.0 + z * (1 << (4 * e)))[:, None]  # (q - z) * 16**e, exact
            if DOT:
                xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kx[:, None],
                             mask=m_ok[None, :] & (kk < K)[:, None], other=0.0)  # [32, BLOCK_M]
                dq = (d * (1.0 / (1 << (4 * e)))).to(x_ptr.dtype.element_ty)  # q - z: integers, exact
                part = tl.dot(dq, xt, part)
                if (j + 1) % GROUP_J == 0:
                    acc += s[:, None] * part
                    part = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
            elif BLOCK_M == 1:
                xj = tl.load(x_ptr + kx, mask=kk < K, other=0.0).to(tl.float32) * (1.0 / (1 << (4 * e)))
                if SCALE_W:
                    acc += xj[None, :] * (d * s[:, None])
                else:
                    part += xj[None, :] * d
                    if (j + 1) % GROUP_J == 0:
                        acc += s[:, None] * part
                        part = tl.full([BLOCK_N, 32], 0.0, tl.float32)
            else:
                xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + kx[None, :],
                             mask=m_ok[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
                xj = xj * (1.0 / (1 << (4 * e)))
                if SCALE_W:
                    acc += xj[:, None, :] * (d * s[:, None])[None, :, :]
                else:
                    part += xj[:, None, :] * d[None, :, :]
                    if (j + 1) % GROUP_J == 0:
                        acc += s[None, :, None] * part
                        part = tl.full([BLOCK_M, BLOCK_N, 32], 0.0, tl.float32)
    if DOT:
        res = tl.trans(acc)
    elif BLOCK_M == 1:
        res = tl.reduce(acc, 1, tl.standard._sum_combine)[None, :]
    else:
        res = tl.reduce(acc, 2, tl.standard._sum_combine)
    o_mask = m_ok[:, None] & n_ok[None, :]
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT:
        p_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + p_off, res, mask=o_mask)
        tl.debug_barrier()  # every thread's slice is stored before the counter moves (acq_rel atomic)
        done = tl.atomic_add(cnt_ptr + pid_n, 1)
        if done == tl.num_programs(1) - 1:
            tot = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
            for sk in range(0, tl.num_programs(1)):
                tot += tl.load(part_ptr + sk * M * N + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
            tl.store(o_ptrs, tot.to(out_ptr.dtype.element_ty), mask=o_mask)
            tl.store(cnt_ptr + pid_n, 0)
    else:
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=o_mask)


def w4a16_dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K8, chunks_per_group, n0, stride_o,
                    BLOCK_N: tl.constexpr, GROUP_J: tl.constexpr):
    """Rows n0..n0+rows of the weight, dequantized into out [rows, Kp] (inputs in the packed, sorted order)."""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    offs_r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = n0 + offs_r
    n_ok = offs_n < N
    offs_i = tl.arange(0, 32)
    w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K8 + c * 32 + offs_i[None, :], mask=n_ok[:, None], other=0)
    w_hi = w >> 12
    for j in tl.static_range(8):
        if j % GROUP_J == 0:
            if GROUP_J < 8:
                g = c * (8 // GROUP_J) + j // GROUP_J
            else:
                g = c // chunks_per_group
            sz = sz_ptr + (g * N + offs_n) * 2
            s = tl.load(sz, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(sz + 1, mask=n_ok, other=0.0).to(tl.float32)
        if j < 5:
            src = w
            e = j
        else:
            src = w_hi
            e = j - 3  # nibbles 5..7 at bits 8..19 of w >> 12: never at bit 0, where ptxas splits the mask
        f = ((src & (15 << (4 * e))) | 0x4B000000).to(tl.float32, bitcast=True)
        d = (f - (8388608.0 + z * (1 << (4 * e)))[:, None]) * (s * (1.0 / (1 << (4 * e))))[:, None]
        dst = out_ptr + offs_r[:, None].to(tl.int64) * stride_o + c * 256 + 32 * j + offs_i[None, :]
        tl.store(dst, d.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def w4a16_gemv2_kernel(x_ptr, w_ptr, sz_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr,
                       M, N, K, K8, chunks_per_group, chunks_per_split, stride_xm, stride_om, magic,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_J: tl.constexpr,
                       HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, SCALE_W: tl.constexpr, UNROLL: tl.constexpr,
                       DOT: tl.constexpr, FMA_ROWS: tl.constexpr):
    """The second GEMV (``GemvConfig.kernel == 2``), same layout and split-K fixup as ``w4a16_gemv_kernel``.

    * One dequantized tile feeds every row: rows 1..8 have an accumulator each (acc0..acc7, 2-D like the weight
      tile) instead of v1's 3-D [rows, N, 32] tiles, whose broadcasts Triton lowered through shared memory
      (64 BAR.SYNC per chunk at two rows in the H200 table's SASS).
    * Nibble e of a word is ORed with the float 2**(23-4e) rather than 2**23: ``f = 2**(23-4e) + q`` exactly,
      so ``f - (2**(23-4e) + z)`` is ``q - z`` at unit scale and the activations need no ``* 16**-e`` (one FMUL
      per activation per nibble in v1).
    * ``UNROLL`` 256-input chunks are loaded before any is unpacked: their words are in flight together.
    * ``SCALE_W`` False (one row only): the scale is applied once per group to a partial sum; with several rows
      the caller sets it, and each weight is scaled once for all rows.
    * ``DOT``: the exact integers ``q - z`` go to ``tl.dot`` in the activations' dtype, rows padded to BLOCK_M
      (16), the scale per group on the fp32 partial sums; as kernel 1's tl.dot loop but without its
      ``* 16**-e`` per weight (112 FMULs of 787 SASS instructions per chunk there).
    * ``FMA_ROWS``: the per-row accumulators written out (BLOCK_M, or 0 with ``DOT``).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_i = tl.arange(0, 32)
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, K8 // 32)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K8 + offs_i[None, :]
    acc0 = tl.full([BLOCK_N, 32], 0.0, tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    acc4 = acc0
    acc5 = acc0
    acc6 = acc0
    acc7 = acc0
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    accd = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    rows = tl.arange(0, 32) * 0
    rm1 = rows + 1 < M  # activation row r exists (rows past M read as 0; their outputs are not stored)
    rm2 = rows + 2 < M
    rm3 = rows + 3 < M
    rm4 = rows + 4 < M
    rm5 = rows + 5 < M
    rm6 = rows + 6 < M
    rm7 = rows + 7 < M
    for c in range(c0, c1, UNROLL):
        w0 = tl.load(w_ptrs + c * 32, mask=n_ok[:, None], other=0)
        if UNROLL > 1:
            w1 = tl.load(w_ptrs + (c + 1) * 32, mask=n_ok[:, None] & (tl.full([1, 32], c + 1, tl.int32) < c1),
                         other=0)
        for u in tl.static_range(UNROLL):
            if u == 0:
                w = w0
                cc = c
                live = tl.full([32], c, tl.int32) < c1
            else:
                w = w1
                cc = tl.minimum(c + 1, c1 - 1)  # the padded slot of an odd slice: addresses stay in range
                live = tl.full([32], c + 1, tl.int32) < c1
            w_hi = w >> 12
            part = tl.full([BLOCK_N, 32], 0.0, tl.float32)
            partd = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
            for j in tl.static_range(8):
                if j % GROUP_J == 0:
                    if GROUP_J < 8:
                        g = cc * (8 // GROUP_J) + j // GROUP_J
                    else:
                        g = cc // chunks_per_group
                    sz = sz_ptr + (g * N + offs_n) * 2
                    s = tl.load(sz, mask=n_ok, other=0.0).to(tl.float32)
                    z = tl.load(sz + 1, mask=n_ok, other=0.0).to(tl.float32)
                if j < 5:
                    src = w
                    e = j
                else:
                    src = w_hi
                    e = j - 3  # nibbles 5..7 at bits 8..19 of w >> 12 (the mantissa holds bits 0..22)
                kk = cc * 256 + 32 * j + offs_i
                if HAS_PERM:
                    kx = tl.load(perm_ptr + kk)
                else:
                    kx = kk
                x_ok = (kk < K) & live
                # magic - (4e << 23): the float 2**(23-4e), whose mantissa ulp is 16**-e, so the nibble at bit 4e
                # adds q at unit scale
                f = ((src & (15 << (4 * e))) | (magic - ((4 * e) << 23))).to(tl.float32, bitcast=True)
                d = f - (z + 8388608.0 / (1 << (4 * e)))[:, None]  # q - z, exact
                if DOT:
                    xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kx[:, None],
                                 mask=m_ok[None, :] & x_ok[:, None], other=0.0)  # [32, BLOCK_M]
                    partd = tl.dot(d.to(x_ptr.dtype.element_ty), xt, partd)  # q - z: integers, exact in fp16
                    if (j + 1) % GROUP_J == 0:
                        accd += s[:, None] * partd
                        partd = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
                else:
                    if SCALE_W:
                        d = d * s[:, None]
                    xr = x_ptr + kx
                    x0 = tl.load(xr, mask=x_ok, other=0.0).to(tl.float32)
                    if SCALE_W:
                        acc0 += x0[None, :] * d
                    else:
                        part += x0[None, :] * d
                    if BLOCK_M > 1:
                        acc1 += tl.load(xr + stride_xm, mask=x_ok & rm1, other=0.0).to(tl.float32)[None, :] * d
                    if BLOCK_M > 2:
                        acc2 += tl.load(xr + 2 * stride_xm, mask=x_ok & rm2, other=0.0).to(tl.float32)[None, :] * d
                        acc3 += tl.load(xr + 3 * stride_xm, mask=x_ok & rm3, other=0.0).to(tl.float32)[None, :] * d
                    if BLOCK_M > 4:
                        acc4 += tl.load(xr + 4 * stride_xm, mask=x_ok & rm4, other=0.0).to(tl.float32)[None, :] * d
                        acc5 += tl.load(xr + 5 * stride_xm, mask=x_ok & rm5, other=0.0).to(tl.float32)[None, :] * d
                        acc6 += tl.load(xr + 6 * stride_xm, mask=x_ok & rm6, other=0.0).to(tl.float32)[None, :] * d
                        acc7 += tl.load(xr + 7 * stride_xm, mask=x_ok & rm7, other=0.0).to(tl.float32)[None, :] * d
                    if not SCALE_W:
                        if (j + 1) % GROUP_J == 0:
                            acc0 += s[:, None] * part
                            part = tl.full([BLOCK_N, 32], 0.0, tl.float32)
    if DOT:
        res = tl.trans(accd)  # [BLOCK_M, BLOCK_N]
        o_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT:
            tl.store(part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], res, mask=o_mask)
        else:
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], res.to(out_ptr.dtype.element_ty),
                     mask=o_mask)
    for r in tl.static_range(FMA_ROWS):
        if r == 0:
            a = acc0
        elif r == 1:
            a = acc1
        elif r == 2:
            a = acc2
        elif r == 3:
            a = acc3
        elif r == 4:
            a = acc4
        elif r == 5:
            a = acc5
        elif r == 6:
            a = acc6
        else:
            a = acc7
        res = tl.reduce(a, 1, tl.standard._sum_combine)
        o_ok = n_ok & (offs_n * 0 + r < M)
        if SPLIT:
            tl.store(part_ptr + pid_k * M * N + r * N + offs_n, res, mask=o_ok)
        else:
            tl.store(out_ptr + r * stride_om + offs_n, res.to(out_ptr.dtype.element_ty), mask=o_ok)
    if SPLIT:
        tl.debug_barrier()  # every thread's slice is stored before the counter moves (acq_rel atomic)
        done = tl.atomic_add(cnt_ptr + pid_n, 1)
        if done == tl.num_programs(1) - 1:
            if DOT:
                o_mask = m_ok[:, None] & n_ok[None, :]
                p_off = offs_m[:, None] * N + offs_n[None, :]
                tot2 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
                for sk in range(0, tl.num_programs(1)):
                    tot2 += tl.load(part_ptr + sk * M * N + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], tot2.to(out_ptr.dtype.element_ty),
                         mask=o_mask)
            for r in tl.static_range(FMA_ROWS):
                o_ok = n_ok & (offs_n * 0 + r < M)
                tot = tl.full([BLOCK_N], 0.0, tl.float32)
                for sk in range(0, tl.num_programs(1)):
                    tot += tl.load(part_ptr + sk * M * N + r * N + offs_n, mask=o_ok, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + r * stride_om + offs_n, tot.to(out_ptr.dtype.element_ty), mask=o_ok)
            tl.store(cnt_ptr + pid_n, 0)


def w4a16_gemv3_kernel(x_ptr, w_ptr, sz_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr,
                       M, N, K, K8, chunks_per_group, chunks_per_split, stride_xm, stride_om, magic,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_J: tl.constexpr,
                       HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr = True):
    """The third GEMV (``GemvConfig.kernel == 3``), same layout and split-K fixup: each word's two 16-bit
    halves unpacked at once straight into an fp16 pair, dequantized in fp16 and multiplied through ``tl.dot``
    (rows padded to BLOCK_M >= 16).

    * Half h of word i holds nibbles 4h..4h+3, inputs ``32 * (4h + p) + i`` of the chunk (p = 0..3). On the
      int32 words [BLOCK_N, 32], ``(word & 0x000F000F << 4e) | 0x64006400`` is the fp16 pair
      ``1024 + q * 16**e`` of both halves for e in {0, 1}, nibbles 2 and 3 the same from ``word >> 8``: one
      32-bit LOP3 per two weights and no conversion instruction; the pair's two 16-bit lanes become columns
      ``2i`` and ``2i + 1`` of the fp16 tile [BLOCK_N, 64] (a 16-bit tile instead, as this kernel first read
      them, made ptxas unpack each half apart and re-pack the pairs: 4.47 SASS instructions per weight with
      triton 3.6 at 64 outputs, 4 warps, against 3.92 now).
    * ``fma(f, 16**-e, -(1024 * 16**-e + z))`` is ``q - z`` exactly in fp16, and one multiply by the group's
      scale makes the weight (fp16, as the dequantize + GEMM path and Marlin do), so one fp32 ``tl.dot``
      accumulator serves every group size.
    * The activations are read in the tile's column order: two contiguous 32-input slices (nibble p of the low
      halves, p + 4 of the high) joined column by column.
    * The weight tile is tl.dot's first operand, in registers (sm_90: wgmma reads it from there); the
      activations (rows padded to 16) go through shared memory. The other way round measured 6.0-6.4 SASS
      instructions per weight against 3.9-4.4 (``python -m serving.kernels.sass --kernel 3``).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_i = tl.arange(0, 32)
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, K8 // 32)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K8 + offs_i[None, :]
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    acc2 = tl.full([BLOCK_N, 64], 0.0, tl.float32)  # DOT=False (one row): products summed per column
    F16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
    # 0x6400 (fp16 1024.0) as a constant: from the run-time ``magic`` (unused here) ptxas ORed the halves one at
    # a time (5.3 SASS instructions per weight against 4.0 at 128 outputs, 4 warps)
    magic32 = tl.full([BLOCK_N, 32], 0x64006400, tl.int32)
    for c in range(c0, c1):
        ww = tl.load(w_ptrs + c * 32, mask=n_ok[:, None], other=0)  # int32 [BLOCK_N, 32]
        ww8 = (ww.to(tl.uint32, bitcast=True) >> 8).to(tl.int32, bitcast=True)
        for p in tl.static_range(4):
            if p < 2:
                src = ww
                e = p
            else:
                src = ww8
                e = p - 2
            # the scale and zero point of nibble p (low halves, even columns) and p + 4 (high halves, odd); with
            # groups of 128 or more they are the same for every p of a chunk, loaded once
            if p == 0 or GROUP_J < 4:
                if GROUP_J < 8:
                    g_lo = c * (8 // GROUP_J) + p // GROUP_J
                    g_hi = c * (8 // GROUP_J) + (p + 4) // GROUP_J
                else:
                    g_lo = c // chunks_per_group
                    g_hi = g_lo
                if DOT:
                    sz_lo = sz_ptr + (g_lo * N + offs_n) * 2
                    sz_hi = sz_ptr + (g_hi * N + offs_n) * 2
                    s_lo = tl.load(sz_lo, mask=n_ok, other=0.0)
                    s_hi = tl.load(sz_hi, mask=n_ok, other=0.0)
                    z_lo = tl.load(sz_lo + 1, mask=n_ok, other=0.0)
                    z_hi = tl.load(sz_hi + 1, mask=n_ok, other=0.0)
                else:  # (scale, zero) as one 32-bit load each, split into its fp16 lanes (4.2 -> 4.0 SASS
                    szw = sz_ptr.to(tl.pointer_type(tl.uint32))  # instructions per weight; through tl.dot
                    w_lo = tl.load(szw + g_lo * N + offs_n, mask=n_ok, other=0)  # it measured 3.5 -> 4.2)
                    w_hi = tl.load(szw + g_hi * N + offs_n, mask=n_ok, other=0)
                    s_lo = w_lo.to(tl.uint16).to(tl.float16, bitcast=True)
                    s_hi = w_hi.to(tl.uint16).to(tl.float16, bitcast=True)
                    z_lo = (w_lo >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
                    z_hi = (w_hi >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
                s2 = tl.reshape(tl.join(s_lo, s_hi), [BLOCK_N, 1, 2])
                z2 = tl.reshape(tl.join(z_lo, z_hi), [BLOCK_N, 1, 2])
                b2_0 = -(z2 + 1024.0).to(tl.float16)
                b2_1 = -(z2 + 64.0).to(tl.float16)
            mask32 = tl.full([BLOCK_N, 32], (15 << (4 * e)) * 0x10001, tl.int32)
            t = (src & mask32) | magic32  # two fp16s a word: half 0's nibble and half 1's
            f_lo = t.to(tl.uint32, bitcast=True).to(tl.uint16).to(tl.float16, bitcast=True)
            f_hi = (t.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
            f3 = tl.join(f_lo, f_hi)  # [BLOCK_N, 32, 2]: column 2i + h
            if e == 0:
                d3 = f3 + b2_0  # (1024 + q) - (1024 + z): exact
            else:
                inv = tl.full([BLOCK_N, 32, 2], 1.0 / 16, tl.float16)
                d3 = tl.fma(f3, inv, b2_1)  # (1024 + 16q) / 16 - (64 + z): exact
            if DOT or GROUP_J < 4 or not F16:  # (one fp16 row, groups of 128 or more: the scale after the
                d3 = d3 * s2                      # chunk's products)
            d = tl.reshape(d3, [BLOCK_N, 64]).to(x_ptr.dtype.element_ty)
            k_lo = c * 256 + 32 * p + offs_i
            k_hi = k_lo + 128
            if HAS_PERM:  # one gather in the tile's column order (two gathered tiles joined crash triton 3.6's
                k64 = tl.reshape(tl.join(k_lo, k_hi), [64])  # TritonGPUOptimizeDotOperands pass on the H200)
                xp = tl.load(x_ptr + offs_m[:, None] * stride_xm + tl.load(perm_ptr + k64)[None, :],
                             mask=m_ok[:, None] & (k64 < K)[None, :], other=0.0)  # [BLOCK_M, 64]
            else:  # two contiguous slices joined column by column (vector loads: 3.97 SASS instructions per
                x_lo = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_lo[None, :],  # weight against 4.55)
                               mask=m_ok[:, None] & (k_lo < K)[None, :], other=0.0)  # [BLOCK_M, 32]
                x_hi = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_hi[None, :],
                               mask=m_ok[:, None] & (k_hi < K)[None, :], other=0.0)
                xp = tl.reshape(tl.join(x_lo, x_hi), [BLOCK_M, 64])  # column 2i + h, as the weight tile
            if DOT:
                acc = tl.dot(d, tl.trans(xp), acc)
            elif F16:  # one row: packed fp16 FMAs, four products a column per chunk, then fp32
                x16 = tl.sum(xp, axis=0)[None, :]
                if p == 0:
                    acc16 = d * x16
                else:
                    acc16 = tl.fma(d, x16, acc16)
            else:  # one bf16/fp32 row: fp32 products
                acc2 += d.to(tl.float32) * tl.sum(xp, axis=0).to(tl.float32)[None, :]
        if not DOT and F16:
            if GROUP_J >= 4:
                acc16 = tl.reshape(tl.reshape(acc16, [BLOCK_N, 32, 2]) * s2, [BLOCK_N, 64])
            acc2 += acc16.to(tl.float32)
    if DOT:
        res = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    else:
        res = tl.reshape(tl.sum(acc2, axis=1), [1, BLOCK_N])
    o_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        p_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + p_off, res, mask=o_mask)
        tl.debug_barrier()  # every thread's slice is stored before the counter moves (acq_rel atomic)
        done = tl.atomic_add(cnt_ptr + pid_n, 1)
        if done == tl.num_programs(1) - 1:
            tot = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
            for sk in range(0, tl.num_programs(1)):
                tot += tl.load(part_ptr + sk * M * N + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], tot.to(out_ptr.dtype.element_ty),
                     mask=o_mask)
            tl.store(cnt_ptr + pid_n, 0)
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], res.to(out_ptr.dtype.element_ty),
                 mask=o_mask)
