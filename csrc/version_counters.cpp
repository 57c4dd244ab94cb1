// Version counters for fastcnn's mutating ops, as torch's own in-place ops keep them.
//
// Every tensor carries a version counter that an in-place op increments; autograd's "modified by an inplace
// operation" check and anything else keyed on versions (caches, torch.compile guards) rely on it. ATen's in-place
// ops (and torch._fused_adam_) increment it in their ADInplaceOrView kernel; a custom op's is a fallthrough, so
// without the kernel below an optimizer step of fastcnn._C would change parameters without their versions moving.
// One boxed kernel serves every mutating op: it reads which arguments the schema marks as written (Tensor(a!),
// Tensor(a!)[]), runs the op below this key and then increments each of those tensors' versions once per call.
#include <torch/library.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>

#include <vector>

namespace {

void run_then_increment_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  std::vector<at::Tensor> written;
  auto values = torch::jit::last(*stack, arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) {
      continue;
    }
    const auto& value = values[i];
    if (value.isTensor()) {
      written.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& tensor : value.toTensorList()) {
        written.push_back(tensor);
      }
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& tensor : written) {
    if (tensor.defined()) {
      torch::autograd::increment_version(tensor);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, ADInplaceOrView, m) {
  for (const char* name : {"scale_shift_relu_out", "adam_", "sgd_", "adagrad_", "lars_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_then_increment_versions>());
  }
}
