// Writes a fixed set of tensors with the client's safetensors memfd writer
// (client/src/detail/safetensors_memfd.h, what Client::UpdateTensors sends) and copies the
// sealed memfd's bytes to the file named by argv[1], for tests/python/test_client_generations.py to
// read with the `safetensors` package (an implementation independent of weightd).
//
// The tensors (the Python test expects exactly these):
//   "f32"    F32  [2, 3]  0.0, 0.5, 1.0, ..., 2.5
//   "bf16"   BF16 [4]     bit patterns 0x3f80, 0x4000, 0xc040, 0x0000 (1, 2, -3, 0)
//   "i64"    I64  [3]     -1, 2^40, 7
//   "flags"  BOOL [2]     true, false
//   "scalar" F32  []      42
//   "empty"  U8   [0, 5]
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "detail/safetensors_memfd.h"
#include "weightd/client.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_FILE\n", argv[0]);
    return 2;
  }
  float f32[6] = {0, 0.5f, 1, 1.5f, 2, 2.5f};
  uint16_t bf16[4] = {0x3f80, 0x4000, 0xc040, 0x0000};
  int64_t i64[3] = {-1, int64_t{1} << 40, 7};
  bool flags[2] = {true, false};
  float scalar = 42;
  const std::vector<weightd::UpdateTensor> tensors = {
      {"f32", weightd::DType::kF32, {2, 3}, f32, sizeof(f32)},
      {"bf16", weightd::DType::kBF16, {4}, bf16, sizeof(bf16)},
      {"i64", weightd::DType::kI64, {3}, i64, sizeof(i64)},
      {"flags", weightd::DType::kBool, {2}, flags, sizeof(flags)},
      {"scalar", weightd::DType::kF32, {}, &scalar, sizeof(scalar)},
      {"empty", weightd::DType::kU8, {0, 5}, nullptr, 0},
  };
  absl::StatusOr<weightd::UniqueFd> fd = weightd::detail::WriteSafetensorsMemfd(tensors);
  if (!fd.ok()) {
    std::fprintf(stderr, "%s\n", std::string(fd.status().message()).c_str());
    return 1;
  }
  struct stat st;
  if (::fstat(fd->get(), &st) != 0) return 1;
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  if (::pread(fd->get(), bytes.data(), bytes.size(), 0) != st.st_size) return 1;
  FILE* out = std::fopen(argv[1], "wb");
  if (out == nullptr || std::fwrite(bytes.data(), 1, bytes.size(), out) != bytes.size()) return 1;
  return std::fclose(out) == 0 ? 0 : 1;
}
