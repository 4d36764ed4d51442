// The weightd control protocol, version 1 (docs/PROTOCOL.md is the reference).
//
// One JSON object per SOCK_SEQPACKET packet. A request names its `op` and may carry an `id`
// (any JSON scalar) that the reply echoes. Replies are {"ok":true,"id":..,"result":{..}} or
// {"ok":false,"id":..,"error":{"code":"NOT_FOUND","message":".."}}.
//
//   WD_ASSIGN_OR_RETURN(Request r, ParseRequest(packet_bytes));   // strict: types, fields
//   WD_ASSIGN_OR_RETURN(std::string wire, EncodeRequest(r));     // what a client sends
//   std::string err = EncodeErrorReply(r.id_json, absl::NotFoundError("no model 'x'"));
//
// This header carries no JSON library: the daemon and the client share it. Pure functions,
// thread-safe.
#ifndef WEIGHTD_PROTOCOL_H_
#define WEIGHTD_PROTOCOL_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace weightd {

inline constexpr int kProtocolVersion = 1;
// Default cap on one request packet, in bytes (configurable in the daemon).
inline constexpr size_t kDefaultMaxRequestBytes = 64 * 1024;
// Most fds one SCM_RIGHTS message may carry (the kernel's SCM_MAX_FD).
inline constexpr int kMaxFdsPerMessage = 253;

// kTakeover and kTakeoverDone are the privileged hand-over of a running daemon to its successor
// (`weightd --takeover`, docs/PROTOCOL.md "takeover"); only the daemon's own uid may send them.
enum class Op : uint8_t {
  kHello,
  kList,
  kLoad,
  kStatus,
  kAttach,
  kDetach,
  kUnload,
  kMetrics,
  kTakeover,
  kTakeoverDone,
  // Live updates (docs/PROTOCOL.md "Generations").
  kUpdate,
  kWaitGeneration,
  kRollback,
  kRefresh,
};

// Longest server-side wait of one wait_generation request.
inline constexpr int64_t kMaxWaitGenerationMs = 10 * 60 * 1000;

absl::string_view OpName(Op op);

// What to load and how: the `load` request's fields and a preload entry of the config.
struct LoadSpec {
  std::string checkpoint;         // directory or .safetensors file
  int tp = 1;                     // tensor-parallel degree
  std::vector<int> ranks;         // ranks to hold; empty = all of 0..tp-1
  std::vector<int> devices;       // device per held rank; empty = rank i on device i
  std::string dtype;              // target float dtype ("bf16", ...); empty = checkpoint's
  std::vector<std::string> skip;  // extra skip substrings
  std::string recipe_file;        // JSON recipe extension/override
  std::string recipe;             // force a recipe by name
  bool expert_parallel = false;
  std::optional<std::vector<uint32_t>> allow_uids;  // who may attach; nullopt = daemon default
  std::optional<std::vector<uint32_t>> allow_gids;
};

struct Request {
  Op op = Op::kHello;
  std::string id_json = "null";  // the request's `id` as JSON text, echoed in the reply
  // hello
  int version = 0;
  std::string client;  // free-form client name, for logs
  // list, status (optional), load, attach, detach, unload
  std::optional<std::string> name;
  // attach, detach, refresh
  int rank = -1;
  // detach: the lease to release (from the attach reply). Without it, some lease of this
  // connection on (name, rank) is released, which after a forced unload and reload of the
  // model may be a newer attachment's. refresh: required, the lease to move to the newest
  // generation.
  std::optional<uint64_t> lease;
  // update: the checkpoint holding the new tensors; empty = the request carries one fd, a
  // sealed memfd laid out as a safetensors file.
  std::string checkpoint;
  // wait_generation: reply once the model's generation is above `after`, or after
  // `timeout_ms` with the generation as it is.
  uint64_t after = 0;
  int64_t timeout_ms = 0;
  // unload
  bool force = false;
  // load
  LoadSpec load;
  // load: reply only when the load ends. update: reply only when the new generation is
  // published (or the update failed); closing the connection before then cancels the update.
  bool wait = false;
};

// Parses one request packet. Errors are INVALID_ARGUMENT naming the field and what was
// expected ("field 'rank' must be an integer >= 0"), or UNIMPLEMENTED-free: an unknown op is
// INVALID_ARGUMENT listing the known ones.
absl::StatusOr<Request> ParseRequest(absl::string_view json);

// The JSON text of a request (what ParseRequest accepts). A string field that is not UTF-8 (a
// path in another encoding) is INVALID_ARGUMENT naming the field: JSON carries UTF-8 only.
absl::StatusOr<std::string> EncodeRequest(const Request& r);

// Parses a LoadSpec from a JSON object text (the `load` request body, or a config preload
// entry without its `name`). `context` prefixes error messages.
absl::StatusOr<LoadSpec> ParseLoadSpecJson(absl::string_view json_object,
                                           absl::string_view context);
std::string LoadSpecToJson(const LoadSpec& spec);

// The wire spelling of a status code: "NOT_FOUND", ...; codes outside the protocol's list map
// to "INTERNAL".
absl::string_view StatusCodeWireName(absl::StatusCode code);
// The inverse; unknown names give kUnknown.
absl::StatusCode StatusCodeFromWireName(absl::string_view name);

// {"ok":false,"id":<id_json>,"error":{"code":..,"message":..}}
std::string EncodeErrorReply(absl::string_view id_json, const absl::Status& status);

}  // namespace weightd

#endif  // WEIGHTD_PROTOCOL_H_
