// Argument checks of scale_shift_relu_out, shared by its CPU and CUDA kernels: out = relu(input * scale + shift)
// stored into a given 4-D tensor of any strides (a channel slice of a concatenated output, typically).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "fastcnn/batch_norm.h"

namespace fastcnn {

// The stored-into tensor must be input's shape, dtype and device, without internal overlap (two elements at one
// address) and without sharing memory with input (the kernels read input while they write out).
inline void check_store_into(const at::Tensor& input, const at::Tensor& out) {
  check_floating_4d(input, "input");
  TORCH_CHECK(out.sizes() == input.sizes() && out.scalar_type() == input.scalar_type() &&
                  out.device() == input.device(),
              "fastcnn: out must match input's shape, dtype and device (", input.sizes(), ", ", input.scalar_type(),
              ", ", input.device(), "), got ", out.sizes(), ", ", out.scalar_type(), ", ", out.device());
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, input);
}

// Whether the walk over out should run over channels innermost: out's channels are unit-stride (a channel slice of
// an NHWC tensor) and there is more than one of them; otherwise width is innermost (an NCHW tensor or slice of one).
inline bool channels_innermost(const at::Tensor& out) {
  return out.size(1) > 1 && out.stride(1) == 1;
}

}  // namespace fastcnn
