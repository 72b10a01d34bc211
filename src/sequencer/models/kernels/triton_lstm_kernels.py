"""The Triton kernels of the fused LSTM recurrence (:mod:`.triton_lstm` launches them; :mod:`.triton_lstm_config`
chooses which, and their block sizes).

Two kernel pairs, same math (``nn.LSTM``'s, gates i, f, g, o; see :mod:`.triton_lstm`), same arguments' meaning:

* **held** (``lstm_fwd_held`` / ``lstm_bwd_held``): one program keeps W_hh's four (BLOCK_H, BLOCK_H) gate tiles,
  h and c on chip for all T steps, BLOCK_H = hidden rounded up to a power of two. Fastest where it fits: the
  tiles take 4 * BLOCK_H^2 elements of shared memory (hidden 96 in fp32: 256 KB, over every chip's limit).
* **tiled** (``lstm_fwd_tiled`` / ``lstm_bwd_tiled``): hidden is covered by BLOCK_K-wide tiles (16/32/64, so 48
  and 96 and 192 need no padding to a power of two), W_hh is read tile by tile each step (it stays in L1/L2), and
  the state crosses tiles through global memory: h_{t-1} is read back from the output, c (and in backward dc and
  the next step's gate gradients) from buffers, with a block barrier between steps. Its shared memory is a few
  (BLOCK_N, BLOCK_K) / (BLOCK_K, BLOCK_K) tiles whatever the hidden size, so it fits every chip.

In both, c, the gate math and every accumulation are fp32; the recurrent matmul's operands are fp32
(``UPCAST``, fp32 models and the CPU interpreter, whose ``tl.dot`` on bf16 operands is wrong) or the compute dtype
(bf16/fp16 weights and h, fp32 accumulation).
"""
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _matmul(a, w, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_N, K) @ (K, M) accumulated in fp32: on fp32 operands, or on w's (half) dtype."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a.to(w.dtype), w)


@triton.jit
def _load_gate_weights(w_ptr, d, k, H, BLOCK_H: tl.constexpr, TRANSPOSE: tl.constexpr, UPCAST: tl.constexpr):
    """Gate k's block of W_hh[d] (4H, H) as a (BLOCK_H, BLOCK_H) tile: W_k^T (in, out) or W_k (out, in)."""
    rows = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_H)[None, :]
    mask = (rows < H) & (cols < H)
    base = w_ptr + d * 4 * H * H + k * H * H
    if TRANSPOSE:
        tile = tl.load(base + cols * H + rows, mask=mask, other=0.0)
    else:
        tile = tl.load(base + rows * H + cols, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def lstm_fwd_held(xp_ptr, w_ptr, out_ptr, gates_ptr, cells_ptr, N, S, T, H, D,
                  sxb, sxs, sxt, sxd, sxg,
                  SAVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    d = tl.program_id(1)
    seq = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col = tl.arange(0, BLOCK_H)
    mask = (seq < N)[:, None] & (col < H)[None, :]
    seq64 = seq.to(tl.int64)
    x_rows = (seq64 // S) * sxb + (seq64 % S) * sxs + d * sxd
    w_i = _load_gate_weights(w_ptr, d, 0, H, BLOCK_H, True, UPCAST)
    w_f = _load_gate_weights(w_ptr, d, 1, H, BLOCK_H, True, UPCAST)
    w_g = _load_gate_weights(w_ptr, d, 2, H, BLOCK_H, True, UPCAST)
    w_o = _load_gate_weights(w_ptr, d, 3, H, BLOCK_H, True, UPCAST)
    h = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    c = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    reverse = d % 2 == 1
    for step in range(T):
        t = tl.where(reverse, T - 1 - step, step)
        x_ptrs = xp_ptr + (x_rows + t * sxt)[:, None] + col[None, :] * sxg
        a_i = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32) + _matmul(h, w_i, UPCAST, PRECISION)
        a_f = tl.load(x_ptrs + H * sxg, mask=mask, other=0.0).to(tl.float32) + _matmul(h, w_f, UPCAST, PRECISION)
        a_g = tl.load(x_ptrs + 2 * H * sxg, mask=mask, other=0.0).to(tl.float32) + _matmul(h, w_g, UPCAST,
                                                                                           PRECISION)
        a_o = tl.load(x_ptrs + 3 * H * sxg, mask=mask, other=0.0).to(tl.float32) + _matmul(h, w_o, UPCAST,
                                                                                           PRECISION)
        i = tl.sigmoid(a_i)
        f = tl.sigmoid(a_f)
        g = _tanh(a_g)
        o = tl.sigmoid(a_o)
        c = f * c + i * g
        h = o * _tanh(c)
        cell = ((seq64 * T + t) * D + d)[:, None]  # dense (B, S, T, D, .) row of this step
        tl.store(out_ptr + cell * H + col[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            gate_ptrs = gates_ptr + cell * 4 * H + col[None, :]
            tl.store(gate_ptrs, i, mask=mask)
            tl.store(gate_ptrs + H, f, mask=mask)
            tl.store(gate_ptrs + 2 * H, g, mask=mask)
            tl.store(gate_ptrs + 3 * H, o, mask=mask)
            tl.store(cells_ptr + cell * H + col[None, :], c, mask=mask)


@triton.jit
def lstm_bwd_held(dout_ptr, gates_ptr, cells_ptr, w_ptr, dxp_ptr, N, T, H, D,
                  BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    d = tl.program_id(1)
    seq = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col = tl.arange(0, BLOCK_H)
    mask = (seq < N)[:, None] & (col < H)[None, :]
    seq64 = seq.to(tl.int64)
    w_i = _load_gate_weights(w_ptr, d, 0, H, BLOCK_H, False, UPCAST)
    w_f = _load_gate_weights(w_ptr, d, 1, H, BLOCK_H, False, UPCAST)
    w_g = _load_gate_weights(w_ptr, d, 2, H, BLOCK_H, False, UPCAST)
    w_o = _load_gate_weights(w_ptr, d, 3, H, BLOCK_H, False, UPCAST)
    dh_next = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)  # dL/dh through the recurrence
    dc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    reverse = d % 2 == 1
    for back in range(T):
        fwd_step = T - 1 - back  # this direction's forward steps, last first
        t = tl.where(reverse, T - 1 - fwd_step, fwd_step)
        t_prev = tl.where(reverse, t + 1, t - 1)
        cell = ((seq64 * T + t) * D + d)[:, None]
        cell_prev = ((seq64 * T + t_prev) * D + d)[:, None]
        gate_ptrs = gates_ptr + cell * 4 * H + col[None, :]
        i = tl.load(gate_ptrs, mask=mask, other=0.0)
        f = tl.load(gate_ptrs + H, mask=mask, other=0.0)
        g = tl.load(gate_ptrs + 2 * H, mask=mask, other=0.0)
        o = tl.load(gate_ptrs + 3 * H, mask=mask, other=0.0)
        c = tl.load(cells_ptr + cell * H + col[None, :], mask=mask, other=0.0)
        # tl.where, not ``mask & (fwd_step > 0)``: Triton's interpreter splats a scalar comparison to int32, a mask
        # 3.9's refuses ("mask has unsupported dtype"); on a GPU both are the same predicate
        c_prev = tl.load(cells_ptr + cell_prev * H + col[None, :], mask=tl.where(fwd_step > 0, mask, False), other=0.0)
        dh = tl.load(dout_ptr + cell * H + col[None, :], mask=mask, other=0.0).to(tl.float32) + dh_next
        tanh_c = _tanh(c)
        dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
        da_i = dc * g * i * (1.0 - i)
        da_f = dc * c_prev * f * (1.0 - f)
        da_g = dc * i * (1.0 - g * g)
        da_o = dh * tanh_c * o * (1.0 - o)
        dx_ptrs = dxp_ptr + cell * 4 * H + col[None, :]
        tl.store(dx_ptrs, da_i, mask=mask)
        tl.store(dx_ptrs + H, da_f, mask=mask)
        tl.store(dx_ptrs + 2 * H, da_g, mask=mask)
        tl.store(dx_ptrs + 3 * H, da_o, mask=mask)
        dh_next = (_matmul(da_i, w_i, UPCAST, PRECISION) + _matmul(da_f, w_f, UPCAST, PRECISION)
                   + _matmul(da_g, w_g, UPCAST, PRECISION) + _matmul(da_o, w_o, UPCAST, PRECISION))
        dc = dc * f


@triton.jit
def lstm_fwd_tiled(xp_ptr, w_ptr, out_ptr, gates_ptr, cells_ptr, state_ptr, N, S, T, H, D,
                   sxb, sxs, sxt, sxd, sxg,
                   SAVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """As :func:`lstm_fwd_held`; c lives in ``cells`` (SAVE) or in ``state`` (N, 2, D, H), two slots used in turn."""
    d = tl.program_id(1)
    seq = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    seq_ok = (seq < N)[:, None]
    seq64 = seq.to(tl.int64)
    x_rows = ((seq64 // S) * sxb + (seq64 % S) * sxs + d * sxd)[:, None]
    lane = tl.arange(0, BLOCK_K)
    w_dir = w_ptr + d * 4 * H * H
    reverse = d % 2 == 1
    for step in range(T):
        t = tl.where(reverse, T - 1 - step, step)
        t_prev = tl.where(reverse, t + 1, t - 1)
        cell = ((seq64 * T + t) * D + d)[:, None]
        cell_prev = ((seq64 * T + t_prev) * D + d)[:, None]
        if SAVE:
            c_ptrs, c_prev_ptrs = cells_ptr + cell * H, cells_ptr + cell_prev * H
        else:
            c_ptrs = state_ptr + ((seq64 * 2 + step % 2) * D + d)[:, None] * H
            c_prev_ptrs = state_ptr + ((seq64 * 2 + (step + 1) % 2) * D + d)[:, None] * H
        for k0 in range(0, H, BLOCK_K):  # this tile's hidden units
            col = (k0 + lane)[None, :]
            mask = seq_ok & (col < H)
            x_ptrs = xp_ptr + x_rows + t * sxt + col * sxg
            a_i = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            a_f = tl.load(x_ptrs + H * sxg, mask=mask, other=0.0).to(tl.float32)
            a_g = tl.load(x_ptrs + 2 * H * sxg, mask=mask, other=0.0).to(tl.float32)
            a_o = tl.load(x_ptrs + 3 * H * sxg, mask=mask, other=0.0).to(tl.float32)
            if step > 0:  # + h_{t-1} W_hh^T, over BLOCK_K-wide slices of h_{t-1}
                for j0 in range(0, H, BLOCK_K):
                    unit = j0 + lane  # h's units: the columns of h, the rows of W_q^T
                    row = unit[:, None]
                    h = tl.load(out_ptr + cell_prev * H + unit[None, :], mask=seq_ok & (unit < H)[None, :], other=0.0)
                    w_ptrs = w_dir + col * H + row  # W_q^T[j, k] = W_hh[q*H + k, j]
                    w_mask = (row < H) & (col < H)
                    a_i += _matmul(h, tl.load(w_ptrs, mask=w_mask, other=0.0), UPCAST, PRECISION)
                    a_f += _matmul(h, tl.load(w_ptrs + H * H, mask=w_mask, other=0.0), UPCAST, PRECISION)
                    a_g += _matmul(h, tl.load(w_ptrs + 2 * H * H, mask=w_mask, other=0.0), UPCAST, PRECISION)
                    a_o += _matmul(h, tl.load(w_ptrs + 3 * H * H, mask=w_mask, other=0.0), UPCAST, PRECISION)
            i = tl.sigmoid(a_i)
            f = tl.sigmoid(a_f)
            g = _tanh(a_g)
            o = tl.sigmoid(a_o)
            c = f * tl.load(c_prev_ptrs + col, mask=mask & (step > 0), other=0.0) + i * g
            tl.store(c_ptrs + col, c, mask=mask)
            tl.store(out_ptr + cell * H + col, (o * _tanh(c)).to(out_ptr.dtype.element_ty), mask=mask)
            if SAVE:
                gate_ptrs = gates_ptr + cell * 4 * H + col
                tl.store(gate_ptrs, i, mask=mask)
                tl.store(gate_ptrs + H, f, mask=mask)
                tl.store(gate_ptrs + 2 * H, g, mask=mask)
                tl.store(gate_ptrs + 3 * H, o, mask=mask)
        tl.debug_barrier()  # this step's h and c, written by every thread, are read by all in the next


@triton.jit
def lstm_bwd_tiled(dout_ptr, gates_ptr, cells_ptr, w_ptr, dxp_ptr, state_ptr, N, T, H, D,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """As :func:`lstm_bwd_held`; dL/dh through the recurrence is the later step's gate gradients (just written to
    ``dxp``) times W_hh, and dL/dc carried back lives in ``state`` (N, 2, D, H), two slots used in turn."""
    d = tl.program_id(1)
    seq = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    seq_ok = (seq < N)[:, None]
    seq64 = seq.to(tl.int64)
    lane = tl.arange(0, BLOCK_K)
    w_dir = w_ptr + d * 4 * H * H
    reverse = d % 2 == 1
    for back in range(T):
        fwd_step = T - 1 - back  # this direction's forward steps, last first
        t = tl.where(reverse, T - 1 - fwd_step, fwd_step)
        t_prev = tl.where(reverse, t + 1, t - 1)
        t_next = tl.where(reverse, t - 1, t + 1)
        cell = ((seq64 * T + t) * D + d)[:, None]
        cell_prev = ((seq64 * T + t_prev) * D + d)[:, None]
        cell_next = ((seq64 * T + t_next) * D + d)[:, None]
        dc_ptrs = state_ptr + ((seq64 * 2 + back % 2) * D + d)[:, None] * H
        dc_next_ptrs = state_ptr + ((seq64 * 2 + (back + 1) % 2) * D + d)[:, None] * H
        for k0 in range(0, H, BLOCK_K):  # this tile's hidden units
            col = (k0 + lane)[None, :]
            mask = seq_ok & (col < H)
            dh = tl.load(dout_ptr + cell * H + col, mask=mask, other=0.0).to(tl.float32)
            if back > 0:  # + sum over gates q of dL/da_q(t_next) W_q, over BLOCK_K-wide slices of the gates
                for j0 in range(0, H, BLOCK_K):
                    unit = j0 + lane  # gate q's units: the columns of dL/da_q, the rows of W_q
                    row = unit[:, None]
                    da_ptrs = dxp_ptr + cell_next * 4 * H + unit[None, :]
                    da_mask = seq_ok & (unit < H)[None, :]
                    w_ptrs = w_dir + row * H + col  # W_q[j, k] = W_hh[q*H + j, k]
                    w_mask = (row < H) & (col < H)
                    for q in tl.static_range(4):
                        da = tl.load(da_ptrs + q * H, mask=da_mask, other=0.0)
                        dh += _matmul(da, tl.load(w_ptrs + q * H * H, mask=w_mask, other=0.0), UPCAST, PRECISION)
            gate_ptrs = gates_ptr + cell * 4 * H + col
            i = tl.load(gate_ptrs, mask=mask, other=0.0)
            f = tl.load(gate_ptrs + H, mask=mask, other=0.0)
            g = tl.load(gate_ptrs + 2 * H, mask=mask, other=0.0)
            o = tl.load(gate_ptrs + 3 * H, mask=mask, other=0.0)
            c = tl.load(cells_ptr + cell * H + col, mask=mask, other=0.0)
            c_prev = tl.load(cells_ptr + cell_prev * H + col, mask=tl.where(fwd_step > 0, mask, False),
                             other=0.0)  # tl.where: as in lstm_bwd_held
            tanh_c = _tanh(c)
            dc = tl.load(dc_next_ptrs + col, mask=mask & (back > 0), other=0.0) + dh * o * (1.0 - tanh_c * tanh_c)
            tl.store(dc_ptrs + col, dc * f, mask=mask)
            dx_ptrs = dxp_ptr + cell * 4 * H + col
            tl.store(dx_ptrs, dc * g * i * (1.0 - i), mask=mask)
            tl.store(dx_ptrs + H, dc * c_prev * f * (1.0 - f), mask=mask)
            tl.store(dx_ptrs + 2 * H, dc * i * (1.0 - g * g), mask=mask)
            tl.store(dx_ptrs + 3 * H, dh * tanh_c * o * (1.0 - o), mask=mask)
        tl.debug_barrier()  # this step's gate gradients and dc, written by every thread, are read by all in the next
