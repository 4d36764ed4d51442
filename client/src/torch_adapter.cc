// The LibTorch adapter (weightd/torch_adapter.h). Only ATen is needed: torch::from_blob is
// at::from_blob, and including <ATen/ATen.h> instead of <torch/torch.h> keeps the build of this
// one file under a minute.
#include "weightd/torch_adapter.h"

#include <ATen/ATen.h>
#if __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include <exception>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "weightd/dtype.h"

namespace weightd {
namespace {

at::ScalarType ScalarType(DType t) {
  switch (t) {
    case DType::kF64:
      return at::kDouble;
    case DType::kF32:
      return at::kFloat;
    case DType::kF16:
      return at::kHalf;
    case DType::kBF16:
      return at::kBFloat16;
    case DType::kI64:
      return at::kLong;
    case DType::kI32:
      return at::kInt;
    case DType::kI16:
      return at::kShort;
    case DType::kI8:
      return at::kChar;
    case DType::kBool:
      return at::kBool;
    case DType::kU8:
      return at::kByte;
#if defined(TORCH_VERSION_MAJOR) && \
    (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1))
    case DType::kF8E4M3:
      return at::kFloat8_e4m3fn;
    case DType::kF8E5M2:
      return at::kFloat8_e5m2;
#else
    case DType::kF8E4M3:
    case DType::kF8E5M2:
      return at::kByte;
#endif
    // LibTorch before 2.3 has no unsigned 16/32/64-bit types: same-size signed views.
    case DType::kU16:
      return at::kShort;
    case DType::kU32:
      return at::kInt;
    case DType::kU64:
      return at::kLong;
  }
  return at::kByte;
}

}  // namespace

absl::StatusOr<std::unordered_map<std::string, at::Tensor>> ToTorch(
    std::shared_ptr<Attachment> attachment) {
  if (attachment == nullptr) return absl::InvalidArgumentError("ToTorch: attachment is null");
  std::unordered_map<std::string, at::Tensor> out;
  try {
    out.reserve(attachment->tensors().size());
    for (const TensorView& t : attachment->tensors()) {
      if (t.data == nullptr && t.nbytes > 0) {
        return absl::UnimplementedError(absl::StrCat(
            "tensor '", t.name, "' of model '", attachment->model(),
            "' is in device memory of device ", t.device, " that this client did not map"));
      }
      const at::Device device =
          t.device < 0 ? at::Device(at::kCPU) : at::Device(at::kCUDA, t.device);
      // The deleter owns a reference: the mapping (and the lease) outlive every tensor.
      at::Tensor tensor = at::from_blob(
          const_cast<void*>(t.data), t.shape, t.strides, [attachment](void*) {},
          at::TensorOptions().dtype(ScalarType(t.dtype)).device(device));
      out.emplace(t.name, std::move(tensor));
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("LibTorch: ", e.what()));
  }
  return out;
}

}  // namespace weightd
