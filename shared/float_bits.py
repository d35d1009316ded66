"""Float bit patterns inside numba kernels: reinterpreting float32 as uint32 and back, and the bf16
and fp16 conversions built on that. Shared by the CPU pool's kernel (cpu_worker/expert_kernel.py),
which reads bf16 scales, and the GGUF block converter (shared/gguf_quant.py), which writes them."""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def u32_as_f32(typingctx, u):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def f32_as_u32(typingctx, f):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return sig, codegen


@njit(inline="always")
def bf16_to_f32(s):
    return u32_as_f32(np.uint32(s) << np.uint32(16))


@njit(inline="always")
def f32_to_bf16(f):
    """The bf16 bits of float32 `f`, rounded to nearest even as torch's .to(torch.bfloat16) rounds
    (finite inputs: the carry out of the mantissa moves into the exponent, subnormals included)."""
    u = f32_as_u32(f)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(inline="always")
def f16_to_f32(lo, hi):
    """The float32 value of the IEEE half whose little-endian bytes are lo, hi (as numpy's
    float16 -> float32 conversion: exact)."""
    h = np.uint32(lo) | (np.uint32(hi) << np.uint32(8))
    sign = (h >> np.uint32(15)) << np.uint32(31)
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    man = h & np.uint32(0x3FF)
    if exp == 0:  # zero or subnormal: man * 2^-24, exact in float32
        v = np.float32(man) * np.float32(2.0**-24)
        return -v if sign else v
    if exp == 31:
        return u32_as_f32(sign | np.uint32(0x7F800000) | (man << np.uint32(13)))
    return u32_as_f32(sign | ((exp + np.uint32(112)) << np.uint32(23)) | (man << np.uint32(13)))
