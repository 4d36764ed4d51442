// Decoding what weightd sends a client (docs/PROTOCOL.md, "Replies" and "attach"), kept apart
// from the socket code so that it can be tested and fuzzed on bytes alone.
//
//   WD_ASSIGN_OR_RETURN(nlohmann::json result, DecodeReplyPacket(packet.data, id));
//   WD_ASSIGN_OR_RETURN(std::vector<ModelInfo> models, DecodeModelsResult(result));
//
// A client must survive a hostile or broken daemon: every function here treats its input as
// untrusted. Malformed replies are INTERNAL errors saying what was wrong; nlohmann's exceptions
// (a field of the wrong type) are caught here and never reach the caller.
//
// Thread-safety: pure functions.
#ifndef WEIGHTD_CLIENT_DETAIL_REPLY_H_
#define WEIGHTD_CLIENT_DETAIL_REPLY_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/client.h"
#include "weightd/manifest.h"

namespace weightd::detail {

// One reply packet. "ok": true gives its `result` object ({} when absent); "ok": false gives the
// daemon's error with its code (INTERNAL for a code outside the protocol) and message. A reply
// whose unsigned `id` is not `id` is an error (a refusal at accept time carries id null).
absl::StatusOr<nlohmann::json> DecodeReplyPacket(absl::string_view packet, uint64_t id);

// hello: the protocol version the daemon speaks (any integer; the caller checks the range).
absl::StatusOr<int64_t> DecodeHelloResult(const nlohmann::json& result);
// list and status: the models.
absl::StatusOr<std::vector<ModelInfo>> DecodeModelsResult(const nlohmann::json& result);
// metrics: the Prometheus text.
absl::StatusOr<std::string> DecodeMetricsResult(const nlohmann::json& result);
// attach: how many continuation packets carrying more fds follow (0 to 1024).
absl::StatusOr<int64_t> DecodeFdMessages(const nlohmann::json& result);

struct AttachResult {
  uint64_t lease = 0;
  uint64_t manifest_bytes = 0;  // size of the sealed manifest memfd
  uint64_t generation = 1;      // the generation mapped (absent from older daemons: 1)
  bool has_arena_info = false;
  // arena_info[i].device_uuid, "" where absent; one entry per arena when has_arena_info.
  std::vector<std::string> device_uuids;
  // arena_ids (daemons with segments): one per arena, equal ids = the same memory; empty when
  // absent.
  std::vector<uint64_t> arena_ids;
};
absl::StatusOr<AttachResult> DecodeAttachResult(const nlohmann::json& result);

// refresh: `unchanged: true` with the lease's generation, or an attach reply (`unchanged` false
// or absent) whose fds follow.
struct RefreshResult {
  bool unchanged = false;
  uint64_t lease = 0;       // when unchanged
  uint64_t generation = 0;  // when unchanged
  AttachResult attach;      // when not unchanged
};
absl::StatusOr<RefreshResult> DecodeRefreshResult(const nlohmann::json& result);

// update: `generation` and `state` required; seconds, bytes_read, ranks_rewritten,
// targets_rewritten and targets_copied optional (present once an update sent with wait ends).
absl::StatusOr<UpdateResult> DecodeUpdateResult(const nlohmann::json& result);
// wait_generation: `generation` and `timed_out`, both required.
absl::StatusOr<GenerationWait> DecodeGenerationWaitResult(const nlohmann::json& result);
// rollback: `generation` and `restored`, both unsigned integers, required.
absl::StatusOr<RollbackResult> DecodeRollbackResult(const nlohmann::json& result);

// Checks a decoded manifest against the attach request and reply: it is for `model` rank `rank`,
// the reply carried one fd per arena besides the manifest's (`arena_fds`), arena_info (when
// present) has one entry per arena, and each device arena has a UUID of 32 hex digits. Returns
// the UUID of each arena ("" for host arenas). A device arena without a UUID is UNAVAILABLE (a
// daemon older than this client); an arena kind this client does not know is UNIMPLEMENTED.
absl::StatusOr<std::vector<std::string>> CheckAttachManifest(const Manifest& m,
                                                             const AttachResult& reply,
                                                             size_t arena_fds,
                                                             absl::string_view model, int rank);

// A refresh's manifest against the one the attachment maps (docs/PROTOCOL.md: an update never
// changes a generation's layout): same model and rank, same arenas (count, kind, size) and the
// same tensors in the same order (name, dtype, shape, strides, arena, offset, nbytes); only the
// CRC32Cs may differ. FAILED_PRECONDITION naming `model`, `rank` and the first difference (the
// arena or tensor, the field and both values).
absl::Status CheckSameLayout(const Manifest& current, const Manifest& next, absl::string_view model,
                             int rank);

}  // namespace weightd::detail

#endif  // WEIGHTD_CLIENT_DETAIL_REPLY_H_
