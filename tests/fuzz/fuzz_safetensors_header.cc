// libFuzzer target: a whole safetensors file image through ParseSafetensorsBuffer.
//
// Beyond "no crash, no sanitizer report", it checks what callers rely on when the parser says
// yes: every tensor lies inside the data section, its byte length is dtype size × element count,
// and the tensors tile the data section exactly in the order returned. A failed parse must name
// the file. Violations trap, so libFuzzer records them like crashes.
#include <cstddef>
#include <cstdint>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "weightd/dtype.h"
#include "weightd/safetensors.h"

namespace {

constexpr absl::string_view kLabel = "fuzz.safetensors";

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<weightd::SafetensorsFile> f = weightd::ParseSafetensorsBuffer(bytes, kLabel);
  if (!f.ok()) {
    Check(absl::StartsWith(f.status().message(), kLabel));
    return 0;
  }
  Check(f->file_size == size);
  Check(f->data_offset >= 8 && f->data_offset <= size);
  const uint64_t data_size = size - f->data_offset;
  uint64_t cursor = 0;
  for (const weightd::TensorInfo& t : f->header.tensors) {
    Check(!t.name.empty());
    Check(t.begin == cursor);
    Check(t.begin <= t.end && t.end <= data_size);
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      Check(d >= 0);
      Check(!__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel));
    }
    uint64_t nbytes = 0;
    Check(!__builtin_mul_overflow(numel, weightd::DTypeSize(t.dtype), &nbytes));
    Check(nbytes == t.nbytes());
    Check(numel == t.numel());
    cursor = t.end;
  }
  Check(cursor == data_size);
  return 0;
}
