// libFuzzer target: what a hostile daemon can make a client decode. The input is a reply packet
// and, after a line "%%", the bytes of the manifest memfd an attach reply announces. Both go
// through the client's decoders (client/src/detail/reply.h) and DecodeManifest, as Client::Call
// and Client::Attach run them. Errors are fine; crashes, sanitizer reports and exceptions (an
// escaping nlohmann::json exception aborts the run) are not. Properties checked:
//   - a decoded result is a JSON object, and models decode into something ModelsToJson writes;
//   - an attach reply and manifest that pass CheckAttachManifest give one UUID per arena, a
//     32-hex-digit one for each device arena and "" for each host arena;
//   - the generation decoders (update, wait_generation, rollback, refresh) never throw, and a
//     refresh reply that is not `unchanged` goes through the attach checks like an attach reply;
//   - CheckSameLayout (a refresh's manifest against the mapped one) accepts a manifest against
//     itself and against a copy whose CRC32Cs differ, and refuses a copy with any tensor's
//     offset or any arena's size changed.
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

  (void)weightd::detail::DecodeUpdateResult(*result);
  (void)weightd::detail::DecodeGenerationWaitResult(*result);
  (void)weightd::detail::DecodeRollbackResult(*result);
  absl::StatusOr<weightd::detail::RefreshResult> refresh =
      weightd::detail::DecodeRefreshResult(*result);

  absl::StatusOr<weightd::detail::AttachResult> attach =
      weightd::detail::DecodeAttachResult(*result);
  // A refresh reply that is not `unchanged` is an attach reply: both decoders agree on it.
  if (refresh.ok() && !refresh->unchanged) {
    Check(attach.ok() && attach->lease == refresh->attach.lease &&
          attach->generation == refresh->attach.generation &&
          attach->manifest_bytes == refresh->attach.manifest_bytes);
  }
  if (!attach.ok()) return 0;
  absl::StatusOr<weightd::Manifest> m = weightd::DecodeManifest(manifest_bytes);
  if (!m.ok()) return 0;

  const int rank = static_cast<int>(m->rank);
  Check(weightd::detail::CheckSameLayout(*m, *m, m->model, rank).ok());
  weightd::Manifest next = *m;
  for (weightd::ManifestTensor& t : next.tensors) t.crc32c = ~t.crc32c;
  Check(weightd::detail::CheckSameLayout(*m, next, m->model, rank).ok());
  if (!next.tensors.empty()) {
    next.tensors.back().offset += 1;
    Check(!weightd::detail::CheckSameLayout(*m, next, m->model, rank).ok());
    next.tensors.back().offset -= 1;
  }
  if (!next.arenas.empty()) {
    next.arenas.front().size ^= 1;
    Check(!weightd::detail::CheckSameLayout(*m, next, m->model, rank).ok());
  }
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
