// LibTorch adapter: an attached rank as torch::Tensors, zero-copy (built with
// -DWEIGHTD_BUILD_TORCH=ON; target weightd::torch_adapter).
//
//   WD_ASSIGN_OR_RETURN(weightd::Attachment a, client.Attach("llama", 0));
//   auto att = std::make_shared<weightd::Attachment>(std::move(a));
//   WD_ASSIGN_OR_RETURN(auto weights, weightd::ToTorch(att));
//   att.reset();                               // the tensors keep the attachment (lease) alive
//   torch::Tensor w = weights.at("model.norm.weight");
//
// Every tensor is a torch::from_blob view whose deleter holds a std::shared_ptr to the
// Attachment: the memory stays mapped and the lease held until the last tensor (or the caller's
// shared_ptr) is gone. Host arenas give CPU tensors; device arenas give CUDA tensors on their
// device (once the client maps device memory; until then such tensors are UNIMPLEMENTED).
//
// The memory is read-only (mapped PROT_READ): LibTorch has no read-only tensors, so an in-place
// write crashes with SIGSEGV. clone() what you need to modify.
//
// dtypes: BF16 -> kBFloat16, F8_E4M3 / F8_E5M2 -> kFloat8_e4m3fn / kFloat8_e5m2 where this
// LibTorch has them (else kByte), every other safetensors dtype to its torch equivalent.
//
// Errors: UNIMPLEMENTED for device memory this client did not map, INTERNAL with the message of
// a LibTorch exception (none propagates). Thread-safety: like Attachment (read-only use from any
// thread).
#ifndef WEIGHTD_TORCH_ADAPTER_H_
#define WEIGHTD_TORCH_ADAPTER_H_

#include <memory>
#include <string>
#include <unordered_map>

#include "absl/status/statusor.h"
#include "weightd/client.h"

namespace at {
class Tensor;
}  // namespace at

namespace weightd {

// name -> tensor for every tensor of `attachment`. `attachment` must not be null.
absl::StatusOr<std::unordered_map<std::string, at::Tensor>> ToTorch(
    std::shared_ptr<Attachment> attachment);

}  // namespace weightd

#endif  // WEIGHTD_TORCH_ADAPTER_H_
