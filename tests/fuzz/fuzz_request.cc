// libFuzzer target for the daemon's request parser (ParseRequest) and the manifest decoder the
// client runs on whatever the daemon sends. Properties checked beyond "no crash, no UB":
// an accepted request re-encodes to a request that parses to the same op, name and id; an
// accepted manifest keeps every tensor inside its arena.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "weightd/manifest.h"
#include "weightd/protocol.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  auto r = weightd::ParseRequest(input);
  if (r.ok()) {
    // An accepted request is UTF-8 throughout (its JSON parser checks), so it always encodes.
    absl::StatusOr<std::string> wire = weightd::EncodeRequest(*r);
    if (!wire.ok()) std::abort();
    auto again = weightd::ParseRequest(*wire);
    if (!again.ok() || again->op != r->op || again->name != r->name ||
        again->id_json != r->id_json || again->rank != r->rank) {
      std::abort();
    }
  } else {
    // Error replies must always be producible (message bytes are arbitrary UTF-8 or not).
    (void)weightd::EncodeErrorReply("null", r.status());
  }
  auto m = weightd::DecodeManifest(input);
  if (m.ok()) {
    for (const weightd::ManifestTensor& t : m->tensors) {
      if (t.arena >= m->arenas.size() || t.offset + t.nbytes > m->arenas[t.arena].size ||
          t.offset + t.nbytes < t.offset) {
        std::abort();
      }
    }
  }
  return 0;
}
