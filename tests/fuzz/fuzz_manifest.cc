// libFuzzer target: arbitrary bytes through DecodeManifest, the decoder a client runs on the
// sealed memfd a daemon sends at attach. Beyond "no crash, no sanitizer report": a manifest the
// decoder accepts re-encodes to bytes that decode to the same manifest, and encoding that again
// gives the same bytes (EncodeManifest is deterministic and DecodeManifest loses nothing).
// Every accepted tensor lies inside its arena. Violations trap, so libFuzzer records them.
#include <cstddef>
#include <cstdint>

#include "absl/strings/string_view.h"
#include "weightd/manifest.h"

namespace {

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

bool Same(const weightd::Manifest& a, const weightd::Manifest& b) {
  if (a.model != b.model || a.rank != b.rank || a.device != b.device ||
      a.arenas.size() != b.arenas.size() || a.tensors.size() != b.tensors.size()) {
    return false;
  }
  for (size_t i = 0; i < a.arenas.size(); ++i) {
    if (a.arenas[i].size != b.arenas[i].size || a.arenas[i].kind != b.arenas[i].kind) {
      return false;
    }
  }
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    const weightd::ManifestTensor& x = a.tensors[i];
    const weightd::ManifestTensor& y = b.tensors[i];
    if (x.name != y.name || x.dtype != y.dtype || x.shape != y.shape || x.strides != y.strides ||
        x.arena != y.arena || x.offset != y.offset || x.nbytes != y.nbytes ||
        x.crc32c != y.crc32c) {
      return false;
    }
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<weightd::Manifest> m = weightd::DecodeManifest(bytes);
  if (!m.ok()) return 0;
  for (const weightd::ManifestTensor& t : m->tensors) {
    Check(t.arena < m->arenas.size());
    Check(t.offset <= m->arenas[t.arena].size && t.nbytes <= m->arenas[t.arena].size - t.offset);
    Check(t.shape.size() == t.strides.size() && t.shape.size() <= weightd::kMaxDims);
  }
  const std::string encoded = weightd::EncodeManifest(*m);
  absl::StatusOr<weightd::Manifest> again = weightd::DecodeManifest(encoded);
  Check(again.ok());
  Check(Same(*m, *again));
  Check(weightd::EncodeManifest(*again) == encoded);
  return 0;
}
