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
  // Epilogue on a precomputed convolution output: out = pool(relu(conv * scale + bias)) plus the compact code the
  // backward needs (one uint8 per pooled element; empty for pool="none"). scale (None: 1) and bias (None: 0) are
  // per channel, in conv's dtype or its accumulation dtype (float32 for float16/bfloat16), applied in the latter
  // with one rounding: scale and bias = BatchNorm's affine map make it a fused BatchNorm-apply + ReLU + pool.
  m.def("bias_relu_pool(Tensor conv, Tensor? bias, str pool, int[2] pool_size, int[2] pool_stride,"
        " Tensor? scale=None) -> (Tensor out, Tensor code)");
  // Gradient w.r.t. conv * scale + bias (the convolution output's when there is no scale), rebuilt from the pooled
  // gradient and the code; grad_bias is empty unless bias_grad.
  m.def("bias_relu_pool_backward(Tensor grad_out, Tensor out, Tensor code, SymInt[2] conv_size, str pool,"
        " int[2] pool_size, int[2] pool_stride, bool bias_grad) -> (Tensor grad_conv, Tensor grad_bias)");
  // The same with a scale, in the same pass: grad_conv = scale * dz (dz: the gradient at conv * scale + bias),
  // grad_bias = sum dz (empty unless bias_grad), grad_scale = sum dz * conv in scale's dtype (empty without conv).
  m.def("bias_relu_pool_scaled_backward(Tensor grad_out, Tensor out, Tensor code, SymInt[2] conv_size, str pool,"
        " int[2] pool_size, int[2] pool_stride, bool bias_grad, Tensor? scale, Tensor? conv)"
        " -> (Tensor grad_conv, Tensor grad_bias, Tensor grad_scale)");
  // The fused block: pool(relu(conv2d(input, weight, bias))) with the convolution from ATen (cuDNN / oneDNN).
  m.def("conv2d_relu_pool(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding,"
        " int[2] dilation, int groups, str pool, int[2] pool_size, int[2] pool_stride)"
        " -> (Tensor out, Tensor code)");
  // Its backward; each gradient is computed only when output_mask asks for it, else returned empty.
  m.def("conv2d_relu_pool_backward(Tensor grad_out, Tensor out, Tensor code, Tensor input, Tensor weight,"
        " int[2] stride, int[2] padding, int[2] dilation, int groups, str pool, int[2] pool_size,"
        " int[2] pool_stride, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // conv2d(input, weight, None, stride=1, padding) on CPU (csrc/cpu/conv2d_winograd.cpp): Winograd F(2x2, 3x3)
  // where winograd_applies (float32 channels_last input, 3x3 weight, enough tiles and channels), ATen's convolution
  // elsewhere. The output is in input's memory format.
  m.def("conv2d_winograd(Tensor input, Tensor weight, int[2] padding) -> Tensor");
  // Its backward; each gradient is computed only when output_mask asks for it, else returned empty.
  m.def("conv2d_winograd_backward(Tensor grad_out, Tensor input, Tensor weight, int[2] padding, bool[2] output_mask)"
        " -> (Tensor grad_input, Tensor grad_weight)");

  // --- Transposed convolution (csrc/conv_transpose.cpp; math in fastcnn/reference/conv_transpose.py) ---
  // act(conv_transpose2d(input, weight, bias, ...)) with activation "none" or "relu", in input's memory format.
  m.def("conv_transpose2d_act(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding,"
        " int[2] output_padding, int groups, int[2] dilation, str activation) -> Tensor");
  // Its backward; the ReLU mask is read from the saved output. Gradients output_mask leaves out come back empty.
  m.def("conv_transpose2d_act_backward(Tensor grad_out, Tensor out, Tensor input, Tensor weight, int[2] stride,"
        " int[2] padding, int[2] output_padding, int groups, int[2] dilation, str activation, bool[3] output_mask)"
        " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // --- end of transposed convolution ---

  // --- BatchNorm of the fused residual blocks (csrc/cpu|cuda/batch_norm.*; math in fastcnn/reference/batch_norm.py)
  // Per-channel batch mean and biased variance, in float32 (float64 for float64 input), deterministic.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // out = relu(input * scale + shift + residual) (scale None: 1; residual None: 0) and, if save_mask, the uint8
  // ReLU mask (else an empty tensor).
  m.def("scale_shift_add_relu(Tensor input, Tensor? scale, Tensor shift, Tensor? residual, bool save_mask)"
        " -> (Tensor out, Tensor mask)");
  // Backward pieces, with dz = grad_out where gate (the saved mask or the recomputed ReLU output) is not <= 0, else 0:
  // per-channel sum dz and sum dz * (input - mean) (mean None: 0), deterministic;
  m.def("batch_norm_backward_reduce(Tensor grad_out, Tensor gate, Tensor input, Tensor? mean)"
        " -> (Tensor sum_dz, Tensor sum_dz_xmu)");
  // and grad_input = a * (dz - b * (input - mean) - d) per channel (None: 0), plus dz if want_dz (else empty).
  m.def("batch_norm_backward_elemt(Tensor grad_out, Tensor gate, Tensor input, Tensor? mean, Tensor a, Tensor? b,"
        " Tensor? d, bool want_dz) -> (Tensor grad_input, Tensor dz)");
  // Both in one call, BatchNorm's whole input gradient through the gate: with invstd = rsqrt(var + eps) and
  // M = N*H*W, a = weight * invstd, b = invstd^2 * sum dz (input - mean) / M, d = sum dz / M; grad_weight =
  // sum dz (input - mean) * invstd, grad_bias = sum dz; dz if want_dz (else empty).
  m.def("batch_norm_backward(Tensor grad_out, Tensor gate, Tensor input, Tensor weight, Tensor mean, Tensor var,"
        " float eps, bool want_dz) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor dz)");
  // The training forward's per-channel map: scale = weight * rsqrt(var + eps), shift = bias - mean * scale.
  m.def("batch_norm_scale_shift(Tensor weight, Tensor bias, Tensor mean, Tensor var, float eps)"
        " -> (Tensor scale, Tensor shift)");
  // The running statistics' update in place: running = running * (1 - factor) + batch * factor, the variance's
  // batch value unbiased (var * count / (count - 1)).
  m.def("batch_norm_update_running(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
        " float factor, int count) -> ()");
  // --- end of BatchNorm ---

  // --- Store into a channel slice (csrc/cpu|cuda/channel_slice.*; math in fastcnn/reference/channel_slice.py) ---
  // out = relu(input * scale + shift) (scale None: 1) written into out, a tensor of input's shape with any strides
  // (typically a channel slice of a concatenated output: an Inception branch's part of the block output).
  m.def("scale_shift_relu_out(Tensor input, Tensor? scale, Tensor shift, Tensor(a!) out) -> ()");

  // Fused optimizer steps over lists of tensors (the update rules are in fastcnn/reference/optim.py). Each
  // increments its steps (where it has them) and updates every tensor in place, unless found_inf is nonzero, in which
  // case nothing changes. grad_scale, when given, divides the gradients first (and the unscaled gradients are
  // written back). lr_tensor, when given, replaces lr (a 0-dim float32 tensor, for CUDA-graph capture).
  m.def("adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs,"
        " Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2,"
        " float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,"
        " Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def("sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, float lr, Tensor? lr_tensor,"
        " float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool is_first_step,"
        " Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def("adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, Tensor(d!)[] steps, float lr,"
        " Tensor? lr_tensor, float lr_decay, float weight_decay, float eps, bool maximize, Tensor? grad_scale,"
        " Tensor? found_inf) -> ()");
  m.def("lars_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, float lr, Tensor? lr_tensor,"
        " float momentum, float dampening, float weight_decay, float trust_coefficient, float eps, bool nesterov,"
        " bool maximize, bool trust_clip, bool update_norm, bool lr_in_momentum, bool is_first_step,"
        " Tensor? grad_scale, Tensor? found_inf) -> ()");
}
