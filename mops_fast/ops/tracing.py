"""Whether an op call is traced: the custom ops (with their fake implementations) serve torch.compile and
fake / meta tensors; eager calls skip their dispatch, whose host time shows where kernels are short."""

import torch


def traced(t: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or t.is_meta or isinstance(t, torch._subclasses.FakeTensor)
