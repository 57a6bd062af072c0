"""The context codec's decode loop, compiled with numba (``tokray.storage.entropy.decode_ids`` sets
it up and checks what it returns).

Why compiled: in numpy every token position costs a dozen array calls over the lanes, and that
per-call overhead, not the arithmetic, set the decode speed (~0.3 M samples/s of 8x8 per core).
Why in phases: the decode-table lookups (up to 32 MiB of tables, a cache miss each) only overlap
when they sit in a loop of their own; with the state update and the renormalisation in the same
loop, each lane waited for its miss (measured on the 32 MiB CIFAR-10 tables: 0.19-0.20 M samples/s
fused, 0.76-1.09 M phased).
"""

from __future__ import annotations

import numba
import numpy as np

OK, STREAM_ENDS_EARLY, BAD_INITIAL_STATE, BAD_FINAL_STATE = 0, 1, 2, 3


@numba.njit(cache=True, nogil=True, boundscheck=False)
def decode_lanes(x, words, dec, sym, fs, packed, ctx_m, src, const, plan, spans, out, lanes, kin, scale_bits,
                 id_bits, freq_bits, init_cap):
    """Decode every round of a shard into ``out`` [rounds * lanes, t] (uint16), updating the lane
    states ``x`` (int64) in place. Returns (status, words consumed); status is one of the constants
    above. ``ctx_m`` [features, K + 1]: each neighbour id's context offset; ``src`` [t, features]:
    the neighbour's position, -1 off the grid (its offset is in ``const`` [t]); ``plan`` [rounds, 3]:
    per round the active lanes, the lanes that go on past it, and which of ``spans`` [kinds, t, 2]
    (the lanes renormalised after each position) it uses.
    Packed tables: ``dec``; otherwise ``sym`` and ``fs`` (see entropy._layout)."""
    t = src.shape[0]
    nf = src.shape[1]
    mask = (np.int64(1) << scale_bits) - 1
    kmask = (np.int64(1) << id_bits) - 1
    fmask = (np.int64(1) << freq_bits) - 1
    bias_shift = id_bits + freq_bits
    ctx_shift = scale_bits - id_bits
    low = np.int64(1) << 31
    nwords = words.shape[0]
    ptr = 0
    idx = np.empty(lanes, np.int64)
    ent = np.empty(lanes, np.int64)
    for r in range(plan.shape[0]):
        active, tail, kind = plan[r, 0], plan[r, 1], plan[r, 2]
        base = r * lanes
        for p in range(t):
            if p == t - kin and tail < active:  # ending lanes: the rest is in their initial state
                for j in range(tail, active):
                    v = x[j]
                    if v < low or v - low >= init_cap:
                        return BAD_INITIAL_STATE, ptr
                    x[j] = v - low
            c0 = const[p]
            for j in range(active):
                idx[j] = c0 | (x[j] & mask)
            for k in range(nf):
                s = src[p, k]
                if s >= 0:
                    for j in range(active):
                        idx[j] += ctx_m[k, out[base + j, s]]
            if packed:  # one lookup: id | freq << id_bits | (slot - start) << (id_bits + freq_bits)
                for j in range(active):
                    ent[j] = dec[idx[j]]
                for j in range(active):
                    e = ent[j]
                    out[base + j, p] = e & kmask
                    x[j] = (x[j] >> scale_bits) * ((e >> id_bits) & fmask) + (e >> bias_shift)
            else:  # the id per slot, then freq << 16 | start per (context, id)
                for j in range(active):
                    ent[j] = sym[idx[j]]
                for j in range(active):
                    s = ent[j]
                    out[base + j, p] = s
                    e = np.int64(fs[((idx[j] & ~mask) >> ctx_shift) | s])
                    x[j] = (x[j] >> scale_bits) * (e >> 16) + (idx[j] & mask) - (e & 0xFFFF)
            for j in range(spans[kind, p, 0], spans[kind, p, 1]):
                v = x[j]
                if v < low:
                    if ptr >= nwords:
                        return STREAM_ENDS_EARLY, ptr
                    x[j] = (v << 32) | np.int64(words[ptr])
                    ptr += 1
        for j in range(tail, active):
            if x[j] != 0:
                return BAD_FINAL_STATE, ptr
    return OK, ptr
