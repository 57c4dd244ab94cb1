"""Stores that round as torch does: fp32 (or fp64) results written to a tensor of any floating dtype."""
import triton
import triton.language as tl

from ._conv_common import interpreting

# The interpreter converts fp32 -> bf16 by truncation (compiled Triton rounds to nearest even, as torch does); under
# it, _store rounds by hand.
_BF16_RNE = tl.constexpr(interpreting())


@triton.jit
def _store(ptrs, x, mask):
    # Store x (opmath) rounded to the pointers' element type, round-to-nearest-even.
    if _BF16_RNE and ptrs.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
        r = tl.where(x != x, 0x7FC0, r)
        tl.store(ptrs, r.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)
