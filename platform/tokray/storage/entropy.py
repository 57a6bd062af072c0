"""Context-coded token ids: a small neighbour-conditioned model fitted at write time and an
interleaved rANS coder (numpy encoder; the decode loop compiled with numba, ``rans_kernel``). It
codes a shard below the order-0 entropy of its ids (the bound for coding each token on its own,
where Parquet sits) and decodes the shipped CIFAR-10 8x8 shards at about 1.1 M samples (70 M
tokens) per second of one core (``jobs/bench_codec.py``). The token format's ``context`` codec
(``tokray.storage.formats.tokens``) stores shards with it.

Model (``ContextModel``). A token is predicted from already-decoded neighbours, by default the
left and the upper one. Each neighbour's id is mapped to one of a few groups (clustered at fit time
by the distribution of the token they precede; "off the grid" gets a group of its own), and

    log2 p(x | g_1, g_2, ...) = bias[x] + sum_k step_k * q_k[g_k, x]      (then normalised)

with integers in 1/16-bit units (``q_k`` int8, quantised to ``step_k`` units, small ones pruned to
zero). ``to_bytes`` stores those integers compactly (18.5 KB for the shipped CIFAR-10
model, 64x32 groups); they count against the saving, and ``fit_context_model`` picks the number of
groups by total size (model bytes + coded bytes of the ids it was fitted on), so a small dataset
gets a small model (down to order-0).

Tables. From the integers, encoder and decoder build identical coding tables with integer
arithmetic only (an exp2 table, no float exp/log that could round differently elsewhere): per
context, frequencies summing to ``2**scale_bits`` with every id >= 1 (ids never seen when fitting
still code), and a decode table per (context, slot). For codebooks up to 2**9 ids whose
frequencies all stay below half the total, one uint32 per slot holds id, frequency and offset (one
lookup per token; 16 KiB per context, 32 MiB for 2048 contexts); otherwise a uint16 id per slot
plus a (frequency, start) word per (context, id).

Coder. rANS, state in [2**31, 2**63) (int64), 32-bit words, one renormalisation per pair of
positions. A shard's samples are dealt to ``L`` lanes (sample s to lane s % L; by default
L = min(512, N // 4)), each
lane one rANS state; all lanes step together, one token position at a time (the encoder's numpy
calls each work on L values; the decoder's table lookups for the L lanes overlap), and the context
of position p only needs positions already decoded. The words
the lanes emit are interleaved in one stream in the order the decoder consumes them. A lane costs
about 8 bits: its final state is stored as 5 bits of length + its bits below the leading one, and
its initial state is not 2**31 but carries the last ids of the lane's last sample (coded from
state 0, without renormalisation).

Shard layout (little-endian): version u8, lanes u32, ids in each lane's initial state u8, model
fingerprint u32, CRC32 of the ids (uint16 LE) u32, the packed final states, the u32 word stream.
``decode_ids`` checks the layout, the model fingerprint, that every lane ends in a valid initial
state, that the stream is consumed exactly and the ids' CRC32; anything else raises ValueError.

API: ``fit_context_model``, ``ContextModel.to_bytes`` / ``ContextModel.from_bytes``,
``encode_ids``, ``decode_ids``; ``order0_bits`` and ``coded_bits`` to measure.
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
MAX_LANES = 512
MAX_TABLE_BYTES = 1 << 31  # a model whose tables would be larger is refused (malformed input)
MODEL_MAGIC = b"TKCM"
MODEL_VERSION = 1
STREAM_VERSION = 1
# a 1 MiB window holds any model's bias and group maps; preset 9's default 64 MiB costs ~30 ms of
# setup per call (the fit compresses every candidate) and gives the same bytes on inputs this small
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]

# neighbour name -> (dy, dx) offset from the token being coded; only already-decoded positions
NEIGHBOURS = {"left": (0, -1), "up": (-1, 0), "upleft": (-1, -1), "upright": (-1, 1)}

_STREAM_HEADER = struct.Struct("<BIBII")
_MODEL_HEADER = struct.Struct("<4sBIBB")
_FEATURE = struct.Struct("<bbHB")


def _scale_bits(codebook_size: int) -> int:
    """Frequencies sum to 2**scale_bits: about 8 slots per id on average, 12..16 bits."""
    return int(min(16, max(12, math.ceil(math.log2(codebook_size)) + 3)))


def _check_ids(ids: np.ndarray, codebook_size: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"ids must be [N, h, w], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    if not 2 <= codebook_size <= 65536:
        raise ValueError(f"codebook_size {codebook_size} must be in [2, 65536]")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= codebook_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the codebook (size {codebook_size})")
    return ids


def _neighbour_ids(ids: np.ndarray, dy: int, dx: int, none: int) -> np.ndarray:
    """[N, h, w] int64: the id at (i+dy, j+dx) of each position, ``none`` off the grid."""
    n, h, w = ids.shape
    out = np.full((n, h, w), none, dtype=np.int64)
    i0, i1 = max(0, -dy), min(h, h - dy)
    j0, j1 = max(0, -dx), min(w, w - dx)
    if i0 < i1 and j0 < j1:
        out[:, i0:i1, j0:j1] = ids[:, i0 + dy:i1 + dy, j0 + dx:j1 + dx]
    return out


def _layout(codebook_size: int, scale_bits: int) -> tuple[bool, int, int, int]:
    """(packable, id bits kb, frequency bits fb, largest packable frequency).

    Packed decode table: one uint32 per (context, slot), id | freq << kb | (slot - start) << (kb + fb),
    possible when kb + 2 (scale_bits - 1) <= 32 and no frequency reaches half the total (the model
    decides from its integer frequencies; both sides agree). Otherwise: a uint16 id per (context,
    slot) and a uint32 freq << 16 | start per (context, id)."""
    kb = max(1, math.ceil(math.log2(codebook_size)))
    fb = scale_bits - 1
    return kb + 2 * fb <= 32, kb, fb, (1 << fb) - 1


def _table_bytes(num_contexts: int, codebook_size: int, scale_bits: int, packed: bool | None = None) -> int:
    """Decode-table bytes; with packed=None the larger of the two layouts this model may use."""
    packable, kb, _, _ = _layout(codebook_size, scale_bits)
    sizes = {True: 4 << scale_bits, False: (2 << scale_bits) + (4 << kb)}
    per = sizes[packed] if packed is not None else max(sizes[False], sizes[True] if packable else 0)
    return num_contexts * per


def _fix_sums(f: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Adjust rows of integer frequencies to sum to ``total``, each in [1, cap]: +-1 on the
    largest adjustable ids (ties to the lower id); integer arithmetic, deterministic."""
    f = np.minimum(f, cap)
    k = f.shape[1]
    ar = np.arange(k)[None]
    for _ in range(10000):
        rows = np.flatnonzero(f.sum(axis=1) != total)
        if not rows.size:
            return f
        g = f[rows]
        diff = total - g.sum(axis=1)
        eligible = np.where((diff > 0)[:, None], g < cap, g > 1)
        order = np.argsort(np.where(eligible, -g, 1), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(ar, order.shape), axis=1)
        n_adj = np.minimum(np.abs(diff), eligible.sum(axis=1))
        f[rows] = g + np.sign(diff)[:, None] * (rank < n_adj[:, None])
    raise AssertionError("frequency normalisation did not converge")


def _quantise(z: np.ndarray, scale_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer log2-weights z [rows, S] (1/16-bit units) -> (freq, start) int64 [rows, S]: each row
    sums to 2**scale_bits, every entry >= 1. Integer arithmetic only (an exact exp2 table)."""
    m = 1 << scale_bits
    e = z.max(axis=1, keepdims=True) - z  # >= 0
    w = _EXP2[e & 15] >> np.minimum(e >> 4, 62)  # 2**(30 - e/16)
    tot = w.sum(axis=1, keepdims=True)
    small = w * m < tot  # entries below one slot get exactly one; the rest share what is left
    rest = m - small.sum(axis=1, keepdims=True)
    big = np.where(small, 0, w).sum(axis=1, keepdims=True)
    f = np.where(small, 1, np.maximum(1, (w * rest + big // 2) // big))
    f = _fix_sums(f, m, (1 << 16) - 1)  # < 2**16: >= 2 entries share 2**scale_bits <= 2**16
    return f, np.cumsum(f, axis=1) - f


# -- the weights' own code: per row a two-sided geometric law, rANS-coded -----------------------
_WQ_BITS = 12  # frequency precision of the weight tables
_WQ_LANES = 8
_WQ_VALUES = np.arange(-127, 128)


def _weight_law(params: np.ndarray) -> np.ndarray:
    """Per row (zp, ap, zn, an) int -> log2-weights [rows, 255] of the values -127..127: 0 at 0,
    -(4 zp + ap (v - 1)) above, -(4 zn + an (-v - 1)) below (1/16-bit units)."""
    zp, ap, zn, an = (params[:, i:i + 1].astype(np.int64) for i in range(4))
    v = _WQ_VALUES[None]
    return np.where(v > 0, -(4 * zp + ap * (v - 1)), np.where(v < 0, -(4 * zn + an * (-v - 1)), 0))


def _fit_weight_law(rows: np.ndarray) -> np.ndarray:
    """Maximum-likelihood two-sided geometric law per row of int weights [rows, K] -> int params."""
    out = np.zeros((len(rows), 4), dtype=np.int64)
    for i, r in enumerate(rows):
        n0 = max(int((r == 0).sum()), 1)
        for j, side in enumerate((r[r > 0], -r[r < 0])):
            if side.size == 0:
                out[i, 2 * j:2 * j + 2] = (127, 255)
                continue
            m1 = float(side.mean()) - 1  # geometric on v - 1 >= 0: p(v) = P(side) (1 - rho) rho^(v-1)
            rho = m1 / (1 + m1)
            p1 = side.size * (1 - rho)  # expected count of v = +-1
            z = math.log2(n0 / p1) if p1 > 0 else 31.0
            a = -math.log2(rho) if rho > 0 else 15.9
            out[i, 2 * j] = int(np.clip(round(4 * z), -128, 127))
            out[i, 2 * j + 1] = int(np.clip(round(UNIT * a), 1, 255))
    return out


def _weight_tables(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _quantise(_weight_law(params), _WQ_BITS)


def _encode_rows(sym: np.ndarray, f: np.ndarray, start: np.ndarray) -> bytes:
    """rANS-code sym [rows, T] (row r under table r) in a few lanes over the flattened rows."""
    rows, t = sym.shape
    n = rows * t
    flat_s, ctx = sym.ravel(), np.repeat(np.arange(rows), t)
    fs, ss = f[ctx, flat_s], start[ctx, flat_s]
    span = -(-n // _WQ_LANES)
    lanes = -(-n // span)
    last = n - (lanes - 1) * span
    x = np.full(lanes, RANS_L, dtype=np.int64)
    chunks = []
    for p in reversed(range(span)):
        active = lanes if p < last else lanes - 1
        pos = np.arange(active) * span + p
        fp = fs[pos]
        xs = x[:active]
        emit = np.flatnonzero(xs >= fp << (63 - _WQ_BITS))
        if emit.size:
            chunks.append((xs[emit] & 0xFFFFFFFF).astype("<u4"))
            xs[emit] >>= 32
        q, rr = np.divmod(xs, fp)
        xs[:] = (q << _WQ_BITS) + rr + ss[pos]
    words = b"".join(c.tobytes() for c in reversed(chunks))
    return _pack_states(x) + struct.pack("<I", len(words) // 4) + words


def _decode_rows(data: bytes, off: int, rows: int, t: int, f: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, int]:
    """Inverse of _encode_rows: (sym [rows, t], offset after the block)."""
    n = rows * t
    span = -(-n // _WQ_LANES)
    lanes = -(-n // span)
    last = n - (lanes - 1) * span
    mv = memoryview(data).cast("B")
    x, off = _unpack_states(mv, off, lanes)
    if len(mv) < off + 4:
        raise ValueError("context model: truncated weights")
    (nw,) = struct.unpack_from("<I", mv, off)
    off += 4
    if len(mv) < off + 4 * nw:
        raise ValueError("context model: truncated weights")
    words = np.frombuffer(mv, "<u4", nw, off).astype(np.int64)
    m = 1 << _WQ_BITS
    lut = np.repeat(np.tile(np.arange(f.shape[1]), rows), f.ravel())
    out = np.empty(n, dtype=np.int64)
    ptr = 0
    for p in range(span):
        active = lanes if p < last else lanes - 1
        pos = np.arange(active) * span + p
        ctx = pos // t
        xs = x[:active]
        slot = xs & (m - 1)
        sy = lut[ctx * m + slot]
        xs[:] = f[ctx, sy] * (xs >> _WQ_BITS) + slot - start[ctx, sy]
        out[pos] = sy
        need = np.flatnonzero(xs < RANS_L)
        if need.size:
            if ptr + need.size > nw:
                raise ValueError("context model: corrupt weights")
            xs[need] = (xs[need] << 32) | words[ptr:ptr + need.size]
            ptr += need.size
    if ptr != nw or (x != RANS_L).any():
        raise ValueError("context model: corrupt weights")
    return out.reshape(rows, t), off + 4 * nw


class ContextModel:
    """A neighbour-conditioned, log-linear model of token ids with integer parameters.

    Build one with ``fit_context_model`` or ``ContextModel.from_bytes``; treat it as immutable.
    Coding tables are built on first use and kept on the object (``table_bytes``; ``prepare()``
    builds the decode tables ahead of time).

    Attributes: ``codebook_size``; ``scale_bits``; ``features``, the (dy, dx) neighbour offsets;
    ``groups``, per feature the group [codebook_size + 1] of each neighbour id (the last entry:
    off the grid); ``num_groups``; ``bias`` int [K] and ``weights`` int8-range [G_k, K] per
    feature, in 1/16-bit units times ``steps``; ``num_contexts`` = prod(num_groups).
    """

    def __init__(self, codebook_size: int, features: Sequence[tuple[int, int]], groups: Sequence[np.ndarray],
                 num_groups: Sequence[int], bias: np.ndarray, weights: Sequence[np.ndarray], steps: Sequence[int],
                 scale_bits: int | None = None):
        k = self.codebook_size = int(codebook_size)
        if not 2 <= k <= 65536:
            raise ValueError(f"codebook_size {k} must be in [2, 65536]")
        self.scale_bits = _scale_bits(k) if scale_bits is None else int(scale_bits)
        if not math.ceil(math.log2(k)) <= self.scale_bits <= 16:
            raise ValueError(f"scale_bits {self.scale_bits} cannot code {k} ids")
        self.features = tuple((int(dy), int(dx)) for dy, dx in features)
        self.num_groups = tuple(int(g) for g in num_groups)
        self.steps = tuple(int(s) for s in steps)
        self.groups = tuple(np.asarray(g, dtype=np.int64) for g in groups)
        self.bias = np.asarray(bias, dtype=np.int64)
        self.weights = tuple(np.asarray(q, dtype=np.int64) for q in weights)
        nf = len(self.features)
        if not len(self.num_groups) == len(self.steps) == len(self.groups) == len(self.weights) == nf:
            raise ValueError("one group map, group count, step and weight table per feature")
        if self.bias.shape != (k,) or (k and (self.bias.min() < -32768 or self.bias.max() > 32767)):
            raise ValueError("context model bias must be [codebook_size] int16 values")
        for (dy, dx), g, gm, q, s in zip(self.features, self.num_groups, self.groups, self.weights, self.steps):
            if not (dy < 0 or (dy == 0 and dx < 0)) or not (-128 <= dy <= 127 and -128 <= dx <= 127):
                raise ValueError(f"neighbour offset {(dy, dx)} is not decoded before the token it predicts")
            if not (1 <= g <= 65535 and 1 <= s <= 255) or gm.shape != (k + 1,) or q.shape != (g, k):
                raise ValueError("malformed context model feature")
            if gm.min() < 0 or gm.max() >= g or q.min() < -128 or q.max() > 127:
                raise ValueError("context model feature out of range")
        self.num_contexts = math.prod(self.num_groups)
        if _table_bytes(self.num_contexts, k, self.scale_bits) > MAX_TABLE_BYTES:
            raise ValueError(f"context model with {self.num_contexts} contexts is too large to decode")
        self._coding = self._decoding = self._bytes = None
        self._packed = False

    # -- serialisation -------------------------------------------------------------------------
    def _payload(self) -> tuple[bytes, bytes]:
        head = _MODEL_HEADER.pack(MODEL_MAGIC, MODEL_VERSION, self.codebook_size, self.scale_bits, len(self.features))
        head += b"".join(_FEATURE.pack(dy, dx, g, s) for (dy, dx), g, s in
                         zip(self.features, self.num_groups, self.steps))
        parts = [self.bias.astype("<i2").tobytes()]
        for g, gm, q in zip(self.num_groups, self.groups, self.weights):
            parts.append(gm.astype("u1" if g <= 256 else "<u2").tobytes())
            parts.append(q.T.astype("i1").tobytes())  # id-major: an id's weights across groups sit together
        return head, b"".join(parts)

    def _approx_bytes(self) -> int:
        """About len(to_bytes()) (the per-row-law weights by their ideal size), for fitting."""
        head = _MODEL_HEADER.size + 4 + 4 + 1 + len(self.features) * _FEATURE.size
        parts = [self.bias.astype("<i2").tobytes()]
        parts += [gm.astype("u1" if g <= 256 else "<u2").tobytes() for g, gm in zip(self.num_groups, self.groups)]
        size = head + len(lzma.compress(b"".join(parts), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))
        if self.weights:
            rows = np.concatenate(self.weights)
            f, _ = _weight_tables(_fit_weight_law(rows))
            hist = np.stack([np.bincount(r + 127, minlength=255) for r in rows])
            law = 4 * len(rows) + float((hist * (_WQ_BITS - np.log2(f))).sum()) / 8 + 8 * _WQ_LANES + 4
            lz = len(lzma.compress(np.concatenate([q.T.ravel() for q in self.weights]).astype("i1").tobytes(),
                                   format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)) + 4
            size += int(min(law, lz))
        return size

    def to_bytes(self) -> bytes:
        """Compact form: header; CRC32 of the parameters; the bias and group maps LZMA-compressed;
        the weights rANS-coded, each group's row under its own two-sided geometric law (4 bytes),
        or LZMA-compressed when that is smaller (codebooks whose neighbouring ids behave alike)."""
        if self._bytes is None:
            head, payload = self._payload()
            crc = struct.pack("<I", zlib.crc32(head + payload))
            parts = [self.bias.astype("<i2").tobytes()]
            parts += [gm.astype("u1" if g <= 256 else "<u2").tobytes() for g, gm in zip(self.num_groups, self.groups)]
            small = lzma.compress(b"".join(parts), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            out = [head, crc, struct.pack("<I", len(small)), small]
            if self.weights:  # whichever is smaller: the per-row laws, or LZMA (smooth id orders)
                rows = np.concatenate(self.weights)
                params = _fit_weight_law(rows)
                law = params.astype("i1").tobytes() + _encode_rows(rows + 127, *_weight_tables(params))
                lz = lzma.compress(np.concatenate([q.T.ravel() for q in self.weights]).astype("i1").tobytes(),
                                   format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
                out += [b"\x01", law] if len(law) <= len(lz) + 4 else [b"\x02", struct.pack("<I", len(lz)), lz]
            self._bytes = b"".join(out)
        return self._bytes

    @property
    def fingerprint(self) -> int:
        """CRC32 of the model's parameters; each coded shard records the model it was coded with."""
        head = _MODEL_HEADER.size + len(self.features) * _FEATURE.size
        return struct.unpack_from("<I", self.to_bytes(), head)[0]

    @classmethod
    def from_bytes(cls, data: bytes) -> "ContextModel":
        """Inverse of ``to_bytes``; equal bytes give the same (cached) model, tables built once."""
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
        if not 2 <= k <= 65536 or any(g < 1 for _, _, g, _ in feats):
            raise ValueError("context model: malformed header")
        need = 2 * k + sum((k + 1) * (1 if g <= 256 else 2) for _, _, g, _ in feats)
        off += 4
        if len(data) < off + 4:
            raise ValueError("context model: truncated")
        (nsmall,) = struct.unpack_from("<I", data, off)
        off += 4
        try:
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            small = dec.decompress(data[off:off + nsmall], max_length=need + 1)
        except lzma.LZMAError as e:
            raise ValueError(f"context model: corrupt parameters ({e})") from None
        if len(small) != need:
            raise ValueError("context model: checksum mismatch (corrupt model bytes)")
        off += nsmall
        pos = 2 * k
        bias = np.frombuffer(small, "<i2", k, 0).astype(np.int64)
        groups = []
        for _, _, g, _ in feats:
            dt = "u1" if g <= 256 else "<u2"
            groups.append(np.frombuffer(small, dt, k + 1, pos).astype(np.int64))
            pos += (k + 1) * np.dtype(dt).itemsize
        weights = []
        rows = sum(g for _, _, g, _ in feats)
        if rows:
            if len(data) < off + 1 + 4 * rows or rows * k > 1 << 28:
                raise ValueError("context model: truncated weights")
            method = data[off]
            off += 1
            if method == 1:
                params = np.frombuffer(data, "i1", 4 * rows, off).reshape(rows, 4).astype(np.int64)
                off += 4 * rows
                sym, off = _decode_rows(data, off, rows, k, *_weight_tables(params))
                vals = sym - 127
            elif method == 2:
                (nlz,) = struct.unpack_from("<I", data, off)
                off += 4
                try:
                    raw = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS).decompress(
                        data[off:off + nlz], max_length=rows * k + 1)
                except lzma.LZMAError as e:
                    raise ValueError(f"context model: corrupt weights ({e})") from None
                if len(raw) != rows * k:
                    raise ValueError("context model: corrupt weights")
                off += nlz
                vals, at = np.frombuffer(raw, "i1").astype(np.int64), 0
                parts = []
                for _, _, g, _ in feats:
                    parts.append(vals[at:at + g * k].reshape(k, g).T)
                    at += g * k
                vals = np.concatenate(parts)
            else:
                raise ValueError("context model: unknown weight coding")
            at = 0
            for _, _, g, _ in feats:
                weights.append(vals[at:at + g])
                at += g
        if off != len(data):
            raise ValueError("context model: trailing bytes (corrupt model bytes)")
        model = cls(k, [(dy, dx) for dy, dx, _, _ in feats], groups, [g for _, _, g, _ in feats], bias, weights,
                    [s for _, _, _, s in feats], scale_bits=mbits)
        mhead, payload = model._payload()
        if mhead != head or zlib.crc32(head + payload) != crc:
            raise ValueError("context model: checksum mismatch (corrupt model bytes)")
        model._bytes = bytes(data)
        return model

    def __reduce__(self):  # pickles as its bytes (KBs), not its tables (MBs)
        return _model_from_bytes, (self.to_bytes(),)

    def __repr__(self) -> str:
        names = {v: n for n, v in NEIGHBOURS.items()}
        f = ", ".join(f"{names.get(o, o)}:{g}" for o, g in zip(self.features, self.num_groups))
        return (f"ContextModel(codebook_size={self.codebook_size}, contexts={self.num_contexts} [{f}], "
                f"scale_bits={self.scale_bits})")

    # -- tables --------------------------------------------------------------------------------
    @property
    def table_bytes(self) -> int:
        """Memory the decode tables take once built."""
        self._coding_tables()
        return _table_bytes(self.num_contexts, self.codebook_size, self.scale_bits, self._packed)

    def prepare(self) -> "ContextModel":
        """Build the decode tables now (they are otherwise built by the first ``decode_ids``)."""
        self._decode_tables()
        return self

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
        """Integer frequencies [contexts, K] (int64): each row sums to 2**scale_bits, every id >= 1."""
        return self._coding_tables()[0].astype(np.int64)

    def contexts(self, ids: np.ndarray) -> np.ndarray:
        """Context index [N, h, w] (int64) of every token of ``ids`` [N, h, w]."""
        ids = np.asarray(ids)
        c = np.zeros(ids.shape, dtype=np.int64)
        for (dy, dx), gm, g in zip(self.features, self.groups, self.num_groups):
            c = c * g + gm[_neighbour_ids(ids, dy, dx, self.codebook_size)]
        return c

    def _coding_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(freq, start) [contexts, K] uint16, from the integer parameters by integer arithmetic."""
        if self._coding is None:
            packable, _, _, cap = _layout(self.codebook_size, self.scale_bits)
            f, start = _quantise(self.log2_weights(), self.scale_bits)
            self._packed = packable and int(f.max()) <= cap
            self._coding = (f.astype(np.uint16), start.astype(np.uint16))
        return self._coding

    def _decode_tables(self) -> dict:
        if self._decoding is None:
            f, start = (a.astype(np.int64) for a in self._coding_tables())
            k, m, c = self.codebook_size, 1 << self.scale_bits, self.num_contexts
            _, kb, fb, _ = _layout(k, self.scale_bits)
            tabs = {}
            if self._packed:  # per (context, slot): id | freq << kb | (slot - start) << (kb + fb)
                dec = np.empty(c * m, dtype=np.uint32)
                step = max(1, (1 << 20) // m)
                ar_k, ar_m = np.arange(k, dtype=np.int64), np.arange(m, dtype=np.int64)
                for c0 in range(0, c, step):
                    c1 = min(c, c0 + step)
                    fc = f[c0:c1].ravel()
                    sym = np.repeat(np.tile(ar_k, c1 - c0), fc)
                    bias = np.tile(ar_m, c1 - c0) - np.repeat(start[c0:c1].ravel(), fc)
                    dec[c0 * m:c1 * m] = sym | (np.repeat(fc, fc) << kb) | (bias << (kb + fb))
                tabs["dec"] = dec
            else:  # an id per (context, slot); freq << 16 | start per (context, id)
                tabs["sym"] = np.repeat(np.tile(np.arange(k, dtype=np.uint16), c), f.ravel())
                fs = np.zeros((c, 1 << kb), dtype=np.uint32)
                fs[:, :k] = (f << 16) | start
                tabs["fs"] = fs.ravel()
            strides, acc = [], 1
            for g in reversed(self.num_groups):
                strides.append(acc)
                acc *= g
            # per feature: each neighbour id's context contribution, times the slots per context
            ctx_m = [(gm.astype(np.int64) * s) << self.scale_bits for gm, s in zip(self.groups, strides[::-1])]
            tabs["ctx_m"] = np.stack(ctx_m) if ctx_m else np.zeros((0, self.codebook_size + 1), np.int64)
            self._decoding = tabs
        return self._decoding


@functools.lru_cache(maxsize=8)
def _model_from_bytes(data: bytes) -> ContextModel:
    return ContextModel._parse(data)


# -- the coder ---------------------------------------------------------------------------------

def _init_ids(scale_bits: int, tokens_per_sample: int) -> int:
    """Ids of each lane's last sample coded into the lane's initial state (rANS from state 0, no
    renormalisation): as many as surely fit, 2**31 + M**k <= 2**63."""
    m, k = 1 << scale_bits, 1
    while k < tokens_per_sample and m ** (k + 1) <= (1 << 63) - RANS_L:
        k += 1
    return k


def _block(scale_bits: int) -> int:
    """Positions per renormalisation: 2 while a pair of frequencies fits the state's headroom."""
    return 2 if 2 * scale_bits <= 31 else 1


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
    return [[(i + dy) * w + j + dx if 0 <= i + dy < h and 0 <= j + dx < w else None for dy, dx in features]
            for i in range(h) for j in range(w)]


def default_lanes(n: int, tokens_per_sample: int) -> int:
    """Lanes for a shard of n samples: wide enough for numpy to pay off, few enough that final
    states (about 8 bits each) stay cheap; at least 4 samples per lane."""
    return max(1, min(n // 4, MAX_LANES))


def _pack_states(x: np.ndarray) -> bytes:
    """Final states in [2**31, 2**63): 5 bits of (bit length - 32) each, then each state's bits
    below its leading one: about 4.5 bits more than the information in a state, not 32."""
    bl = 31 + np.frexp((x >> 31).astype(np.float64))[1].astype(np.int64)  # exact: x >> 31 < 2**32
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
    allbits = np.unpackbits(np.frombuffer(data, np.uint8, nbytes, off))
    if allbits[total:].any():
        raise ValueError("coded ids: corrupt lane states (padding)")
    bits = allbits[5 * lanes:total]
    j = np.arange(63)[None]
    valid = j < ln[:, None]
    pos = np.minimum((np.cumsum(ln) - ln)[:, None] + j, bits.size - 1)
    b = (bits[pos] & valid).astype(np.int64)
    shift = np.where(valid, ln[:, None] - 1 - j, 0)
    x = (b << shift).sum(axis=1) | (np.int64(1) << ln)
    return x, off + nbytes


def _decode_plan(model: ContextModel, grid: tuple[int, int], n: int, lanes: int,
                 kin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the decode loop needs besides the tables: per position the neighbours' positions
    [t, features] (-1 off the grid) and the off-grid neighbours' context offset [t]; per round
    (active lanes, lanes going on, kind of round) [rounds, 3]; per kind of round (ordinary,
    second-to-last, last) the lanes renormalised after each position [3, t, 2]."""
    h, w = grid
    t = h * w
    none_offsets = model._decode_tables()["ctx_m"][:, model.codebook_size]
    rows = _sources(grid, model.features)
    src = np.array([[-1 if s is None else s for s in row] for row in rows], dtype=np.int64)
    src = src.reshape(t, len(model.features))
    const = np.where(src < 0, none_offsets[None], 0).sum(axis=1).astype(np.int64)
    rounds, rem = _lane_plan(n, lanes)
    kinds = [0] * max(0, rounds - 2) + [1, 2][-min(rounds, 2):]
    plan = np.array([(lanes if r < rounds - 1 else rem, _tail_lanes(r, rounds, rem, lanes), kinds[r])
                     for r in range(rounds)], dtype=np.int64)
    spans = np.zeros((3, t, 2), dtype=np.int64)
    block = _block(model.scale_bits)
    for kind in set(kinds):  # rounds of one kind renormalise alike: the first one's spans
        r = kinds.index(kind)
        spans[kind] = [_renorm_span(p, t, kin, plan[r, 1], plan[r, 0], block) for p in range(t)]
    return src, const, plan, spans


def encode_ids(ids: np.ndarray, model: ContextModel, lanes: int | None = None) -> bytes:
    """Code ``ids`` [N, h, w] (any integer dtype, each < model.codebook_size) losslessly; the
    bytes decode with ``decode_ids(data, model, N, (h, w))``. ``lanes``: see ``default_lanes``."""
    k = model.codebook_size
    ids = _check_ids(ids, k)
    n, h, w = ids.shape
    t = h * w
    if t == 0:
        raise ValueError("ids must have a non-empty grid")
    if n == 0:
        return _STREAM_HEADER.pack(STREAM_VERSION, 0, 0, model.fingerprint, 0)
    lanes = default_lanes(n, t) if lanes is None else int(lanes)
    if not 1 <= lanes <= n:
        raise ValueError(f"lanes must be in [1, {n}], got {lanes}")
    mb = model.scale_bits
    kin, block = _init_ids(mb, t), _block(mb)
    freq, start = model._coding_tables()
    flat = ids.reshape(n, t).astype(np.int64)
    ctx = model.contexts(ids).reshape(n, t)
    f_all = freq[ctx, flat].T.astype(np.int64)  # [T, N]
    s_all = start[ctx, flat].T.astype(np.int64)
    rounds, rem = _lane_plan(n, lanes)
    x = np.zeros(lanes, dtype=np.int64)
    chunks = []
    for r in reversed(range(rounds)):  # rANS codes backwards: last round, last position first
        active = lanes if r < rounds - 1 else rem
        tail = _tail_lanes(r, rounds, rem, lanes)
        base = r * lanes
        for p in reversed(range(t)):
            lo, hi = _renorm_span(p, t, kin, tail, active, block)
            if lo < hi:  # renormalise before the block (p-1, p) or (p): emit the low 32 bits
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
            if p == t - kin and tail < active:  # the ending lanes' initial ids are in: normalise
                x[tail:active] += RANS_L
    words = b"".join(c.tobytes() for c in reversed(chunks))
    crc = zlib.crc32(np.ascontiguousarray(ids, dtype="<u2").tobytes())
    return _STREAM_HEADER.pack(STREAM_VERSION, lanes, kin, model.fingerprint, crc) + _pack_states(x) + words


def decode_ids(data: bytes, model: ContextModel, n: int, grid: tuple[int, int]) -> np.ndarray:
    """Inverse of ``encode_ids``: the [n, h, w] uint16 ids. Data that is malformed, corrupt or
    coded with another model raises ValueError."""
    h, w = int(grid[0]), int(grid[1])
    n = int(n)
    if h <= 0 or w <= 0 or n < 0:
        raise ValueError(f"bad shape: n={n}, grid={grid}")
    t = h * w
    data = memoryview(data).cast("B")
    if len(data) < _STREAM_HEADER.size:
        raise ValueError("coded ids: truncated header")
    version, lanes, kin, fingerprint, crc = _STREAM_HEADER.unpack_from(data)
    if version != STREAM_VERSION:
        raise ValueError(f"coded ids: unsupported version {version}")
    if fingerprint != model.fingerprint:
        raise ValueError("coded ids: coded with a different context model")
    if n == 0:
        if lanes != 0 or len(data) != _STREAM_HEADER.size:
            raise ValueError("coded ids: expected an empty shard")
        return np.zeros((0, h, w), dtype=np.uint16)
    if not 1 <= lanes <= n:
        raise ValueError(f"coded ids: {lanes} lanes for {n} samples")
    mbi = model.scale_bits
    if kin != _init_ids(mbi, t):
        raise ValueError("coded ids: layout does not match this grid")
    x, off = _unpack_states(data, _STREAM_HEADER.size, lanes)
    if (x >= 1 << 62 << 1).any() or (x < RANS_L).any():
        raise ValueError("coded ids: corrupt lane state")
    if (len(data) - off) % 4:
        raise ValueError("coded ids: truncated word stream")
    words = np.frombuffer(data, "<u4", (len(data) - off) // 4, off)
    tabs = model._decode_tables()
    _, kb, fb, _ = _layout(model.codebook_size, mbi)
    none = np.zeros(1, np.uint32)
    plans = tabs.setdefault("plans", {})  # shards of one dataset share a shape: plan each shape once
    key = (h, w, n, lanes, kin)
    if key not in plans:
        if len(plans) >= 16:
            plans.clear()
        plans[key] = _decode_plan(model, (h, w), n, lanes, kin)
    src, const, plan, spans = plans[key]
    out = np.empty((len(plan) * lanes, t), dtype=np.uint16)
    from tokray.storage import rans_kernel as rk  # numba: imported (and compiled, cached) on first decode

    status, used = rk.decode_lanes(x, words, tabs.get("dec", none), tabs.get("sym", none.view(np.uint16)),
                                   tabs.get("fs", none), bool(model._packed), tabs["ctx_m"], src, const, plan,
                                   spans, out, lanes, kin, mbi, kb, fb, (1 << mbi) ** kin)
    if status == rk.STREAM_ENDS_EARLY:
        raise ValueError("coded ids: stream ends early (corrupt or truncated)")
    if status == rk.BAD_INITIAL_STATE:
        raise ValueError("coded ids: corrupt lane state")
    if status == rk.BAD_FINAL_STATE:
        raise ValueError("coded ids: corrupt lane state at the end of a lane")
    if used != words.size:
        raise ValueError(f"coded ids: {words.size - used} words left over (corrupt data)")
    out = out[:n]
    if zlib.crc32(out.astype("<u2", copy=False).tobytes()) != crc:
        raise ValueError("coded ids: decoded ids fail their checksum (corrupt data)")
    return out.reshape(n, h, w)


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
    """Ideal code length of ``ids`` [N, h, w] under ``model``'s integer tables, in bits; a shard
    adds about 8 bits per lane and 14 bytes of header."""
    ids = _check_ids(ids, model.codebook_size)
    f = model.frequencies()
    ctx = model.contexts(ids).ravel()
    return float(model.scale_bits * ctx.size - np.log2(f[ctx, ids.ravel().astype(np.int64)]).sum())


# -- fitting -----------------------------------------------------------------------------------

def _cluster(nb: np.ndarray, x: np.ndarray, k: int, groups: int, none_used: bool, seed: int = 0,
             iters: int = 40, restarts: int = 3) -> np.ndarray:
    """Group neighbour ids 0..k (k = off the grid) by the distribution of the token they precede:
    k-means in KL divergence, best of a few starts, empty groups refilled. Off the grid gets the
    last group when it occurs. Returns [k + 1] group indices, the groups used numbered 0..G'-1."""
    cols = k
    if k > 1024:  # features: the 1023 most frequent ids + "other"
        top = np.argsort(-np.bincount(x, minlength=k), kind="stable")[:1023]
        remap = np.full(k, 1023, dtype=np.int64)
        remap[top] = np.arange(1023)
        x, cols = remap[x], 1024
    flat = np.bincount(nb * cols + x, minlength=(k + 1) * cols)
    g_free = max(1, groups - 1 if none_used else groups)
    prior = flat.reshape(k + 1, cols).sum(0) + 1.0
    prior /= prior.sum()
    cells = np.flatnonzero(flat[:k * cols])  # (neighbour id, token) pairs that occur, off-grid excluded
    rv, rx, rc = cells // cols, cells % cols, flat[cells].astype(np.float64)
    occurs = np.bincount(rv, minlength=k) > 0
    dense = cells.size * g_free > k * cols  # sparse sums beat a matrix product on small data
    real = flat[:k * cols].reshape(k, cols).astype(np.float32) if dense else None
    best, best_obj = None, math.inf
    for r in range(restarts):
        g = np.random.default_rng([seed, r]).integers(0, g_free, k)
        for _ in range(iters):
            gp = np.bincount(g[rv] * cols + rx, weights=rc, minlength=g_free * cols).reshape(g_free, cols)
            gp = gp + prior  # a pseudo-count of 1 spread like the marginal
            gp /= gp.sum(1, keepdims=True)
            nlog = -np.log(gp)
            if dense:
                cost = (real @ nlog.T.astype(np.float32)).astype(np.float64)  # [k, groups]
            else:
                cost = np.stack([np.bincount(rv, weights=rc * nl[rx], minlength=k) for nl in nlog], 1)
            g2 = cost.argmin(1)
            sizes = np.bincount(g2[occurs], minlength=g_free)
            for e in np.flatnonzero(sizes == 0):  # refill an empty group with the worst-fitting id
                own = cost[np.arange(k), g2]
                own[~occurs | (sizes[g2] <= 1)] = -1
                v = int(own.argmax())
                if own[v] <= 0:
                    break
                sizes[g2[v]] -= 1
                g2[v], sizes[e] = e, 1
            if np.array_equal(g2, g):
                break
            g = g2
        obj = float(cost[np.arange(k), g].sum())
        if obj < best_obj:
            best, best_obj = g, obj
    g = np.append(best, g_free if none_used else 0)
    used = np.bincount(nb, minlength=k + 1) > 0
    live = np.unique(g[used])
    new = np.zeros(g_free + 1, dtype=np.int64)
    new[live] = np.arange(live.size)
    return new[g]


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(-1, keepdims=True)
    return z


def _fit_loglinear(n: np.ndarray, gshape: tuple[int, ...], iters: int, smooth: float):
    """Iterative proportional fitting of log p(x|g) = a[x] + sum_k B_k[g_k, x] (natural log) to
    the counts n [G_1, ..., G_n, K]: each feature's margin is pulled to its (smoothed) target."""
    k = n.shape[-1]
    nf = len(gshape)
    axes = tuple(range(nf))
    nc = n.sum(-1, keepdims=True)
    n0 = n.sum(axes)
    p0 = (n0 + 0.5) / (n0.sum() + 0.5 * k)
    a = np.log(p0)
    margins, bs = [], []
    for i, g in enumerate(gshape):
        other = tuple(j for j in axes if j != i)
        m = n.sum(other) if other else n
        margins.append((m + smooth * m.sum(-1, keepdims=True) * p0 + 1e-3 * p0, other))
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
    """The default ladder of (left groups, up groups), smallest first, that fits the table budget."""
    h, w = grid
    pairs = [(0, 0), (16, 0), (16, 8), (32, 16), (64, 32)] if k <= 1024 else \
        [(0, 0), (8, 0), (8, 4), (16, 8), (32, 8)]
    mb = _scale_bits(k)
    out = []
    for gl, gu in pairs:
        feats = ([("left", gl)] if gl and w > 1 else []) + ([("up", gu)] if gu and h > 1 else [])
        c = int(np.prod([g for _, g in feats])) if feats else 1
        if _table_bytes(c, k, mb) > max_table_bytes or (feats and c * k > 4 * tokens):
            continue
        if feats not in out:
            out.append(feats)
    return out


def fit_context_model(ids: np.ndarray, codebook_size: int, *,
                      candidates: Sequence[Sequence[tuple[str, int]]] | None = None,
                      steps: Sequence[int] = (6, 8, 11), iters: int = 12, max_table_bytes: int = 32 << 20,
                      smooth: float = 0.02, prune: float = 2.0, seed: int = 0) -> ContextModel:
    """Fit a context model to a dataset's ids [N, h, w] (uint16 or any integer dtype, each <
    ``codebook_size``): all of them, or a large sample.

    Each candidate is a list of (neighbour name, number of groups), e.g. ``[("left", 64), ("up", 32)]``
    (names in ``NEIGHBOURS``; ``[]`` is the order-0 model). By default: a ladder of left/up models
    whose decode tables fit ``max_table_bytes``, stopped once a bigger one no longer pays. Each is
    fitted (grouping, iterative proportional fitting with ``smooth``, quantisation to each of
    ``steps`` 1/16-bit units, weights saving under ``prune`` bits zeroed, bias refitted) and the one
    with the fewest model bytes + ideal coded bytes of ``ids`` wins. Deterministic for a given
    input and ``seed``. Seconds for the 2.6 M tokens of CIFAR-10 on one core; it holds a few int64
    arrays of the ids' size, so fit a large dataset on a sample (tens of millions of tokens).
    """
    ids = _check_ids(ids, codebook_size)
    k = int(codebook_size)
    _, h, w = ids.shape
    if ids.size == 0:
        raise ValueError("cannot fit a context model to no ids")
    ladder = candidates is None
    if ladder:
        candidates = _candidates(k, (h, w), ids.size, max_table_bytes)
    x = ids.ravel().astype(np.int64)
    neighbours: dict[str, np.ndarray] = {}
    groupings: dict[tuple[str, int], np.ndarray] = {}
    restarts = 3 if k <= 1024 else 1
    best, best_cost = None, math.inf
    ln = math.log(2) / UNIT  # nats per unit
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
                groupings[name, g] = _cluster(nb, x, k, g, bool((nb == k).any()) and g > 1, seed=seed,
                                              restarts=restarts)
        gmaps = [groupings[f] for f in feats]
        offsets = [NEIGHBOURS[name] for name, _ in feats]
        gshape = tuple(int(gm.max()) + 1 for gm in gmaps)
        cidx = np.zeros_like(x)
        for (name, _), gm, g in zip(feats, gmaps, gshape):
            cidx = cidx * g + gm[neighbours[name]]
        nctx = int(np.prod(gshape)) if feats else 1
        if _table_bytes(nctx, k, _scale_bits(k)) > max_table_bytes:
            raise ValueError(f"candidate {feats} needs more than max_table_bytes={max_table_bytes} of tables")
        n = np.bincount(cidx * k + x, minlength=nctx * k).reshape(gshape + (k,)).astype(np.float64)
        a, bs = _fit_loglinear(n, gshape, iters if feats else 0, smooth)
        # to 1/16-bit units; column offsets into the bias, each group's row centred on 0
        a = a / ln
        bs = [b / ln for b in bs]
        for b in bs:
            col = np.median(b, axis=0)
            b -= col
            a = a + col
            b -= np.median(b, axis=1, keepdims=True)
        ncon = n.reshape(nctx, k)
        margins = [n.sum(tuple(j for j in range(len(gshape)) if j != i)) for i in range(len(gshape))]
        cand_best = None
        for step in (steps if feats else steps[:1]):
            qs = [np.clip(np.round(b / step), -127, 127).astype(np.int64) for b in bs]
            for q, cnt in zip(qs, margins):  # zero weights whose saving, ~n (b - 1 + e^-b) nats, is small
                bn = q * (step * ln)
                q[cnt * (bn - 1 + np.exp(-bn)) / math.log(2) < prune] = 0
            fixed = ContextModel(k, offsets, gmaps, gshape, np.zeros(k, np.int64), qs,
                                 [step] * len(feats)).log2_weights()
            bias = np.clip(np.round(_refit_bias(ncon, a * ln, fixed * ln) / ln), -32768, 32767).astype(np.int64)
            model = ContextModel(k, offsets, gmaps, gshape, bias, qs, [step] * len(feats))
            bits = float((ncon * (model.scale_bits - np.log2(model.frequencies()))).sum())
            cost = bits / 8 + model._approx_bytes()
            if cand_best is None or cost < cand_best[0]:
                cand_best = (cost, model)
        m = cand_best[1]  # very predictable ids: finer frequencies (16 bits) if they save 1% or more
        if m.scale_bits < 16 and _table_bytes(nctx, k, 16, packed=False) <= max_table_bytes:
            fine = ContextModel(k, m.features, m.groups, m.num_groups, m.bias, m.weights, m.steps, scale_bits=16)
            cost = float((ncon * (16 - np.log2(fine.frequencies()))).sum()) / 8 + fine._approx_bytes()
            if cost < 0.99 * cand_best[0]:
                cand_best = (cost, fine)
        if cand_best[0] < best_cost:
            best_cost, best = cand_best
        elif ladder:
            break
    best._coding = None  # built again on use; the losers' tables are dropped with them
    return best
