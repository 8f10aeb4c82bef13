"""GPTQ bit packing: layouts, roundtrips for 2/3/4/8 bits, both zero-point conventions, g_idx permutations."""
from pathlib import Path

import pytest
import torch

from mops_fast.ops.int4_matmul import dequantize_int4
from mops_fast.quant.pack import (
    dequantize,
    pack_cols,
    pack_rows,
    qzeros_from_format,
    qzeros_to_format,
    unpack_cols,
    unpack_rows,
)
from mops_fast.quant.quantizer import QuantizedWeight

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "gptqmodel-smollm2-135m-4bit-g128-sym"


pytestmark = pytest.mark.usefixtures("one_thread")


def _u32(t):
    return t.to(torch.int64) & 0xFFFFFFFF


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rows_and_cols_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 40), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_rows(packed, bits), codes.to(torch.int32))
    z = torch.randint(0, 2**bits, (5, 96), generator=g)
    pz = pack_cols(z, bits)
    assert pz.shape == (5, 96 * bits // 32)
    assert torch.equal(unpack_cols(pz, bits), z.to(torch.int32))


def test_4bit_layout_is_low_bits_first_along_k():
    # k = 8 i + j sits at bits 4j..4j+3 of qweight[i, n]
    codes = torch.zeros(16, 8, dtype=torch.int64)
    codes[8 + 3, 5] = 0xA  # i = 1, j = 3
    codes[0, 0] = 0xF  # i = 0, j = 0
    codes[7, 1] = 0x9  # j = 7: the sign bit of the word
    q = _u32(pack_rows(codes, 4))
    assert q[1, 5] == 0xA << 12 and q[0, 0] == 0xF and q[0, 1] == 0x9 << 28
    assert int(q.count_nonzero()) == 3


def test_3bit_values_straddle_words_like_the_standard_format():
    # 32 values fill 3 words; value 10 has its low 2 bits at word 0 bits 30-31 and its high bit at word 1 bit 0;
    # value 21 has its low bit at word 1 bit 31 and its high 2 bits at word 2 bits 0-1
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10, 0] = 0b111
    q = _u32(pack_rows(codes, 3))[:, 0]
    assert q.tolist() == [0b11 << 30, 0b1, 0]
    codes.zero_()
    codes[21, 0] = 0b101
    q = _u32(pack_rows(codes, 3))[:, 0]
    assert q.tolist() == [0, 1 << 31, 0b10]
    codes.zero_()
    codes[11, 0] = 0b110  # word 1 bits 1..3
    codes[22, 0] = 0b011  # word 2 bits 2..4
    q = _u32(pack_rows(codes, 3))[:, 0]
    assert q.tolist() == [0, 0b110 << 1, 0b011 << 2]


def test_2bit_and_8bit_layouts():
    c2 = torch.zeros(16, 1, dtype=torch.int64)
    c2[15, 0] = 0b10
    assert _u32(pack_rows(c2, 2))[0, 0] == 0b10 << 30
    c8 = torch.zeros(4, 1, dtype=torch.int64)
    c8[2, 0] = 0xAB
    assert _u32(pack_rows(c8, 8))[0, 0] == 0xAB << 16


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_conventions_roundtrip_including_zero_point_zero(bits):
    g = torch.Generator().manual_seed(10 + bits)
    z = torch.randint(0, 2**bits, (7, 64), generator=g)
    z[0, :] = 0  # zero point 0 (asym grid with no negative weight) must survive the v1 "minus one"
    z[1, :] = 2**bits - 1
    v2 = pack_cols(z, bits)
    v1 = qzeros_to_format(v2, bits, "gptq")
    assert not torch.equal(v1, v2)
    assert torch.equal(qzeros_from_format(v1, bits, "gptq"), v2)
    assert torch.equal(qzeros_from_format(v2, bits, "gptq_v2"), v2)
    # with every zero point >= 1, v1 is simply zero - 1 in each field
    z1 = z.clamp(min=1)
    assert torch.equal(unpack_cols(qzeros_to_format(pack_cols(z1, bits), bits, "gptq"), bits), (z1 - 1).int())


def test_v1_4bit_matches_int32_addition():
    # the tools that define the format convert v1 -> v2 by adding 0x11111111 to each int32 word
    q = torch.randint(-2**31, 2**31 - 1, (6, 9), dtype=torch.int64).to(torch.int32)
    want = (q.to(torch.int64) + 0x11111111) & 0xFFFFFFFF
    assert torch.equal(_u32(qzeros_from_format(q, 4, "gptq")), want)


def test_pack_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_rows(torch.zeros(12, 4, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(48, 4, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack_rows(torch.full((8, 4), 16), 4)
    with pytest.raises(ValueError, match="unsupported bit width"):
        pack_rows(torch.zeros(8, 4, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="checkpoint_format"):
        qzeros_to_format(torch.zeros(2, 2, dtype=torch.int32), 4, "marlin")


@pytest.mark.parametrize("bits,K,group_size", [(4, 576, 128), (4, 200, 64), (3, 576, 128), (2, 208, 32),
                                               (8, 200, -1), (4, 256, 32)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_packed_weight_dequantizes_to_the_quantized_values(bits, K, group_size, sym, desc_act):
    g = torch.Generator().manual_seed(bits * 1000 + K)
    N = 64
    G = 1 if group_size == -1 else -(-K // group_size)
    gs = K if group_size == -1 else group_size
    g_idx = torch.arange(K) // gs
    if desc_act:  # act-order: groups are sets of inputs, g_idx a permutation of the grouped order
        g_idx = g_idx[torch.randperm(K, generator=g)]
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    zeros = torch.full((G, N), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (G, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.01 + 1e-4).half().float()
    qw = QuantizedWeight(codes, scales, zeros, g_idx.int(), bits, group_size, sym, desc_act)
    qweight, qzeros, sc, gi = qw.pack()
    assert qweight.shape == (K * bits // 32, N) and qzeros.shape == (G, N * bits // 32)
    assert sc.dtype == torch.float16 and gi.dtype == torch.int32
    want = qw.dequantize()
    assert torch.equal(dequantize(qweight, qzeros, sc, gi, bits), want)
    if bits == 4:
        assert torch.equal(dequantize_int4(qweight, qzeros, sc, gi), want)
    for fmt in ("gptq", "gptq_v2"):  # through the on-disk words of each convention
        back = qzeros_from_format(qzeros_to_format(qzeros, bits, fmt), bits, fmt)
        assert torch.equal(dequantize(qweight, back, sc, gi, bits), want)


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures is not present")
def test_fixture_v1_zero_points_decode_to_the_symmetric_midpoint():
    from safetensors import safe_open

    with safe_open(str(FIXTURE / "model.safetensors"), "pt") as f:
        qz = f.get_tensor("model.layers.0.mlp.down_proj.qzeros")
    assert torch.equal(unpack_cols(qzeros_from_format(qz, 4, "gptq"), 4).unique(), torch.tensor([8], dtype=torch.int32))
