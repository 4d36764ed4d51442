// DType: the element types of the safetensors format, with their sizes and names.
//
//   absl::StatusOr<DType> t = ParseDType("BF16");   // DType::kBF16
//   DTypeSize(DType::kBF16) == 2;
//   DTypeName(DType::kBF16) == "BF16";               // the safetensors spelling
//
// Pure functions; thread-safe.
#ifndef WEIGHTD_DTYPE_H_
#define WEIGHTD_DTYPE_H_

#include <cstdint>
#include <optional>
#include "absl/strings/string_view.h"

namespace weightd {

enum class DType : uint8_t {
  kF64,
  kF32,
  kF16,
  kBF16,
  kI64,
  kI32,
  kI16,
  kI8,
  kU64,
  kU32,
  kU16,
  kU8,
  kBool,
  kF8E4M3,
  kF8E5M2,
};

inline constexpr int kNumDTypes = 15;

// Bytes per element.
int DTypeSize(DType t) noexcept;

// The safetensors spelling: "F64", "BF16", "F8_E4M3", "BOOL", ...
absl::string_view DTypeName(DType t) noexcept;

// Parses the safetensors spelling (exact, case-sensitive). nullopt for anything else.
std::optional<DType> ParseDType(absl::string_view name) noexcept;

// Parses a user-facing spelling: the safetensors one, or lower-case torch-style aliases
// ("bf16", "bfloat16", "fp16", "float16", "half", "fp32", "float32", "float", ...).
std::optional<DType> ParseDTypeAlias(absl::string_view name) noexcept;

// The torch spelling, as config.json's `torch_dtype` uses it: "bfloat16", "float16", ...
absl::string_view DTypeTorchName(DType t) noexcept;

}  // namespace weightd

#endif  // WEIGHTD_DTYPE_H_
