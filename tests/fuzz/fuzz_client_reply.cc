// libFuzzer target: what a hostile daemon can make a client decode. The input is a reply packet
// and, after a line "%%", the bytes of the manifest memfd an attach reply announces. Both go
// through the client's decoders (client/src/detail/reply.h) and DecodeManifest, as Client::Call
// and Client::Attach run them. Errors are fine; crashes, sanitizer reports and exceptions (an
// escaping nlohmann::json exception aborts the run) are not. Properties checked:
//   - a decoded result is a JSON object, and models decode into something ModelsToJson writes;
//   - an attach reply and manifest that pass CheckAttachManifest give one UUID per arena, a
//     32-hex-digit one for each device arena and "" for each host arena.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "detail/reply.h"
#include "weightd/client.h"
#include "weightd/manifest.h"

namespace {

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t split = input.find("\n%%\n");
  const absl::string_view packet = input.substr(0, split);
  const absl::string_view manifest_bytes =
      split == absl::string_view::npos ? absl::string_view() : input.substr(split + 4);

  absl::StatusOr<nlohmann::json> result = weightd::detail::DecodeReplyPacket(packet, 7);
  if (!result.ok()) return 0;
  Check(result->is_object());
  (void)weightd::detail::DecodeHelloResult(*result);
  (void)weightd::detail::DecodeMetricsResult(*result);
  (void)weightd::detail::DecodeFdMessages(*result);
  absl::StatusOr<std::vector<weightd::ModelInfo>> models =
      weightd::detail::DecodeModelsResult(*result);
  if (models.ok()) (void)weightd::ModelsToJson(*models, 1);

  absl::StatusOr<weightd::detail::AttachResult> attach =
      weightd::detail::DecodeAttachResult(*result);
  if (!attach.ok()) return 0;
  absl::StatusOr<weightd::Manifest> m = weightd::DecodeManifest(manifest_bytes);
  if (!m.ok()) return 0;
  // The fd count as the daemon would send it, and one too few.
  for (size_t fds : {m->arenas.size(), m->arenas.size() == 0 ? 1 : m->arenas.size() - 1}) {
    absl::StatusOr<std::vector<std::string>> uuids =
        weightd::detail::CheckAttachManifest(*m, *attach, fds, m->model, static_cast<int>(m->rank));
    if (!uuids.ok()) continue;
    Check(fds == m->arenas.size() && uuids->size() == m->arenas.size());
    for (size_t i = 0; i < m->arenas.size(); ++i) {
      const bool device = m->arenas[i].kind == weightd::ArenaKind::kCudaVmm;
      Check(device ? (*uuids)[i].size() == 32 : (*uuids)[i].empty());
    }
  }
  return 0;
}
