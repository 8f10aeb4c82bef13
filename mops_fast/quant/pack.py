"""Bit packing of the standard GPTQ layout, for 2, 3, 4 and 8 bits, and both zero-point conventions.

Layout (DESIGN.md §3, §4):
  qweight int32 (K * bits / 32, N): codes packed along the input dim K;
  qzeros  int32 (G, N * bits / 32): zero points packed along the output dim N;
  scales  (G, N) float; g_idx int32 (K,);  W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].
Packing is a little-endian bit stream: value j of a block sits at bits bits*j .. bits*j+bits-1 of the
stream made of consecutive int32 words (low bits first). For 2/4/8 bits a word holds 32/bits whole values;
for 3 bits 32 values fill 3 words and values 10 and 21 straddle word boundaries (the standard 3-bit format).

Zero conventions: `gptq_v2` stores the true zero points. `gptq` (v1) stores the packed words minus one in
every field, as one integer subtraction per word (per 3-word block for 3 bits), which is how the tools that
define the format convert between the two. For zero points >= 1 this is simply zero - 1 in each field; a
zero point of 0 borrows from the next field, and the matching addition on reading restores it exactly.
"""
from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")

_MASK32 = 0xFFFFFFFF


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}: GPTQ packing supports {SUPPORTED_BITS}")


def block_shape(bits: int) -> tuple[int, int]:
    """(values, int32 words) of one packing block: (8, 1) for 4 bits, (32, 3) for 3 bits."""
    check_bits(bits)
    values = 32 // math.gcd(32, bits)
    return values, values * bits // 32


def packed_rows(rows: int, bits: int) -> int:
    """Number of int32 words that `rows` values pack into; raises if rows does not fill whole blocks."""
    values, words = block_shape(bits)
    if rows % values:
        raise ValueError(
            f"{rows} values cannot be packed at {bits} bits: the GPTQ format needs a multiple of {values} "
            f"(in_features for qweight, out_features for qzeros)"
        )
    return rows // values * words


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dim; the last one is short when group_size does not divide in_features."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise ValueError(f"group_size must be -1 (one group) or a positive integer, got {group_size}")
    return -(-in_features // group_size)


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with two's-complement wrap-around."""
    words64 = words64 & _MASK32
    return torch.where(words64 >= 2**31, words64 - 2**32, words64).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (R, C) in [0, 2**bits) along dim 0 into int32 (R * bits / 32, C)."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    R, C = codes.shape
    values, words = block_shape(bits)
    packed_rows(R, bits)  # validates divisibility
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    c = c.reshape(R // values, values, C)
    out = torch.zeros(R // values, words, C, dtype=torch.int64, device=codes.device)
    for j in range(values):
        w, s = divmod(bits * j, 32)
        out[:, w] |= (c[:, j] << s) & _MASK32
        if s + bits > 32:  # the value straddles into the next word (3 bits only)
            out[:, w + 1] |= c[:, j] >> (32 - s)
    return _to_int32(out.reshape(R // values * words, C))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 (W, C) -> int32 codes (W * 32 / bits, C)."""
    check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    Wr, C = packed.shape
    values, words = block_shape(bits)
    if Wr % words:
        raise ValueError(f"{Wr} packed rows are not whole {bits}-bit blocks of {words} words")
    p = (packed.to(torch.int64) & _MASK32).reshape(Wr // words, words, C)
    mask = (1 << bits) - 1
    out = []
    for j in range(values):
        w, s = divmod(bits * j, 32)
        v = p[:, w] >> s
        if s + bits > 32:
            v = v | (p[:, w + 1] << (32 - s))
        out.append(v & mask)
    return torch.stack(out, 1).reshape(Wr // words * values, C).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (R, C) along dim 1 -> int32 (R, C * bits / 32) (the qzeros layout)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits).t().contiguous()


def _ones_words(bits: int, device) -> torch.Tensor:
    """The packed words of a block whose every field holds 1 (int64, one entry per word of the block)."""
    values, words = block_shape(bits)
    total = sum(1 << (bits * j) for j in range(values))
    return torch.tensor([(total >> (32 * w)) & _MASK32 for w in range(words)], dtype=torch.int64, device=device)


def _add_ones_cols(qzeros: torch.Tensor, bits: int, sign: int) -> torch.Tensor:
    """Add (sign=+1) or subtract (sign=-1) one in every field of qzeros (packed along dim 1), as an integer
    operation over each block with carry/borrow between its words (mod 2**(32 * words))."""
    values, words = block_shape(bits)
    G, Wc = qzeros.shape
    if Wc % words:
        raise ValueError(f"qzeros has {Wc} columns, not whole {bits}-bit blocks of {words} words")
    q = (qzeros.to(torch.int64) & _MASK32).reshape(G, Wc // words, words)
    ones = _ones_words(bits, qzeros.device)
    out = torch.empty_like(q)
    carry = torch.zeros_like(q[..., 0])
    for w in range(words):
        t = q[..., w] + sign * ones[w] + carry
        carry = torch.div(t, 2**32, rounding_mode="floor")  # -1, 0 or +1
        out[..., w] = t - carry * 2**32
    return _to_int32(out.reshape(G, Wc))


def check_format(fmt: str) -> str:
    f = str(fmt).lower()
    if f not in FORMATS:
        raise ValueError(
            f"unknown GPTQ checkpoint_format {fmt!r}: mops_fast reads and writes {FORMATS} "
            "(`gptq` stores zero points minus one, `gptq_v2` stores them as they are)"
        )
    return f


def qzeros_to_format(qzeros_v2: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """In-memory (true zero points, gptq_v2) -> the on-disk words of `fmt`."""
    return _add_ones_cols(qzeros_v2, bits, -1) if check_format(fmt) == "gptq" else qzeros_v2.clone()


def qzeros_from_format(qzeros: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """On-disk words of `fmt` -> in-memory true zero points (gptq_v2)."""
    return _add_ones_cols(qzeros, bits, +1) if check_format(fmt) == "gptq" else qzeros.clone()


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
              scales_dtype: torch.dtype = torch.float16):
    """Codes (N, K), zero points (G, N), scales (G, N), g_idx (K,) -> (qweight, qzeros v2, scales, g_idx)."""
    N, K = codes.shape
    if zeros.shape != scales.shape or zeros.shape[1] != N:
        raise ValueError(f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be (G, {N})")
    if g_idx.shape != (K,):
        raise ValueError(f"g_idx must have shape ({K},), got {tuple(g_idx.shape)}")
    qweight = pack_rows(codes.t().contiguous(), bits)
    qzeros = pack_cols(zeros.to(torch.int64), bits)
    return qweight, qzeros, scales.to(scales_dtype).contiguous(), g_idx.to(torch.int32).contiguous()


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight W (N, K) of any supported bit width (true zero points in qzeros)."""
    codes = unpack_rows(qweight, bits)  # (K, N)
    zeros = unpack_cols(qzeros, bits)  # (G, N)
    g = g_idx.long()
    wt = (codes - zeros.index_select(0, g)).to(dtype) * scales.index_select(0, g).to(dtype)
    return wt.t()


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // gs).to(torch.int32)
