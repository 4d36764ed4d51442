// weightd C++ client: talk to the daemon, load models, attach to a rank's weights zero-copy.
//
//   WD_ASSIGN_OR_RETURN(weightd::Client c, weightd::Client::Connect());   // default socket
//   weightd::LoadOptions o;  o.tp = 2;
//   WD_RETURN_IF_ERROR(c.Load("llama", "/models/Llama-3-8B", o));
//   ... poll c.Status("llama") until state == "ready" ...
//   WD_ASSIGN_OR_RETURN(weightd::Attachment a, c.Attach("llama", /*rank=*/1));
//   const weightd::TensorView* w = a.Find("model.norm.weight");   // w->data: read-only memory
//   // a's destructor unmaps the memory and releases the lease.
//
// Protocol: docs/PROTOCOL.md. Every call is one request/reply over a SOCK_SEQPACKET socket;
// errors come back as absl::Status with the daemon's code (NOT_FOUND, PERMISSION_DENIED, ...)
// and message. Transport failures are UNAVAILABLE.
//
// Memory: host arenas are mapped PROT_READ from sealed memfds; the bytes cannot change while
// mapped, and stay valid until the Attachment is destroyed, even if the model is force-unloaded
// or the daemon exits. The manifest is validated completely before any pointer is formed.
// Device arenas (daemon `--backend cuda`) are imported through the CUDA driver, loaded at run
// time, and mapped read-only on the local GPU whose UUID the daemon names (so the daemon's and
// the worker's CUDA_VISIBLE_DEVICES may differ); TensorView::data is then a device pointer,
// usable in the device's primary context (what the CUDA runtime uses). Attach retains that
// context and releases it, with the mapping, when the Attachment goes.
//
// Thread-safety: a Client and its Attachments share one connection guarded by a mutex, so
// calls from several threads are serialized (safe, not parallel). An Attachment may outlive
// its Client; it keeps the connection open (that is what holds the lease).
//
// This header includes no JSON, CUDA or liburing headers.
#ifndef WEIGHTD_CLIENT_H_
#define WEIGHTD_CLIENT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/dtype.h"

namespace weightd {

struct LoadOptions {
  int tp = 1;                     // tensor-parallel degree
  std::vector<int> ranks;         // ranks to hold; empty = all of 0..tp-1
  std::vector<int> devices;       // device of each held rank; empty = rank r on device r
  std::string dtype;              // target float dtype ("bf16", "fp16", ...); empty = as stored
  std::vector<std::string> skip;  // extra substrings of tensor names to skip
  std::string recipe_file;        // JSON recipe extending/overriding the built-in one
  std::string recipe;             // force a recipe by name ("hf", "llama", ...)
  bool expert_parallel = false;
  std::optional<std::vector<uint32_t>> allow_uids;  // who may attach (default: daemon config)
  std::optional<std::vector<uint32_t>> allow_gids;
};

struct LeaseStatus {
  uint64_t lease = 0;
  int64_t pid = 0;
  uint32_t uid = 0;
};

struct RankStatusInfo {
  int rank = 0;
  int device = -1;    // -1 = host memory
  std::string state;  // "loading", "ready", "failed", "unloading"
  uint64_t arena_bytes = 0;
  uint32_t tensors = 0;
  uint64_t lease_count = 0;  // leases held on the rank
  // Some of them: a status reply lists at most 64 leases in all (the oldest first).
  std::vector<LeaseStatus> leases;
};

struct ModelInfo {
  std::string name;
  std::string state;  // summary over ranks: failed > unloading > loading > ready
  std::string checkpoint;
  std::string backend;
  std::string error;  // set when failed
  int tp = 1;
  uint64_t bytes_total = 0;  // checkpoint bytes the load reads
  uint64_t bytes_done = 0;
  double seconds = 0;  // load time so far, or total once finished
  std::vector<RankStatusInfo> ranks;
};

// One tensor of an attached rank. `data` points into read-only memory owned by the Attachment:
// valid until the Attachment is destroyed or detached (moving an Attachment keeps it valid).
struct TensorView {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;    // elements
  std::vector<int64_t> strides;  // elements
  const void* data = nullptr;    // host pointer (device = -1) or device pointer (device >= 0)
  int device = -1;               // local CUDA ordinal of this process, -1 for host memory
  uint64_t nbytes = 0;
  uint32_t crc32c = 0;  // the daemon's checksum of the bytes
};

class Attachment {
 public:
  Attachment(Attachment&&) noexcept;
  Attachment& operator=(Attachment&&) noexcept;
  Attachment(const Attachment&) = delete;
  Attachment& operator=(const Attachment&) = delete;
  ~Attachment();  // unmaps and detaches (best effort; closing the connection also releases)

  const std::string& model() const;
  int rank() const;
  uint64_t lease() const;
  const std::vector<TensorView>& tensors() const;
  // nullptr when absent. O(1).
  const TensorView* Find(absl::string_view name) const;
  uint64_t total_bytes() const;  // sum of the tensors' nbytes

  // Recomputes every tensor's CRC32C and compares with the manifest; device tensors are copied
  // to host memory first (cuMemcpyDtoH, 64 MiB at a time). DATA_LOSS naming the first
  // mismatching tensor; a failed read-back keeps the driver error's code.
  absl::Status Verify() const;

  // Copies bytes [offset, offset + n) of `tensor` (one of tensors()) into host memory `dst`:
  // a memcpy for host tensors, a synchronous cuMemcpyDtoH through the attachment's own mapping
  // for device tensors (so a process without CUDA code of its own can read device weights).
  // OUT_OF_RANGE when the range leaves the tensor; INVALID_ARGUMENT for a TensorView that is
  // not this attachment's; the driver error for a failed read-back.
  absl::Status Read(const TensorView& tensor, uint64_t offset, void* dst, uint64_t n) const;

  // Unmaps and releases the lease now; the error of the detach request, if any.
  absl::Status Detach();

 private:
  friend class Client;
  struct Impl;
  explicit Attachment(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class Client {
 public:
  Client(Client&&) noexcept;
  Client& operator=(Client&&) noexcept;
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client();

  // Connects and says hello (protocol version 1). `socket_path` empty = DefaultSocketPath()
  // ($WEIGHTD_SOCKET, $XDG_RUNTIME_DIR/weightd.sock, /run/weightd/weightd.sock).
  static absl::StatusOr<Client> Connect(const std::string& socket_path = "");

  // The protocol version agreed in hello.
  int version() const;

  absl::StatusOr<std::vector<ModelInfo>> List();
  // Starts a load; returns when the daemon accepted it (poll Status for progress).
  absl::Status Load(const std::string& name, const std::string& checkpoint,
                    const LoadOptions& options = {});
  // All visible models, or one (NOT_FOUND if absent).
  absl::StatusOr<std::vector<ModelInfo>> Status(const std::optional<std::string>& name = {});
  // Maps the rank's arenas (see Memory above). Besides the daemon's errors: UNAVAILABLE naming
  // the model, rank and reason when a device arena cannot be mapped here ("no CUDA driver (...)",
  // "no local GPU with UUID ..."); the lease is released again on any failure.
  absl::StatusOr<Attachment> Attach(const std::string& name, int rank);
  absl::Status Unload(const std::string& name, bool force = false);
  // Prometheus text.
  absl::StatusOr<std::string> Metrics();

 private:
  friend class Attachment;
  struct Impl;
  explicit Client(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// `{"models": [...]}` as `weightctl status --json` prints it and the C ABI returns it: per model
// name, state, checkpoint, backend, tp, bytes_total, bytes_done, seconds, error (when failed)
// and ranks (rank, device, state, arena_bytes, tensors, lease_count, leases [{lease, pid, uid}],
// the latter at most 64 in all).
// `indent` < 0 gives one line.
std::string ModelsToJson(const std::vector<ModelInfo>& models, int indent = -1);

}  // namespace weightd

#endif  // WEIGHTD_CLIENT_H_
