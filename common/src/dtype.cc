#include "weightd/dtype.h"

#include <array>

namespace weightd {
namespace {

struct DTypeRow {
  DType type;
  int size;
  absl::string_view name;
  absl::string_view torch_name;
};

constexpr std::array<DTypeRow, kNumDTypes> kTable = {{
    {DType::kF64, 8, "F64", "float64"},
    {DType::kF32, 4, "F32", "float32"},
    {DType::kF16, 2, "F16", "float16"},
    {DType::kBF16, 2, "BF16", "bfloat16"},
    {DType::kI64, 8, "I64", "int64"},
    {DType::kI32, 4, "I32", "int32"},
    {DType::kI16, 2, "I16", "int16"},
    {DType::kI8, 1, "I8", "int8"},
    {DType::kU64, 8, "U64", "uint64"},
    {DType::kU32, 4, "U32", "uint32"},
    {DType::kU16, 2, "U16", "uint16"},
    {DType::kU8, 1, "U8", "uint8"},
    {DType::kBool, 1, "BOOL", "bool"},
    {DType::kF8E4M3, 1, "F8_E4M3", "float8_e4m3fn"},
    {DType::kF8E5M2, 1, "F8_E5M2", "float8_e5m2"},
}};

const DTypeRow& Row(DType t) { return kTable[static_cast<size_t>(t)]; }

}  // namespace

int DTypeSize(DType t) noexcept { return Row(t).size; }
absl::string_view DTypeName(DType t) noexcept { return Row(t).name; }
absl::string_view DTypeTorchName(DType t) noexcept { return Row(t).torch_name; }

std::optional<DType> ParseDType(absl::string_view name) noexcept {
  for (const DTypeRow& row : kTable) {
    if (row.name == name) return row.type;
  }
  return std::nullopt;
}

std::optional<DType> ParseDTypeAlias(absl::string_view name) noexcept {
  if (auto t = ParseDType(name)) return t;
  for (const DTypeRow& row : kTable) {
    if (row.torch_name == name) return row.type;
  }
  struct Alias {
    absl::string_view alias;
    DType type;
  };
  static constexpr Alias kAliases[] = {
      {"bf16", DType::kBF16}, {"fp16", DType::kF16}, {"f16", DType::kF16},
      {"half", DType::kF16},  {"fp32", DType::kF32}, {"f32", DType::kF32},
      {"float", DType::kF32}, {"fp64", DType::kF64}, {"double", DType::kF64},
  };
  for (const Alias& a : kAliases) {
    if (a.alias == name) return a.type;
  }
  return std::nullopt;
}

}  // namespace weightd
