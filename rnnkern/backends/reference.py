"""Backend ``reference``: explicit back-propagation through time in plain vectorised torch ops.

This is the specification every kernel is tested against, and it is itself tested against
torch.nn and ``torch.autograd.gradcheck`` in float64. The forward is a loop over time of batched
matrix products; the backward is the same loop run backwards with the derivatives written out
(no autograd), and the weight gradients are one large matrix product after the loop.

Legend: ``T`` time, ``B`` batch, ``H`` hidden, ``P`` state size (proj_size or H), ``G`` gates.
"""

from __future__ import annotations

import torch

from .base import (
    BackwardResult,
    ForwardResult,
    LayerConfig,
    Saved,
    empty,
    gate_count,
    state_dtype,
)


def reversed_time_index(lengths: torch.Tensor | None, T: int, B: int, device) -> torch.Tensor:
    """Index ``[T, B]`` mapping processing step ``s`` to time ``lengths[b] - 1 - s``.

    Steps past an element's length map to themselves, so the map is its own inverse: gathering
    with it twice is the identity. Without lengths every element has length ``T``.
    """
    steps = torch.arange(T, device=device).unsqueeze(1).expand(T, B)
    if lengths is None:
        return (T - 1 - steps).contiguous()
    lens = lengths.to(device=device, dtype=torch.long).unsqueeze(0)
    return torch.where(steps < lens, lens - 1 - steps, steps).contiguous()


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[s, b] = x[index[s, b], b]`` for ``x`` of shape ``[T, B, F]``."""
    return x.gather(0, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _valid_mask(lengths: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
    """Boolean ``[T, B, 1]``: step ``s`` is inside element ``b``'s length."""
    if lengths is None:
        return None
    steps = torch.arange(T, device=device).unsqueeze(1)
    return (steps < lengths.to(device=device, dtype=torch.long).unsqueeze(0)).unsqueeze(-1)


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=like.device)


class ReferenceBackend:
    name = "reference"

    def available(self) -> bool | str:
        return True

    def supports(self, config: LayerConfig) -> bool | str:
        if config.cell not in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
            return f"unknown cell {config.cell!r}"
        return True

    def forward(self, cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save) -> ForwardResult:
        T, B, _ = gx.shape
        acc = state_dtype(gx.dtype)
        if reverse:
            index = reversed_time_index(lengths, T, B, gx.device)
            gx = _gather_time(gx, index)
        valid = _valid_mask(lengths, T, gx.device)
        w = w_hh.to(acc)
        b = None if b_hh is None else b_hh.to(acc)
        wr = None if w_hr is None else w_hr.to(acc)
        H = w.shape[0] // gate_count(cell)
        P = w.shape[1]

        y = empty((T, B, P), acc, gx.device)
        hs = empty((T + 1, B, P), acc, gx.device) if save else None
        aux = None
        gates = None
        if save and cell == "lstm":
            aux = empty((T + 1, B, H), acc, gx.device)
            gates = empty((T, B, 4 * H), acc, gx.device)
        elif save and cell == "gru":
            aux = empty((T, B, H), acc, gx.device)
            gates = empty((T, B, 3 * H), acc, gx.device)

        h = h0.to(acc)
        c = c0.to(acc) if cell == "lstm" else None
        if save:
            hs[0] = h
            if cell == "lstm":
                aux[0] = c
        for s in range(T):
            gh = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()  # [B, G*H]
            g = gx[s].to(acc)
            if cell == "lstm":
                pre = g + gh
                i, f, gg, o = pre.chunk(4, dim=1)
                i, f, gg, o = i.sigmoid(), f.sigmoid(), gg.tanh(), o.sigmoid()
                c_new = f * c + i * gg
                h_new = o * c_new.tanh()
                if wr is not None:
                    h_new = h_new @ wr.t()
                if save:
                    gates[s] = torch.cat((i, f, gg, o), dim=1)
            elif cell == "gru":
                gr, gz, gn = g.chunk(3, dim=1)
                hr, hz, hn = gh.chunk(3, dim=1)
                r = (gr + hr).sigmoid()
                z = (gz + hz).sigmoid()
                n = (gn + r * hn).tanh()
                h_new = (1 - z) * n + z * h
                if save:
                    gates[s] = torch.cat((r, z, n), dim=1)
                    aux[s] = hn
            elif cell == "rnn_tanh":
                h_new = (g + gh).tanh()
            else:
                h_new = (g + gh).relu()

            if valid is None:
                h = h_new
                y[s] = h_new
                if cell == "lstm":
                    c = c_new
            else:
                m = valid[s]
                h = torch.where(m, h_new, h)
                y[s] = torch.where(m, h_new, torch.zeros_like(h_new))
                if cell == "lstm":
                    c = torch.where(m, c_new, c)
            if save:
                hs[s + 1] = h
                if cell == "lstm":
                    aux[s + 1] = c

        if reverse:
            y = _gather_time(y, index)
        saved = Saved(
            hs if save else _empty(gx, acc),
            aux if aux is not None else _empty(gx, acc),
            gates if gates is not None else _empty(gx, acc),
        )
        c_n = c.clone() if cell == "lstm" else _empty(gx, acc)
        return ForwardResult(y.to(gx.dtype), h.clone(), c_n, saved)

    def backward(
        self, cell, saved, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n
    ) -> BackwardResult:
        hs, aux, gates = saved
        T, B, P = dy.shape
        acc = state_dtype(dy.dtype)
        G = gate_count(cell)
        w = w_hh.to(acc)
        wr = None if w_hr is None else w_hr.to(acc)
        H = w.shape[0] // G
        out_dtype = dy.dtype
        dy = dy.to(acc)
        if reverse:
            index = reversed_time_index(lengths, T, B, dy.device)
            dy = _gather_time(dy, index)
        valid = _valid_mask(lengths, T, dy.device)

        dgx = empty((T, B, G * H), acc, dy.device)
        # The gradient of the recurrent pre-activation W_hh h + b_hh. It equals dgx except for
        # the GRU's n gate, where the hidden part is scaled by r.
        dgh = dgx if cell != "gru" else empty((T, B, G * H), acc, dy.device)
        dh_proj = empty((T, B, P), acc, dy.device) if wr is not None else None

        dh = dh_n.to(acc).clone()
        dc = dc_n.to(acc).clone() if cell == "lstm" else None
        for s in range(T - 1, -1, -1):
            dh_total = dh + dy[s]
            if cell == "lstm":
                i, f, g, o = gates[s].chunk(4, dim=1)
                c_prev, c_new = aux[s], aux[s + 1]
                if wr is not None:
                    dh_proj[s] = dh_total
                    dm = dh_total @ wr  # [B, H]
                else:
                    dm = dh_total
                tc = c_new.tanh()
                do = dm * tc
                dc_total = dc + dm * o * (1 - tc * tc)
                di = dc_total * g
                dg = dc_total * i
                df = dc_total * c_prev
                dpre = torch.cat(
                    (di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)), dim=1
                )
                dc_prev = dc_total * f
                dh_prev = dpre @ w
            elif cell == "gru":
                r, z, n = gates[s].chunk(3, dim=1)
                h_prev = hs[s]
                dn = dh_total * (1 - z)
                dz = dh_total * (h_prev - n)
                dn_pre = dn * (1 - n * n)
                dr_pre = dn_pre * aux[s] * r * (1 - r)
                dz_pre = dz * z * (1 - z)
                dpre = torch.cat((dr_pre, dz_pre, dn_pre), dim=1)
                dpre_h = torch.cat((dr_pre, dz_pre, dn_pre * r), dim=1)
                dh_prev = dh_total * z + dpre_h @ w
            else:
                h_new = hs[s + 1]
                deriv = 1 - h_new * h_new if cell == "rnn_tanh" else (h_new > 0).to(acc)
                dpre = dh_total * deriv
                dh_prev = dpre @ w

            if valid is not None:
                m = valid[s]
                dpre = torch.where(m, dpre, torch.zeros_like(dpre))
                dh_prev = torch.where(m, dh_prev, dh)
                if cell == "lstm":
                    dc_prev = torch.where(m, dc_prev, dc)
                if cell == "gru":
                    dpre_h = torch.where(m, dpre_h, torch.zeros_like(dpre_h))
                if dh_proj is not None:
                    dh_proj[s] = torch.where(m, dh_proj[s], torch.zeros_like(dh_total))
            dgx[s] = dpre
            if cell == "gru":
                dgh[s] = dpre_h
            dh = dh_prev
            if cell == "lstm":
                dc = dc_prev

        h_prev_all = hs[:T].reshape(T * B, P)
        dw_hh = (dgh.reshape(T * B, G * H).t() @ h_prev_all).to(w_hh.dtype)
        db_hh = None if b_hh is None else dgh.sum(dim=(0, 1)).to(b_hh.dtype)
        dw_hr = None
        if wr is not None:
            i, f, g, o = gates.chunk(4, dim=2)
            m_all = (o * aux[1:].tanh()).reshape(T * B, H)
            dw_hr = (dh_proj.reshape(T * B, P).t() @ m_all).to(w_hr.dtype)
        if reverse:
            dgx = _gather_time(dgx, index)
        return BackwardResult(
            dgx.to(out_dtype),
            dh,
            dc,
            dw_hh,
            db_hh,
            dw_hr,
        )


BACKEND = ReferenceBackend()
