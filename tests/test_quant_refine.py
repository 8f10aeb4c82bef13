"""Scale refinement by distillation (mops_fast/quant/refine.py): the held-out KL to the dense model falls, only
the scales move (fp16, finite), the model comes back with its QuantLinear layers, and bad input is refused
without touching the model."""
import copy

import pytest
import torch

from mops_fast.nn.quant_linear import QuantLinear
from mops_fast.quant.compress import QuantSettings, quantize_model, replace_with_quant_linear
from mops_fast.quant.refine import RefineSettings, refine_scales
from tests.conftest import smollm2_blocks, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def sharp(model):
    """A random tiny model predicts nearly uniform tokens (KL ~1e-5 after quantization); a larger output
    layer makes its distributions peaked like a trained model's."""
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def quantized_pair(teacher, group_size=16):
    student = copy.deepcopy(teacher)
    quants = quantize_model(student, None, "rtn", QuantSettings(bits=4, group_size=group_size, sym=False), log=None)
    return replace_with_quant_linear(student, quants)


def packed(model):
    return {n: (m.qweight.clone(), m.qzeros.clone(), m.g_idx.clone(), m.scales.clone())
            for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def kl(student, teacher, ids):
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1).flatten(0, 1)
        s = torch.log_softmax(student(input_ids=ids).logits.float(), -1).flatten(0, 1)
    return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean"))


def test_refinement_lowers_the_heldout_kl_and_moves_only_scales():
    teacher = sharp(tiny_model("llama", layers=2, hidden=48, heads=6, kv_heads=2, vocab=128))
    student = quantized_pair(teacher)
    before = packed(student)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(1, 128, (40, 24), generator=g)
    r = refine_scales(student, teacher, windows, RefineSettings(steps=40, lr=1e-2, batch_size=4), log=None)
    assert r["heldout_windows"] == 4 and r["windows"] == 36
    assert r["kl_heldout_after"] < 0.85 * r["kl_heldout_before"]
    after = packed(student)
    assert set(after) == set(before) and len(after) == 14  # the QuantLinear layers are back in place
    moved = 0
    for n, (qw, qz, gi, sc) in after.items():
        assert torch.equal(qw, before[n][0]) and torch.equal(qz, before[n][1]) and torch.equal(gi, before[n][2])
        assert sc.dtype == torch.float16 and torch.isfinite(sc).all()
        moved += int(not torch.equal(sc, before[n][3]))
    assert moved == 14
    # the reported figure is what the stored (fp16) scales compute through the QuantLinear path
    held = windows[:4]
    assert kl(student, teacher, held) == pytest.approx(r["kl_heldout_after"], rel=1e-3, abs=1e-6)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in student.parameters())  # the freeze is undone


def test_sparsity_survives_refinement():
    teacher = tiny_model("llama", layers=1, hidden=48, heads=6, kv_heads=2, vocab=128)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.Linear) and m is not teacher.lm_head:
                m.weight[:, ::2] = 0
    student = quantized_pair(teacher)
    zeros = {n: m.dequantize_weight() == 0 for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    refine_scales(student, teacher, torch.randint(1, 128, (10, 16)), RefineSettings(steps=5, lr=1e-2), log=None)
    for n, m in student.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantize_weight() == 0, zeros[n])


def test_a_failed_refinement_leaves_the_model_as_it_was():
    teacher = tiny_model("llama", layers=1, hidden=48, heads=6, kv_heads=2, vocab=128)
    student = quantized_pair(teacher)
    with torch.no_grad():
        teacher.model.embed_tokens.weight[5] = float("nan")  # every window holds token 5: the loss is NaN
    before = packed(student)
    windows = torch.full((6, 8), 5, dtype=torch.long)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        refine_scales(student, teacher, windows, RefineSettings(steps=3), log=None)
    after = packed(student)
    assert set(after) == set(before)
    for n in before:
        assert all(torch.equal(a, b) for a, b in zip(after[n], before[n]))


@pytest.mark.parametrize("kw,pattern", [
    ({"steps": -1}, "non-negative"), ({"lr": 0.0}, r"lr must be in \(0, 1\)"), ({"lr": float("nan")}, "lr must"),
    ({"batch_size": 0}, "batch_size"), ({"samples": 1}, "samples"),
])
def test_settings_out_of_range(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        RefineSettings(**kw).validate()


def test_bad_inputs_are_refused():
    teacher = tiny_model("llama", layers=1, hidden=48, heads=6, kv_heads=2, vocab=128)
    student = quantized_pair(teacher)
    ok = torch.randint(1, 128, (4, 8))
    s = RefineSettings(steps=1)
    with pytest.raises(ValueError, match="LongTensor"):
        refine_scales(student, teacher, ok.float(), s)
    with pytest.raises(ValueError, match="at least 2 windows"):
        refine_scales(student, teacher, ok[:1], s)
    with pytest.raises(ValueError, match="no QuantLinear"):
        refine_scales(copy.deepcopy(teacher), teacher, ok, s)
    other = tiny_model("llama", layers=1, hidden=48, heads=6, kv_heads=2, vocab=96)
    with pytest.raises(ValueError, match="vocab_size=96"):
        refine_scales(student, other, ok, s)


def test_real_smollm2_blocks(smollm2):
    """On the first two real SmolLM2 blocks (lm head kept), 4-bit g32 RTN: ten steps lower the held-out KL."""
    small, calib = smollm2_blocks(smollm2, n_blocks=2, n_samples=22)
    student = quantized_pair(small, group_size=32)
    r = refine_scales(student, small, calib[:, :64], RefineSettings(steps=10, lr=1e-3, batch_size=2), log=None)
    assert r["kl_heldout_after"] < 0.9 * r["kl_heldout_before"]


def test_a_zero_scale_stays_zero():
    """Checkpoints may hold groups with scale 0 (all-zero weights): their relative change is undefined, so
    they stay 0 instead of turning into NaN."""
    teacher = sharp(tiny_model("llama", layers=1, hidden=48, heads=6, kv_heads=2, vocab=128))
    student = quantized_pair(teacher)
    q = student.model.layers[0].mlp.up_proj
    with torch.no_grad():
        q.scales[0, :5] = 0
    refine_scales(student, teacher, torch.randint(1, 128, (10, 16)), RefineSettings(steps=3, lr=1e-2), log=None)
    assert (q.scales[0, :5] == 0).all() and torch.isfinite(q.scales).all() and (q.scales[0, 5:] != 0).all()


@pytest.mark.gpu
def test_refinement_on_cuda():
    """The same run on a CUDA device: windows and generator cross devices, the QuantLinear kernels compute
    what the refinement measured."""
    teacher = sharp(tiny_model("llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=128)).cuda()
    student = quantized_pair(teacher, group_size=32)
    windows = torch.randint(1, 128, (40, 32))
    r = refine_scales(student, teacher, windows, RefineSettings(steps=30, lr=1e-2), log=None)
    assert r["kl_heldout_after"] < 0.9 * r["kl_heldout_before"]
    assert all(m.scales.is_cuda for m in student.modules() if isinstance(m, QuantLinear))
    assert kl(student, teacher, windows[:4].cuda()) == pytest.approx(r["kl_heldout_after"], rel=2e-2)
