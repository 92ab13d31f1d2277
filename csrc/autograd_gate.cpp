// The Autograd kernel of the GEMM ops: a C++ gate in front of the Python gradient formula (qkernels/ops/autograd.py).
//
// The formula is registered from Python (torch.library.register_autograd), and a Python kernel at the Autograd key
// runs on every call of the op, grad or not: under torch.no_grad (model.generate) and inside compiled graphs, whose
// wrapper calls the op through the dispatcher. That Python round trip cost more than a small decode GEMM itself
// (measured 2026-12-03, one thread, [1, 128] x [8, 128] int4: no_grad 3x the inference_mode time of the op; a
// SmolLM2 decode step makes ~200 such calls). So the base op's Autograd kernel is this gate: when grad mode is off or
// no tensor argument requires grad, it goes straight to the backend kernel below autograd (what torch's own
// VariableType kernels do); otherwise it calls the op's `with_grad` overload (same schema), on which
// qkernels/ops/autograd.py registers the formula, and whose kernel calls the base op again (grad then disabled inside
// the autograd.Function's forward, so the gate passes straight through).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace qkernels {
namespace {

bool any_requires_grad(const torch::jit::Stack& stack, size_t num_args) {
  for (size_t i = stack.size() - num_args; i < stack.size(); ++i) {
    const c10::IValue& v = stack[i];
    if (v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad()) return true;
  }
  return false;
}

void gemm_autograd_gate(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  if (!at::GradMode::is_enabled() || !any_requires_grad(*stack, num_args)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
    return;
  }
  const auto with_grad = c10::Dispatcher::singleton().findOp({op.schema().name(), "with_grad"});
  TORCH_CHECK(with_grad.has_value(), op.schema().name(),
              ": an input requires grad, but the gradient formula is not registered; `import qkernels` registers it "
              "(qkernels/ops/autograd.py)");
  with_grad->callBoxed(stack);
}

}  // namespace

// The ops qkernels/ops/autograd.py GEMMS lists (tests/test_autograd_gate.py checks that the two lists agree).
TORCH_LIBRARY_IMPL(qkernels, Autograd, m) {
  for (const char* name : {"int4_weight_only_mm", "int8_weight_only_mm", "int8_dynamic_mm", "int8_dynamic_int4_mm",
                           "fp8_mm", "fp8_weight_only_mm", "fp4_mm", "fp4_weight_only_mm", "gguf_mm"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&gemm_autograd_gate>());
  }
}

}  // namespace qkernels
