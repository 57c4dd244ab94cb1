// Every fastcnn operator schema, in one place. Kernels register per device in cpu/ and cuda/; fake (meta)
// kernels and autograd are registered in Python (fastcnn/ops/). The Triton-backed ops are defined in Python with
// torch.library.triton_op, which infers their schema from the function signature.
#include <Python.h>
#include <torch/library.h>

// Importing fastcnn._C loads this library, which runs the registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastcnn, m) {
  // Epilogue on a precomputed convolution output: out = pool(relu(conv + bias)) plus the compact code the
  // backward needs (one uint8 per pooled element; empty for pool="none").
  m.def("bias_relu_pool(Tensor conv, Tensor? bias, str pool, int[2] pool_size, int[2] pool_stride)"
        " -> (Tensor out, Tensor code)");
  // Gradient w.r.t. the convolution output, rebuilt from the pooled gradient and the code; grad_bias is empty
  // unless bias_grad.
  m.def("bias_relu_pool_backward(Tensor grad_out, Tensor out, Tensor code, SymInt[2] conv_size, str pool,"
        " int[2] pool_size, int[2] pool_stride, bool bias_grad) -> (Tensor grad_conv, Tensor grad_bias)");
  // The fused block: pool(relu(conv2d(input, weight, bias))) with the convolution from ATen (cuDNN / oneDNN).
  m.def("conv2d_relu_pool(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding,"
        " int[2] dilation, int groups, str pool, int[2] pool_size, int[2] pool_stride)"
        " -> (Tensor out, Tensor code)");
  // Its backward; each gradient is computed only when output_mask asks for it, else returned empty.
  m.def("conv2d_relu_pool_backward(Tensor grad_out, Tensor out, Tensor code, Tensor input, Tensor weight,"
        " int[2] stride, int[2] padding, int[2] dilation, int groups, str pool, int[2] pool_size,"
        " int[2] pool_stride, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}
