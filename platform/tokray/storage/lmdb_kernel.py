"""Batched lookups in an LMDB B-tree, compiled with numba (``lmdbstore.LMDBStore.get_many`` runs them
inside a py-lmdb read transaction and checks what they return).

Why not py-lmdb's ``getmulti``: it looks keys up one after another, and each lookup is a chain of
dependent cache misses down the tree and through a leaf page's binary search (~1.5-1.9 us a key over
1M records on the 2-core VM, ~0.45 us when the keys are adjacent). Here the keys of a batch descend
together, one binary-search step for every key before the next, so different keys' misses overlap.

What is read is LMDB's on-disk format, data version 1 (``mdb.c`` of LMDB 0.9, which py-lmdb
bundles): pages of ``psize`` bytes, each a 16-byte header (pgno u64, pad u16, flags u16, lower u16,
upper u16) and then u16 node offsets; a node is (lo u16, hi u16, flags u16, ksize u16, key, data). A
branch node's child page is lo | hi << 16 | flags << 32, and the first key of a branch page is never
compared; a leaf node's data size is lo | hi << 16, its data inline after the key or, with
F_BIGDATA, on overflow pages whose number follows the key. Every offset is checked against its page
and the file, so a page this reader does not expect gives CORRUPT, never a read outside the map.
"""

from __future__ import annotations

import numba
import numpy as np

OK, MISSING, CORRUPT = 0, 1, 2
P_BRANCH, P_LEAF, P_LEAF2 = 0x01, 0x02, 0x20
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
HEADER, NODE, KEY = 16, 8, 8  # page header, node header, key size (big-endian int64 sample ids)


@numba.njit(inline="always")
def _u16(m, o):
    return np.int64(m[o]) | (np.int64(m[o + 1]) << 8)


@numba.njit(inline="always")
def _key(m, o):
    """The 8 key bytes at ``o`` as an int64 that orders the way memcmp orders the bytes (top bit flipped)."""
    v = np.int64(m[o]) ^ 0x80
    for j in range(1, KEY):
        v = (v << 8) | np.int64(m[o + j])
    return v


@numba.njit(inline="always")
def _u64(m, o):
    v = np.int64(0)
    for j in range(7, -1, -1):
        v = (v << 8) | np.int64(m[o + j])
    return v


@numba.njit(cache=True, nogil=True, boundscheck=False)
def lookup(m, psize, root, depth, keys, off, size):
    """Find each of ``keys`` (ascending, as ``_key`` orders them) in the tree at page ``root`` of
    ``depth`` levels in the mapped file ``m`` (uint8); write its value's byte offset in ``m`` and its
    size to ``off`` and ``size``. Returns (status, index of the key that failed or -1)."""
    n = keys.shape[0]
    end = m.shape[0]
    page = np.full(n, root * psize, np.int64)  # byte offset of each key's page at the current level
    first = np.empty(n, np.int64)
    count = np.empty(n, np.int64)
    for level in range(depth):
        leaf = level == depth - 1
        start = 0 if leaf else 1
        steps = 0
        for i in range(n):
            p = page[i]
            if p < 0 or p + psize > end:
                return CORRUPT, i
            flags = _u16(m, p + 10)
            if (leaf and (flags & P_LEAF == 0 or flags & P_LEAF2 != 0)) or (not leaf and flags & P_BRANCH == 0):
                return CORRUPT, i
            nkeys = (_u16(m, p + 12) - HEADER) >> 1
            if nkeys <= start or HEADER + 2 * nkeys > psize:
                return CORRUPT, i
            first[i] = start
            count[i] = nkeys - start
            while (1 << steps) <= nkeys:
                steps += 1
        # upper bound, all keys a step at a time: first[i] ends at the first node whose key is > keys[i]
        for _ in range(steps):
            for i in range(n):
                c = count[i]
                if c > 0:
                    half = c >> 1
                    mid = first[i] + half
                    node = page[i] + _u16(m, page[i] + HEADER + 2 * mid)
                    if node + NODE + KEY > page[i] + psize or _u16(m, node + 6) != KEY:
                        return CORRUPT, i
                    le = np.int64(_key(m, node + NODE) <= keys[i])  # arithmetic, not a branch: a
                    first[i] += le * (half + 1)                       # mispredicted branch would stall
                    count[i] = half + le * (c - 2 * half - 1)         # the other keys' loads
        for i in range(n):
            p = page[i]
            j = first[i] - 1  # the last node whose key is <= keys[i]
            if j < 0:
                return MISSING, i
            node = p + _u16(m, p + HEADER + 2 * j)
            if node + NODE + (KEY if leaf else 0) > p + psize:
                return CORRUPT, i
            lo_hi = _u16(m, node) | (_u16(m, node + 2) << 16)
            nflags = _u16(m, node + 4)
            if not leaf:
                page[i] = (lo_hi | (nflags << 32)) * psize
                continue
            if _u16(m, node + 6) != KEY or nflags & (F_SUBDATA | F_DUPDATA) != 0:
                return CORRUPT, i
            if _key(m, node + NODE) != keys[i]:
                return MISSING, i
            d = node + NODE + KEY
            if nflags & F_BIGDATA != 0:
                if d + 8 > p + psize:
                    return CORRUPT, i
                first_page = _u64(m, d)
                if first_page < 0 or first_page >= end // psize:
                    return CORRUPT, i
                d = first_page * psize + HEADER
                if d + lo_hi > end:
                    return CORRUPT, i
            elif d + lo_hi > p + psize:
                return CORRUPT, i
            off[i] = d
            size[i] = lo_hi
    return OK, -1


@numba.njit(cache=True, nogil=True, boundscheck=False)
def gather_rows(m, off, rows, out):
    """``out[r]`` = the ``out.shape[1]`` bytes at ``off[rows[r]]`` of ``m``."""
    width = out.shape[1]
    for r in range(rows.shape[0]):
        o = off[rows[r]]
        for j in range(width):
            out[r, j] = m[o + j]
