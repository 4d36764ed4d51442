// libFuzzer target: a whole safetensors file image through ParseSafetensorsBuffer.
//
// Beyond "no crash, no sanitizer report", it checks what callers rely on when the parser says
// yes: every tensor lies inside the data section, its byte length is dtype size × element count,
// the tensors tile the data section exactly in the order returned, and every name and metadata
// string is well-formed UTF-8. A failed parse must name the file. Violations trap, so libFuzzer
// records them like crashes.
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

// Well-formed UTF-8, written as a decoder (the parser validates by byte ranges instead): each
// sequence decodes to a scalar value that needs exactly that many bytes.
bool IsUtf8(absl::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t len = c < 0x80           ? 1
                       : (c >> 5) == 0x6  ? 2
                       : (c >> 4) == 0xE  ? 3
                       : (c >> 3) == 0x1E ? 4
                                          : 0;
    if (len == 0 || i + len > s.size()) return false;
    uint32_t cp = len == 1 ? c : c & (0x7F >> len);
    for (size_t k = 1; k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    const uint32_t min = len == 1 ? 0 : len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
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
  for (const auto& [key, value] : f->header.metadata) Check(IsUtf8(key) && IsUtf8(value));
  Check(f->data_offset >= 8 && f->data_offset <= size);
  const uint64_t data_size = size - f->data_offset;
  uint64_t cursor = 0;
  for (const weightd::TensorInfo& t : f->header.tensors) {
    Check(!t.name.empty());
    Check(IsUtf8(t.name));
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
