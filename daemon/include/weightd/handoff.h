// Handoff: the daemon's state as named file descriptors, so a restart re-adopts loaded models
// without reading a byte of their checkpoints. Two carriers use the same names:
//   - systemd's file-descriptor store (FDSTORE=1 + FDNAME=, handed back through LISTEN_FDS /
//     LISTEN_FDNAMES at the next start; docs/OPERATIONS.md);
//   - `weightd --takeover`, where a running daemon passes the fds to its successor over the
//     control socket (docs/PROTOCOL.md "takeover").
//
//   // Storing: one name per fd.
//   EncodeFdName(FdKind::kArena, "llama", /*rank=*/1, /*part=*/0)   // "wd1.arena.llama.1.0"
//   // Re-adopting: group what came back, then validate each model against the backend
//   // (Registry::Adopt).
//   SortedFds s = SortNamedFds(std::move(named_fds));
//   for (AdoptableModel& m : s.models) registry.Adopt(std::move(m), "fdstore");
//
// FDNAME syntax (systemd allows printable ASCII without ':' and at most 255 characters):
//   wd1.rec.<model>             the model record: a sealed memfd holding JSON (ModelRecord)
//   wd1.man.<model>.<rank>      the rank's manifest (sealed memfd, common manifest format)
//   wd1.arena.<model>.<rank>.<part>   arena `part` of the rank (host: sealed memfd)
//   control                     the listening socket (takeover only; systemd keeps its own)
// <model> escapes every byte outside [A-Za-z0-9-] as '_' + two lowercase hex digits, so it is
// reversible and free of '.' and ':'. When the escaped name would not fit in 255 characters it
// becomes '~' + 16 hex digits of a 64-bit FNV-1a hash; the record always holds the real name,
// and the token only groups fds.
//
// Thread-safety: pure functions; thread-safe.
#ifndef WEIGHTD_HANDOFF_H_
#define WEIGHTD_HANDOFF_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/manifest.h"
#include "weightd/protocol.h"
#include "weightd/unique_fd.h"

namespace weightd {

enum class FdKind : uint8_t { kRecord, kManifest, kArena, kListener };

inline constexpr char kListenerFdName[] = "control";
// Most bytes a model record may have (it is a few hundred bytes in practice).
inline constexpr uint64_t kMaxRecordBytes = 1 << 20;

struct FdName {
  FdKind kind = FdKind::kRecord;
  std::string model_token;  // escaped (or hashed) model name
  int rank = 0;             // manifest, arena
  int part = 0;             // arena
};

// The token standing for `model` in fd names.
std::string ModelToken(absl::string_view model);
// The name, at most 255 characters. kListener ignores the other arguments.
std::string EncodeFdName(FdKind kind, absl::string_view model, int rank = 0, int part = 0);
// INVALID_ARGUMENT naming the text when it is not a weightd fd name.
absl::StatusOr<FdName> ParseFdName(absl::string_view name);
// Decodes an escaped token back to the model name; NOT_FOUND for a hashed token.
absl::StatusOr<std::string> DecodeModelToken(absl::string_view token);

// Most arenas (segments, segment_plan.h) one rank may have in a record.
inline constexpr int kMaxArenasPerRank = 4096;

struct RankRecord {
  int rank = 0;
  int device = -1;              // ordinal in the daemon that wrote the record; -1 = host
  uint64_t arena_bytes = 0;     // bytes of the rank's arenas together
  uint64_t manifest_bytes = 0;  // exact size of the manifest memfd
  uint32_t tensors = 0;
  int parts = 1;  // arena fds of the rank (its segments, in manifest arena order)
  // "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" of the device holding a device arena: the
  // successor finds the device by it, as its CUDA_VISIBLE_DEVICES may order devices otherwise.
  // Empty for host arenas and in records of daemons that did not write it ("device" is used).
  std::string device_uuid;
  // What the arena fd is. Records without "arena_kind" take it from the model's "backend".
  ArenaKind arena_kind = ArenaKind::kHostMemfd;
};

// What the registry needs to list a model again without its checkpoint.
struct ModelRecord {
  std::string name;
  std::string backend;  // "host", "cuda": adoption into another backend is refused
  std::string state = "ready";
  LoadSpec spec;  // the load options (checkpoint path, tp, ranks, ...)
  std::vector<uint32_t> allow_uids, allow_gids;
  uint64_t bytes_total = 0;  // checkpoint bytes the original load read
  double load_seconds = 0;
  double loaded_unix = 0;
  // The generation the fds hold (the model's newest; docs/PROTOCOL.md "Generations").
  uint64_t generation = 1;
  std::vector<RankRecord> ranks;
};

// JSON, version 1. Fields added later ("device_uuid", "arena_kind" per rank, "generation") are
// optional when parsing, so records of older daemons still adopt, and older daemons ignore them.
std::string EncodeModelRecord(const ModelRecord& record);
// INVALID_ARGUMENT naming the field for anything malformed (it comes from outside the process).
absl::StatusOr<ModelRecord> ParseModelRecord(absl::string_view json);

struct NamedFd {
  std::string name;
  UniqueFd fd;
};

// A model's fds, grouped by name but not yet validated against the backend.
struct AdoptableRank {
  RankRecord record;
  UniqueFd manifest;
  std::vector<UniqueFd> arenas;  // record.parts entries
};
struct AdoptableModel {
  ModelRecord record;
  std::vector<AdoptableRank> ranks;
  std::vector<std::string> fd_names;  // every name the model's fds were stored under
};

struct SortedFds {
  UniqueFd listener;  // the fd named "control", if any
  std::vector<AdoptableModel> models;
  // Names of fds that belong to no complete model (closed); FDSTOREREMOVE them.
  std::vector<std::string> dropped_names;
  std::vector<std::string> errors;  // one line per dropped fd or model, for the log
};

// Groups fds by name and reads each model record. Incomplete sets, unknown names, duplicate
// names and unreadable records are dropped (their fds closed) with a line in `errors`.
SortedFds SortNamedFds(std::vector<NamedFd> fds);

// Reads a memfd that must carry all of F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL and
// at most `max_bytes` bytes. FAILED_PRECONDITION naming `what` for missing seals or a bad size.
absl::StatusOr<std::string> ReadSealedMemfd(int fd, uint64_t max_bytes, absl::string_view what);

// The successor's side of a takeover over a connected control socket (blocking): hello,
// `takeover`, then every fd with its name. The old daemon has stopped accepting when this
// returns; it exits once ConfirmTakeover() is sent, and serves again if the socket closes
// first. PERMISSION_DENIED for another uid, FAILED_PRECONDITION while loads run.
absl::StatusOr<std::vector<NamedFd>> RequestTakeover(int sock);
// Tells the old daemon that the successor serves now; waits for its acknowledgement.
absl::Status ConfirmTakeover(int sock);

}  // namespace weightd

#endif  // WEIGHTD_HANDOFF_H_
