"""Context-coded token ids: a small neighbour-conditioned model fitted at write time, and a
vectorised rANS coder that codes a shard below the order-0 entropy of its ids and decodes it at
hundreds of thousands of 8x8 samples per second on one core, in numpy.

The model (``ContextModel``) predicts a token from its already-decoded neighbours (by default
the left and the upper token). Each neighbour's id is mapped to one of a few groups (clustered at
fit time by the distributions they predict; "outside the grid" has a group of its own), and
the log-probability of token ``x`` in context ``(g_1, g_2, ...)`` is log-linear:

    log2 p(x | g) = bias[x] + sum_k step_k * q_k[g_k, x]     (up to normalisation)

with integer parameters in 1/16-bit units (``q_k`` int8, coarsely quantised). Its serialised form
(``to_bytes``) is those integers, LZMA-compressed: a few KiB to a few tens of KiB, and it counts
against the saving. ``fit_context_model`` picks the number of groups by total size (model bytes +
coded bits of the ids it was fitted on), so a small dataset gets a small model.

From the integers, encoder and decoder build the same coding tables with integer arithmetic only
(no exp/log of floats, so no platform can build different tables): per context, integer
frequencies summing to ``2**scale_bits``, every id at least 1 (ids never seen when fitting still
code), a slot->id lookup table and a packed (frequency, start) table.

The coder is rANS with a 32-bit state and 16-bit renormalisation. A shard's samples are dealt to
``L`` lanes (sample s goes to lane s % L), each lane one rANS state; all lanes step together, one
token position at a time, so every numpy call works on up to L values. The words the lanes emit
are interleaved in one stream in the order the decoder consumes them. A lane's final state costs
4 bytes, so lanes are few (at most 512); the last ids of each lane's last sample ride in the
lane's initial state instead of costing 16 bits of nothing.

Shard layout (little-endian): version u8, lanes u32, raw ids per lane u8, lanes x u32 final
states, then the u16 word stream. Decoding checks the layout, that the stream is consumed
exactly and that every lane ends in a valid initial state; anything else raises ValueError.
"""

from __future__ import annotations

import functools
import lzma
import math
import struct
import zlib
from typing import Sequence

import numpy as np

__all__ = ["ContextModel", "fit_context_model", "encode_ids", "decode_ids", "order0_bits", "coded_bits",
           "NEIGHBOURS"]

UNIT = 16  # log2-probabilities are integers in units of 1/16 bit
# round(2 ** (30 - j / 16)), j = 0..15: integer exp2 of the fractional part, identical everywhere
_EXP2 = np.array([1073741824, 1028218693, 984625594, 942880699, 902905651, 864625413, 827968132, 792865000,
                  759250125, 727060411, 696235434, 666717336, 638450708, 611382493, 585461881, 560640218],
                 dtype=np.int64)
RANS_L = 1 << 31  # the normalised rANS state is in [2**31, 2**63) (int64); words are 32 bits
MAX_LANES = 1024
MODEL_MAGIC = b"TKCM"
MODEL_VERSION = 1
STREAM_VERSION = 1
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

# neighbour name -> (dy, dx) offset from the token being coded; only already-decoded positions
NEIGHBOURS = {"left": (0, -1), "up": (-1, 0), "upleft": (-1, -1), "upright": (-1, 1)}

_STREAM_HEADER = struct.Struct("<BIB")
_MODEL_HEADER = struct.Struct("<4sBIBB")
_FEATURE = struct.Struct("<bbHB")


def _scale_bits(codebook_size: int) -> int:
    """Frequencies sum to 2**scale_bits: about 8 slots per id on average, 12..16 bits."""
    return int(min(16, max(12, math.ceil(math.log2(codebook_size)) + 3)))


def _check_ids(ids: np.ndarray, codebook_size: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"ids must be [N, h, w], got shape {ids.shape}")
    if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == bool):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    if not 2 <= codebook_size <= 65536:
        raise ValueError(f"codebook_size {codebook_size} must be in [2, 65536]")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= codebook_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the codebook (size {codebook_size})")
    return ids


def _neighbour_ids(ids: np.ndarray, dy: int, dx: int, none: int) -> np.ndarray:
    """[N, h, w] int64: the id at (i+dy, j+dx) of each position, ``none`` outside the grid."""
    n, h, w = ids.shape
    out = np.full((n, h, w), none, dtype=np.int64)
    i0, i1 = max(0, -dy), min(h, h - dy)
    j0, j1 = max(0, -dx), min(w, w - dx)
    if i0 < i1 and j0 < j1:
        out[:, i0:i1, j0:j1] = ids[:, i0 + dy:i1 + dy, j0 + dx:j1 + dx]
    return out


class ContextModel:
    """A neighbour-conditioned, log-linear model of token ids, with integer parameters.

    Build one with ``fit_context_model`` or ``ContextModel.from_bytes``; it is immutable. Coding
    tables are built on first use and kept (a few MiB to a few tens of MiB, see ``table_bytes``).
    """

    def __init__(self, codebook_size: int, features: Sequence[tuple[int, int]], groups: Sequence[np.ndarray],
                 num_groups: Sequence[int], bias: np.ndarray, weights: Sequence[np.ndarray], steps: Sequence[int],
                 scale_bits: int | None = None):
        self.codebook_size = int(codebook_size)
        k = self.codebook_size
        self.scale_bits = _scale_bits(k) if scale_bits is None else int(scale_bits)
        if not 2 <= k <= 65536:
            raise ValueError(f"codebook_size {k} must be in [2, 65536]")
        if not (math.ceil(math.log2(k)) <= self.scale_bits <= 16):
            raise ValueError(f"scale_bits {self.scale_bits} cannot code {k} ids")
        self.features = tuple((int(dy), int(dx)) for dy, dx in features)
        self.num_groups = tuple(int(g) for g in num_groups)
        self.steps = tuple(int(s) for s in steps)
        self.groups = tuple(np.asarray(g, dtype=np.int64) for g in groups)
        self.bias = np.asarray(bias, dtype=np.int64)
        self.weights = tuple(np.asarray(q, dtype=np.int64) for q in weights)
        n = len(self.features)
        if not (len(self.num_groups) == len(self.steps) == len(self.groups) == len(self.weights) == n):
            raise ValueError("one group map, group count, step and weight table per feature")
        for (dy, dx), g, gm, q in zip(self.features, self.num_groups, self.groups, self.weights):
            if not (dy < 0 or (dy == 0 and dx < 0)):
                raise ValueError(f"neighbour offset {(dy, dx)} is not decoded before the token it predicts")
            if g < 1 or gm.shape != (k + 1,) or q.shape != (g, k) or (gm.size and (gm.min() < 0 or gm.max() >= g)):
                raise ValueError("malformed context model feature")
        if self.bias.shape != (k,):
            raise ValueError("malformed context model bias")
        self.num_contexts = int(np.prod(self.num_groups, dtype=np.int64)) if n else 1
        self._tables = None

    # -- serialisation -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Compact form: a small header, a CRC32 and the LZMA-compressed integer parameters."""
        head = _MODEL_HEADER.pack(MODEL_MAGIC, MODEL_VERSION, self.codebook_size, self.scale_bits, len(self.features))
        head += b"".join(_FEATURE.pack(dy, dx, g, s) for (dy, dx), g, s in
                         zip(self.features, self.num_groups, self.steps))
        parts = [np.clip(self.bias, -32768, 32767).astype("<i2").tobytes()]
        for g, gm, q in zip(self.num_groups, self.groups, self.weights):
            parts.append(gm.astype("u1" if g <= 256 else "<u2").tobytes())
            parts.append(q.T.astype("i1").tobytes())  # id-major: an id's weights across groups sit together
        payload = b"".join(parts)
        crc = struct.pack("<I", zlib.crc32(head + payload))
        return head + crc + lzma.compress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ContextModel":
        """Inverse of ``to_bytes``; the same bytes give the same (cached) model object."""
        return _model_from_bytes(bytes(data))

    @classmethod
    def _parse(cls, data: bytes) -> "ContextModel":
        if len(data) < _MODEL_HEADER.size + 4:
            raise ValueError("context model: truncated header")
        magic, version, k, mbits, nf = _MODEL_HEADER.unpack_from(data)
        if magic != MODEL_MAGIC:
            raise ValueError("context model: bad magic (not a tokray context model)")
        if version != MODEL_VERSION:
            raise ValueError(f"context model: unsupported version {version}")
        off = _MODEL_HEADER.size
        if len(data) < off + nf * _FEATURE.size + 4:
            raise ValueError("context model: truncated header")
        feats = [_FEATURE.unpack_from(data, off + i * _FEATURE.size) for i in range(nf)]
        off += nf * _FEATURE.size
        head = data[:off]
        (crc,) = struct.unpack_from("<I", data, off)
        try:
            payload = lzma.decompress(data[off + 4:], format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        except lzma.LZMAError as e:
            raise ValueError(f"context model: corrupt parameters ({e})") from None
        if zlib.crc32(head + payload) != crc:
            raise ValueError("context model: checksum mismatch (corrupt model bytes)")
        if not 2 <= k <= 65536:
            raise ValueError(f"context model: bad codebook size {k}")
        need = 2 * k + sum((k + 1) * (1 if g <= 256 else 2) + g * k for _, _, g, _ in feats)
        if len(payload) != need:
            raise ValueError("context model: parameter block has the wrong size")
        pos = 2 * k
        bias = np.frombuffer(payload, "<i2", k, 0).astype(np.int64)
        groups, weights = [], []
        for _, _, g, _ in feats:
            dt = "u1" if g <= 256 else "<u2"
            groups.append(np.frombuffer(payload, dt, k + 1, pos).astype(np.int64))
            pos += (k + 1) * np.dtype(dt).itemsize
            weights.append(np.frombuffer(payload, "i1", g * k, pos).reshape(k, g).T.astype(np.int64))
            pos += g * k
        return cls(k, [(dy, dx) for dy, dx, _, _ in feats], groups, [g for _, _, g, _ in feats], bias, weights,
                   [s for _, _, _, s in feats], scale_bits=mbits)

    def __repr__(self) -> str:
        names = {v: n for n, v in NEIGHBOURS.items()}
        f = ", ".join(f"{names.get(o, o)}:{g}" for o, g in zip(self.features, self.num_groups))
        return (f"ContextModel(codebook_size={self.codebook_size}, contexts={self.num_contexts} [{f}], "
                f"scale_bits={self.scale_bits})")

    # -- tables --------------------------------------------------------------------------------
    def log2_weights(self) -> np.ndarray:
        """Integer unnormalised log2-probabilities [contexts, K] in 1/16-bit units."""
        k = self.codebook_size
        z = self.bias.reshape((1,) * len(self.features) + (k,))
        for i, (q, s) in enumerate(zip(self.weights, self.steps)):
            shape = [1] * len(self.features) + [k]
            shape[i] = self.num_groups[i]
            z = z + (s * q).reshape(shape)
        return np.broadcast_to(z, tuple(self.num_groups) + (k,)).reshape(self.num_contexts, k)

    def frequencies(self) -> np.ndarray:
        """Integer frequencies [contexts, K] (int64), each row summing to 2**scale_bits, all >= 1."""
        return self._get_tables()["freq"]

    @property
    def table_bytes(self) -> int:
        """Memory the decode tables take once built."""
        return self.num_contexts * ((1 << self.scale_bits) * 2 + (1 << self._id_bits) * 4)

    @property
    def _id_bits(self) -> int:
        return max(0, math.ceil(math.log2(self.codebook_size)))

    def _get_tables(self) -> dict:
        if self._tables is None:
            self._tables = self._build_tables()
        return self._tables

    def _build_tables(self) -> dict:
        k, m = self.codebook_size, 1 << self.scale_bits
        z = self.log2_weights()
        e = z.max(axis=1, keepdims=True) - z  # >= 0
        w = _EXP2[e & 15] >> np.minimum(e >> 4, 62)
        tot = w.sum(axis=1, keepdims=True)
        f = np.maximum(1, (w * m + tot // 2) // tot)
        f = _fix_sums(f, m)
        start = np.cumsum(f, axis=1) - f
        kb = self._id_bits
        fq = np.zeros((self.num_contexts, 1 << kb), dtype=np.uint16)
        fq[:, :k] = f  # f < 2**16: rows sum to 2**scale_bits <= 2**16 over >= 2 ids
        st = np.zeros((self.num_contexts, 1 << kb), dtype=np.uint16)
        st[:, :k] = start
        lut = np.repeat(np.tile(np.arange(k, dtype=np.uint16), self.num_contexts), f.ravel())
        strides, acc = [], 1
        for g in reversed(self.num_groups):
            strides.append(acc)
            acc *= g
        strides = strides[::-1]
        ctx_m = [(gm * s) << self.scale_bits for gm, s in zip(self.groups, strides)]  # int64
        return {"freq": f, "start": start, "fq": fq.ravel(), "st": st.ravel(), "lut": lut, "ctx_m": ctx_m}

    def contexts(self, ids: np.ndarray) -> np.ndarray:
        """Context index [N, h, w] (int64) of every token of ``ids`` [N, h, w]."""
        ids = np.asarray(ids)
        c = np.zeros(ids.shape, dtype=np.int64)
        for (dy, dx), gm, g in zip(self.features, self.groups, self.num_groups):
            c = c * g + gm[_neighbour_ids(ids, dy, dx, self.codebook_size)]
        return c


@functools.lru_cache(maxsize=8)
def _model_from_bytes(data: bytes) -> ContextModel:
    return ContextModel._parse(data)


def _fix_sums(f: np.ndarray, total: int) -> np.ndarray:
    """Adjust rows of integer frequencies (all >= 1) to sum to ``total``: +-1 on the largest."""
    f = f.copy()
    k = f.shape[1]
    ar = np.arange(k)[None]
    for _ in range(1000):
        diff = total - f.sum(axis=1)
        if not diff.any():
            return f
        order = np.argsort(-f, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(ar, order.shape), axis=1)
        movable = np.where(diff > 0, k, (f > 1).sum(axis=1))
        n_adj = np.minimum(np.abs(diff), movable)
        f += np.sign(diff)[:, None] * (rank < n_adj[:, None])
    raise AssertionError("frequency normalisation did not converge")


# -- the coder ---------------------------------------------------------------------------------

def _init_ids(scale_bits: int, tokens_per_sample: int) -> int:
    """Ids of each lane's last sample coded into the lane's initial state (rANS from state 0,
    no renormalisation): as many as surely fit, 2**31 + M**k <= 2**63."""
    m, k = 1 << scale_bits, 1
    while k < tokens_per_sample and m ** (k + 1) <= (1 << 63) - RANS_L:
        k += 1
    return k


def _lane_plan(n: int, lanes: int) -> tuple[int, int]:
    rounds = -(-n // lanes)
    return rounds, n - (rounds - 1) * lanes  # rounds, lanes active in the last round


def _tail_lanes(r: int, rounds: int, rem: int, lanes: int) -> int:
    """Lanes [0, result) go on after round r; lanes [result, active) end in round r."""
    if r == rounds - 1:
        return 0
    if r == rounds - 2 and rem < lanes:
        return rem
    return lanes


def _block(scale_bits: int) -> int:
    """Positions per renormalisation: 2 while a pair of frequencies fits the state's headroom."""
    return 2 if 2 * scale_bits <= 31 else 1


def _block_end(p: int, length: int, block: int) -> bool:
    """Positions are renormalised in blocks (0, 1), (2, 3), ... (or singly); the last may be single."""
    return block == 1 or p % 2 == 1 or p == length - 1


def _renorm_span(p: int, t: int, k: int, tail: int, active: int, block: int) -> tuple[int, int]:
    """Lanes [lo, hi) whose renormalisation block ends at position p."""
    a = _block_end(p, t, block) and tail > 0  # lanes that go on: blocks over the whole sample
    b = p < t - k and _block_end(p, t - k, block) and tail < active  # ending lanes, before their initial ids
    if a and b:
        return 0, active
    if a:
        return 0, tail
    if b:
        return tail, active
    return 0, 0


def _sources(grid: tuple[int, int], features) -> list[list[int | None]]:
    """Per position p, per feature: the flat position of the neighbour, or None off the grid."""
    h, w = grid
    out = []
    for i in range(h):
        for j in range(w):
            row = []
            for dy, dx in features:
                y, x = i + dy, j + dx
                row.append(y * w + x if 0 <= y < h and 0 <= x < w else None)
            out.append(row)
    return out


def default_lanes(n: int, tokens_per_sample: int) -> int:
    """Lanes for a shard: wide enough for numpy to pay off, few enough that final states are cheap
    (about 6 bits each)."""
    return max(1, min(n, MAX_LANES))


def _pack_states(x: np.ndarray) -> bytes:
    """Final states in [2**31, 2**63): 5 bits of (bit length - 32) each, then each state's bits
    below its leading one: about 4.5 bits more than the state's information, not 32."""
    bl = 31 + np.frexp((x >> 31).astype(np.float64))[1].astype(np.int64)
    lanes = x.size
    nb_bits = np.unpackbits((bl - 32).astype(np.uint8)[:, None], axis=1)[:, 3:]
    xb = np.unpackbits(x.astype(">u8").view(np.uint8).reshape(lanes, 8), axis=1)
    keep = np.arange(64)[None] >= (65 - bl)[:, None]
    return np.packbits(np.concatenate([nb_bits.ravel(), xb[keep]])).tobytes()


def _unpack_states(data: memoryview, off: int, lanes: int) -> tuple[np.ndarray, int]:
    """Inverse of _pack_states: (states, offset after them)."""
    n5 = -(-5 * lanes // 8)
    if len(data) < off + n5:
        raise ValueError("coded ids: truncated lane states")
    hb = np.unpackbits(np.frombuffer(data, np.uint8, n5, off))[:5 * lanes].reshape(lanes, 5).astype(np.int64)
    ln = hb @ np.array([16, 8, 4, 2, 1]) + 31  # bits below the leading one
    total = 5 * lanes + int(ln.sum())
    nbytes = -(-total // 8)
    if len(data) < off + nbytes:
        raise ValueError("coded ids: truncated lane states")
    bits = np.unpackbits(np.frombuffer(data, np.uint8, nbytes, off))[5 * lanes:total]
    j = np.arange(63)[None]
    valid = j < ln[:, None]
    pos = np.minimum((np.cumsum(ln) - ln)[:, None] + j, bits.size - 1)
    b = (bits[pos] & valid).astype(np.int64)
    shift = np.where(valid, ln[:, None] - 1 - j, 0)
    x = (b << shift).sum(axis=1) | (np.int64(1) << ln)
    return x, off + nbytes


def encode_ids(ids: np.ndarray, model: ContextModel, lanes: int | None = None) -> bytes:
    """Code ``ids`` [N, h, w] (any integer dtype, each < model.codebook_size) losslessly."""
    k = model.codebook_size
    ids = _check_ids(ids, k)
    n, h, w = ids.shape
    t = h * w
    lanes = default_lanes(n, t) if lanes is None else int(lanes)
    if n == 0:
        return _STREAM_HEADER.pack(STREAM_VERSION, 0, 0)
    if not 1 <= lanes <= min(n, 1 << 20):
        raise ValueError(f"lanes must be in [1, {min(n, 1 << 20)}], got {lanes}")
    mb = model.scale_bits
    kin, block = _init_ids(mb, t), _block(mb)
    tabs = model._get_tables()
    flat = ids.reshape(n, t).astype(np.int64)
    ctx = model.contexts(ids).reshape(n, t)
    f_all = tabs["freq"][ctx, flat].T.copy()  # [T, N] int64
    s_all = tabs["start"][ctx, flat].T.copy()
    rounds, rem = _lane_plan(n, lanes)
    x = np.zeros(lanes, dtype=np.int64)
    chunks = []
    for r in reversed(range(rounds)):
        active = lanes if r < rounds - 1 else rem
        tail = _tail_lanes(r, rounds, rem, lanes)
        base = r * lanes
        for p in reversed(range(t)):
            lo, hi = _renorm_span(p, t, kin, tail, active, block)
            if lo < hi:
                xs = x[lo:hi]
                f = f_all[p, base + lo:base + hi]
                if block == 2 and p % 2:
                    xmax = (f * f_all[p - 1, base + lo:base + hi]) << (63 - 2 * mb)
                else:
                    xmax = f << (63 - mb)
                emit = np.flatnonzero(xs >= xmax)
                if emit.size:
                    chunks.append((xs[emit] & 0xFFFFFFFF).astype("<u4"))
                    xs[emit] >>= 32
            xs = x[:active]
            q, rr = np.divmod(xs, f_all[p, base:base + active])
            xs[:] = (q << mb) + rr + s_all[p, base:base + active]
            if p == t - kin and tail < active:
                x[tail:active] += RANS_L
    words = b"".join(c.tobytes() for c in reversed(chunks))
    return _STREAM_HEADER.pack(STREAM_VERSION, lanes, kin) + _pack_states(x) + words


def decode_ids(data: bytes, model: ContextModel, n: int, grid: tuple[int, int]) -> np.ndarray:
    """Inverse of ``encode_ids``: [n, h, w] uint16. Malformed or corrupt ``data`` raises ValueError."""
    h, w = (int(grid[0]), int(grid[1]))
    n = int(n)
    if h <= 0 or w <= 0 or n < 0:
        raise ValueError(f"bad shape: n={n}, grid={grid}")
    t = h * w
    data = memoryview(data).cast("B")
    if len(data) < _STREAM_HEADER.size:
        raise ValueError("coded ids: truncated header")
    version, lanes, kin = _STREAM_HEADER.unpack_from(data)
    if version != STREAM_VERSION:
        raise ValueError(f"coded ids: unsupported version {version}")
    if n == 0:
        if lanes != 0 or len(data) != _STREAM_HEADER.size:
            raise ValueError("coded ids: expected an empty shard")
        return np.zeros((0, h, w), dtype=np.uint16)
    if not 1 <= lanes <= n:
        raise ValueError(f"coded ids: {lanes} lanes for {n} samples")
    mbi = model.scale_bits
    if kin != _init_ids(mbi, t):
        raise ValueError("coded ids: layout does not match this model and grid")
    x, off = _unpack_states(data, _STREAM_HEADER.size, lanes)
    if (x >= 1 << 62 << 1).any():
        raise ValueError("coded ids: corrupt lane state")
    if (len(data) - off) % 4:
        raise ValueError("coded ids: truncated word stream")
    words = np.frombuffer(data, "<u4", (len(data) - off) // 4, off).astype(np.int64)
    nwords = words.size
    tabs = model._get_tables()
    lut, fq, st, ctx_m = tabs["lut"], tabs["fq"], tabs["st"], tabs["ctx_m"]
    mb, sh, mask, ru = mbi, mbi - model._id_bits, (1 << mbi) - 1, RANS_L
    init_cap = (1 << mbi) ** kin
    block = _block(mbi)
    # per position: the context terms, (table, source row) or a constant for off-grid neighbours
    const, terms = [], []
    for row in _sources((h, w), model.features):
        const.append(sum(int(cm[model.codebook_size]) for src, cm in zip(row, ctx_m) if src is None))
        terms.append([(cm, src) for src, cm in zip(row, ctx_m) if src is not None])
    rounds, rem = _lane_plan(n, lanes)
    out = np.empty((rounds * lanes, t), dtype=np.uint16)
    tok = np.empty((t, lanes), dtype=np.int64)
    ptr = 0
    for r in range(rounds):
        active = lanes if r < rounds - 1 else rem
        tail = _tail_lanes(r, rounds, rem, lanes)
        spans = [_renorm_span(p, t, kin, tail, active, block) for p in range(t)]
        xa = x[:active]
        for p in range(t):
            if p == t - kin and tail < active:
                seg = x[tail:active]
                if (seg < ru).any() or (seg - ru >= init_cap).any():
                    raise ValueError("coded ids: corrupt lane state")
                seg -= ru
            tp = terms[p]
            if tp:
                cm, src = tp[0]
                c = cm[tok[src, :active]]
                for cm, src in tp[1:]:
                    c += cm[tok[src, :active]]
                if const[p]:
                    c += const[p]
            else:
                c = const[p]
            slot = xa & mask
            s = tok[p, :active]
            s[:] = lut[c | slot]
            fi = (c >> sh) | s
            xa >>= mb
            xa *= fq[fi]
            xa += slot
            xa -= st[fi]
            lo, hi = spans[p]
            if lo < hi:
                xs = x[lo:hi]
                need = np.flatnonzero(xs < ru)
                if need.size:
                    end = ptr + need.size
                    if end > nwords:
                        raise ValueError("coded ids: stream ends early (corrupt or truncated)")
                    xs[need] = (xs[need] << 32) | words[ptr:end]
                    ptr = end
        if tail < active and x[tail:active].any():
            raise ValueError("coded ids: corrupt lane state at the end of a lane")
        out[r * lanes:r * lanes + active] = tok[:, :active].T
    if ptr != nwords:
        raise ValueError(f"coded ids: {nwords - ptr} words left over (corrupt, or not this model)")
    return out[:n].reshape(n, h, w)


# -- measuring ---------------------------------------------------------------------------------

def order0_bits(ids: np.ndarray, codebook_size: int | None = None) -> float:
    """Order-0 entropy of ``ids`` in bits per token (the bound for coding each token on its own)."""
    ids = np.asarray(ids).ravel()
    if ids.size == 0:
        return 0.0
    c = np.bincount(ids.astype(np.int64), minlength=codebook_size or 0)
    p = c[c > 0] / ids.size
    return float(-(p * np.log2(p)).sum())


def coded_bits(ids: np.ndarray, model: ContextModel) -> float:
    """Ideal code length of ``ids`` under ``model``'s integer tables, in bits (no stream overhead)."""
    ids = _check_ids(ids, model.codebook_size)
    f = model.frequencies()
    ctx = model.contexts(ids).ravel()
    return float(model.scale_bits * ctx.size - np.log2(f[ctx, ids.ravel().astype(np.int64)]).sum())


# -- fitting -----------------------------------------------------------------------------------

def _cluster(nb: np.ndarray, x: np.ndarray, k: int, groups: int, none_used: bool, seed: int = 0,
             iters: int = 30) -> np.ndarray:
    """Group neighbour values 0..k (k = off the grid) by the distribution of the token they precede
    (k-means in KL divergence). Off-grid gets the last group of its own when it occurs."""
    cols = k
    if k > 1024:  # features: the 1023 most frequent ids + "other"
        top = np.argsort(-np.bincount(x, minlength=k), kind="stable")[:1023]
        remap = np.full(k, 1023, dtype=np.int64)
        remap[top] = np.arange(1023)
        x, cols = remap[x], 1024
    cnt = np.bincount(nb * cols + x, minlength=(k + 1) * cols).reshape(k + 1, cols).astype(np.float64)
    g_free = groups - 1 if none_used else groups
    rng = np.random.default_rng(seed)
    real = cnt[:k]
    g = rng.integers(0, max(1, g_free), k)
    prior = cnt.sum(0) + 1.0
    prior /= prior.sum()
    for _ in range(iters):
        gc = np.zeros((max(1, g_free), cols))
        np.add.at(gc, g, real)
        gp = gc + prior  # a pseudo-count of 1 spread like the marginal
        gp /= gp.sum(1, keepdims=True)
        g2 = (real @ -np.log(gp).T).argmin(1)
        if np.array_equal(g2, g):
            break
        g = g2
    g = np.append(g, g_free if none_used else 0)
    used = np.bincount(nb, minlength=k + 1) > 0  # renumber the groups that occur as 0..G'-1
    live = np.unique(g[used])
    new = np.zeros(groups + 1, dtype=np.int64)
    new[live] = np.arange(live.size)
    return new[g]


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(-1, keepdims=True)
    return z


def _fit_loglinear(n: np.ndarray, gshape: tuple[int, ...], iters: int, smooth: float):
    """Iterative proportional fitting of log p(x|g) = a[x] + sum_k B_k[g_k, x] (natural log) to
    the counts n [G_1, ..., G_n, K]; each margin is pulled to its (lightly smoothed) target."""
    k = n.shape[-1]
    nf = len(gshape)
    axes_all = tuple(range(nf))
    nc = n.sum(-1, keepdims=True)
    n0 = n.sum(axes_all)
    p0 = (n0 + 0.5) / (n0.sum() + 0.5 * k)
    a = np.log(p0)
    margins, bs = [], []
    for i, g in enumerate(gshape):
        other = tuple(j for j in axes_all if j != i)
        m = n.sum(other) if other else n
        ng = m.sum(-1, keepdims=True)
        margins.append((m + smooth * ng * p0 + 1e-3 * p0, other))
        bs.append(np.zeros((g, k)))

    def logits():
        z = np.broadcast_to(a, gshape + (k,)).copy()
        for i, b in enumerate(bs):
            shape = [1] * nf + [k]
            shape[i] = gshape[i]
            z += b.reshape(shape)
        return z

    for _ in range(iters):
        for i, (target, other) in enumerate(margins):
            e = _softmax_rows(logits()) * nc
            bs[i] += np.log(target / np.maximum(e.sum(other) if other else e, 1e-300))
    return a, bs


def _refit_bias(n: np.ndarray, bias_z: np.ndarray, fixed: np.ndarray, iters: int = 8) -> np.ndarray:
    """Refit a[x] (natural log) given the fixed (quantised) rest of the logits [C, K]."""
    nc = n.sum(-1, keepdims=True)
    n0 = n.sum(0)
    target = n0 + 1e-3 * (n0.sum() / n0.size)
    a = bias_z.copy()
    for _ in range(iters):
        e = (_softmax_rows(fixed + a) * nc).sum(0)
        a += np.log(target / e)
    return a


def _candidates(k: int, grid: tuple[int, int], tokens: int, max_table_bytes: int) -> list:
    h, w = grid
    pairs = [(0, 0), (16, 0), (16, 8), (32, 16), (64, 32)] if k <= 1024 else \
        [(0, 0), (8, 0), (8, 4), (16, 8), (32, 8)]
    m = 1 << _scale_bits(k)
    kp = 1 << math.ceil(math.log2(k))
    out = []
    for gl, gu in pairs:
        feats = []
        if gl and w > 1:
            feats.append(("left", gl))
        if gu and h > 1:
            feats.append(("up", gu))
        c = int(np.prod([g for _, g in feats])) if feats else 1
        if c * (2 * m + 4 * kp) > max_table_bytes or (feats and c * k > 4 * tokens):
            continue
        if feats not in out:
            out.append(feats)
    return out


def fit_context_model(ids: np.ndarray, codebook_size: int, *,
                      candidates: Sequence[Sequence[tuple[str, int]]] | None = None,
                      steps: Sequence[int] = (6, 8, 11), iters: int = 12, max_table_bytes: int = 24 << 20,
                      smooth: float = 0.02, seed: int = 0) -> ContextModel:
    """Fit a context model to a dataset's ids [N, h, w] (all of them, or a large sample).

    Each candidate is a list of (neighbour name, number of groups), e.g. ``[("left", 64), ("up", 32)]``
    (names in ``NEIGHBOURS``; ``[]`` is the order-0 model). By default a short ladder of left/up
    models whose decode tables fit ``max_table_bytes``; each is fitted (grouping, then iterative
    proportional fitting, then quantisation with each of ``steps`` 1/16-bit units) and the one
    with the fewest model bytes + coded bytes of ``ids`` wins. The ladder stops once a bigger
    model no longer pays. Deterministic for a given input and ``seed``.
    """
    ids = _check_ids(ids, codebook_size)
    k = int(codebook_size)
    n_s, h, w = ids.shape
    if candidates is None:
        candidates = _candidates(k, (h, w), ids.size, max_table_bytes)
        ladder = True
    else:
        ladder = False
    x = ids.ravel().astype(np.int64)
    neighbours: dict[str, np.ndarray] = {}
    groupings: dict[tuple[str, int], np.ndarray] = {}
    best, best_cost = None, math.inf
    for cand in candidates:
        feats = [(name, int(g)) for name, g in cand]
        for name, g in feats:
            if name not in NEIGHBOURS:
                raise ValueError(f"unknown neighbour {name!r}; choose from {sorted(NEIGHBOURS)}")
            if not 1 <= g <= 65535:
                raise ValueError(f"groups must be in [1, 65535], got {g}")
            if name not in neighbours:
                neighbours[name] = _neighbour_ids(ids, *NEIGHBOURS[name], k).ravel()
            if (name, g) not in groupings:
                nb = neighbours[name]
                groupings[name, g] = _cluster(nb, x, k, g, bool((nb == k).any()) and g > 1, seed=seed)
        gshape = tuple(int(groupings[f].max()) + 1 for f in feats)
        cidx = np.zeros_like(x)
        for name, g in feats:
            cidx = cidx * (int(groupings[name, g].max()) + 1) + groupings[name, g][neighbours[name]]
        nctx = int(np.prod(gshape)) if feats else 1
        n = np.bincount(cidx * k + x, minlength=nctx * k).reshape(gshape + (k,)).astype(np.float64)
        a, bs = _fit_loglinear(n, gshape, iters if feats else 0, smooth)
        # to 1/16-bit units; move column offsets into the bias and centre each group's row
        a = a * (UNIT / math.log(2))
        bs = [b * (UNIT / math.log(2)) for b in bs]
        for b in bs:
            col = np.median(b, axis=0)
            b -= col
            a = a + col
            b -= np.median(b, axis=1, keepdims=True)
        ncon = n.reshape(nctx, k)
        cand_best = None
        for step in (steps if feats else steps[:1]):
            qs = [np.clip(np.round(b / step), -127, 127).astype(np.int64) for b in bs]
            fixed = np.zeros((nctx, k))
            if feats:
                fixed = ContextModel(k, [NEIGHBOURS[nm] for nm, _ in feats], [groupings[f] for f in feats],
                                     gshape, np.zeros(k, np.int64), qs, [step] * len(feats)).log2_weights()
            ln = math.log(2) / UNIT
            a_nat = _refit_bias(ncon, a * ln, fixed * ln)
            bias = np.clip(np.round(a_nat / ln), -32768, 32767).astype(np.int64)
            model = ContextModel(k, [NEIGHBOURS[nm] for nm, _ in feats], [groupings[f] for f in feats], gshape,
                                 bias, qs, [step] * len(feats))
            f = model.frequencies()
            bits = float((ncon * (model.scale_bits - np.log2(f))).sum())
            cost = bits / 8 + len(model.to_bytes())
            model._tables = None  # do not keep the tables of models that may lose
            if cand_best is None or cost < cand_best[0]:
                cand_best = (cost, model)
        if cand_best[0] < best_cost:
            best_cost, best = cand_best
        elif ladder:
            break
    return best
