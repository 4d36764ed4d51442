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
// Generations (docs/PROTOCOL.md "Generations"): Update/UpdateTensors publish new weights as the
// model's next generation; a worker waits for it (WaitGeneration) and moves its attachment onto
// it with Attachment::Refresh, which maps the new bytes at the same addresses, so pointers,
// DLPack capsules and framework tensors made from the attachment see the new weights:
//
//   // trainer: publish new values of some tensors (host memory, checkpoint names and dtypes)
//   WD_ASSIGN_OR_RETURN(weightd::UpdateResult u, trainer.UpdateTensors("llama", tensors));
//   // worker, between two steps (WaitGeneration on a Client of its own: it blocks the connection)
//   WD_ASSIGN_OR_RETURN(weightd::GenerationWait w,
//                       waiter.WaitGeneration("llama", a.generation(), absl::Minutes(5)));
//   if (!w.timed_out) WD_RETURN_IF_ERROR(a.Refresh().status());   // true: new bytes mapped
//
// This header includes no JSON, CUDA or liburing headers.
#ifndef WEIGHTD_CLIENT_H_
#define WEIGHTD_CLIENT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
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
  uint64_t generation = 0;  // the generation the lease maps; 0 from a daemon without generations
};

struct RankStatusInfo {
  int rank = 0;
  int device = -1;    // -1 = host memory
  std::string state;  // "loading", "ready", "failed", "unloading"
  uint64_t arena_bytes = 0;  // of all its arenas together
  uint32_t arenas = 0;       // the rank's arenas (segments); 0 from daemons before segments
  uint32_t tensors = 0;
  uint64_t lease_count = 0;  // leases held on the rank
  // Some of them: a status reply lists at most 64 leases in all (the oldest first).
  std::vector<LeaseStatus> leases;
};

// A model's running or last update, as `status` shows it (docs/PROTOCOL.md "Generations").
struct UpdateStatus {
  std::string state;         // "running", "failed" or "done"
  uint64_t generation = 0;   // the generation the update publishes (or would have)
  uint64_t bytes_total = 0;  // bytes of new tensors the update reads
  uint64_t bytes_done = 0;
  double seconds = 0;  // so far, or in total once finished
  std::string error;   // set when failed
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
  // The generation serving now (1 once loaded) and the kept previous one (0 when none). Both 0
  // from a daemon without generations.
  uint64_t generation = 0;
  uint64_t previous_generation = 0;
  std::optional<UpdateStatus> update;  // the running or last update, when the daemon shows one
  std::vector<RankStatusInfo> ranks;
};

// What an update request answered. Without `wait` only `generation` (the one the update will
// publish) and `state` ("updating") are set; with `wait` the rest describe the finished update.
struct UpdateResult {
  uint64_t generation = 0;
  std::string state;  // "updating" (accepted) or "ready" (published)
  double seconds = 0;
  uint64_t bytes_read = 0;         // bytes of new tensors read
  uint64_t ranks_rewritten = 0;    // ranks that got a new arena
  uint64_t targets_rewritten = 0;  // engine parameters written from the new tensors
  uint64_t targets_copied = 0;     // engine parameters copied from the previous generation
  // A rank's memory is several arenas (segments of whole layers, docs/PROTOCOL.md "Segments"):
  // the arenas the update replaced, the bytes it allocated for them, and the bytes of them it
  // copied from the previous generation. The other arenas are shared with it. 0 from daemons
  // before segments.
  uint64_t segments_rewritten = 0;
  uint64_t bytes_allocated = 0;
  uint64_t bytes_copied = 0;
};

// One tensor for Client::UpdateTensors, in host memory, under the checkpoint's (Hugging Face)
// name, with the checkpoint's dtype and shape. `data` is read during the call only.
struct UpdateTensor {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;  // elements; empty for a scalar
  const void* data = nullptr;  // dense, row-major: nbytes bytes
  uint64_t nbytes = 0;         // product(shape) * DTypeSize(dtype)
};

struct GenerationWait {
  uint64_t generation = 0;  // the model's generation when the daemon answered
  bool timed_out = false;   // true: the timeout passed with the generation still <= `after`
};

struct RollbackResult {
  uint64_t generation = 0;  // the new generation, which serves the previous weights
  uint64_t restored = 0;    // as the daemon reports it: the generation whose weights came back
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
  // The model generation the attachment maps (1 from a daemon without generations).
  uint64_t generation() const;

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

  // Moves the attachment to the model's newest generation (the `refresh` request). Returns
  // false when it maps the newest already (nothing changes), true when it now maps the new one.
  //
  // The new arenas replace the old ones at the same addresses: tensors(), every TensorView and
  // its `data` pointer stay the same objects, and whatever points into the memory (raw
  // pointers, DLPack capsules, torch tensors) reads the new bytes from now on; TensorView::crc32c
  // and generation() are updated. Host arenas are replaced with one mmap(MAP_FIXED) each, so a
  // reader sees either the old or the new bytes of an arena, never a gap (but a reader spanning
  // two arenas may see one old and one new). Device arenas are unmapped and the new memory
  // mapped at the same address (cuMemUnmap, cuMemMap): the range is briefly unmapped, so a
  // refresh must not race with kernels or copies reading the weights -- call it between steps,
  // after synchronizing the streams that read them.
  //
  // The new generation must have the same layout (an update never changes it): same arenas
  // (kind, size) and the same tensors in the same order (name, dtype, shape, strides, arena,
  // offset, nbytes). Otherwise FAILED_PRECONDITION naming the first difference. On any error
  // (that one, a hostile reply, a failed mmap or driver call) the attachment keeps mapping the
  // generation it had, fully readable; arenas already replaced are put back. When the daemon
  // already counts the lease on the newer generation but this attachment could not follow
  // (an earlier failed refresh), FAILED_PRECONDITION says so: detach and attach again.
  // FAILED_PRECONDITION after Detach. Not thread-safe with other calls on this Attachment.
  absl::StatusOr<bool> Refresh();

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

  // ---- Generations (docs/PROTOCOL.md "Generations") ----
  // Update, UpdateFromFd, UpdateTensors and Rollback need the authorization of Load; the
  // daemon's errors: INVALID_ARGUMENT naming a tensor the checkpoint lacks (with the nearest
  // names) or one whose dtype or shape differs, FAILED_PRECONDITION naming the model's state
  // (loading, failed, already updating), RESOURCE_EXHAUSTED with the bytes needed.

  // Publishes the tensors of `checkpoint` (a directory or .safetensors file as the daemon sees
  // it, under its model_roots; any subset of the model's checkpoint tensors, under the same
  // names) as the model's next generation. Without `wait` it returns once the daemon accepted
  // the update (watch Status(name)->update, or WaitGeneration); with `wait` once the new
  // generation is published or the update failed (the daemon's error). With `wait`, closing
  // the connection before the reply (the process dies) cancels the update.
  absl::StatusOr<UpdateResult> Update(const std::string& name, const std::string& checkpoint,
                                      bool wait = false);
  // Like Update, the new tensors being the safetensors file held by `memfd`: a memfd sealed with
  // at least F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW (INVALID_ARGUMENT naming the missing seals
  // otherwise, before anything is sent). The fd is not consumed: the caller closes it when it
  // likes (the daemon holds its own reference once the request is sent).
  absl::StatusOr<UpdateResult> UpdateFromFd(const std::string& name, int memfd, bool wait = true);
  // Like UpdateFromFd with wait = true, the tensors given in host memory: they are copied once
  // into a sealed memfd laid out as a safetensors file (no other copy, no file on disk), which
  // the daemon reads. INVALID_ARGUMENT naming the tensor when a name is empty or repeated, a
  // dimension negative, `data` null, or nbytes != product(shape) * DTypeSize(dtype); nothing is
  // sent then. Memory: the memfd holds all the bytes until the call returns.
  absl::StatusOr<UpdateResult> UpdateTensors(const std::string& name,
                                             std::span<const UpdateTensor> tensors);

  // Waits until the model's generation is above `after`, at most `timeout` (clamped to 0 ..
  // 10 minutes, the protocol's kMaxWaitGenerationMs): returns at once when it already is, else
  // when it advances or with timed_out = true and the generation as it is. NOT_FOUND when the
  // model is (or gets) unloaded. The connection is busy meanwhile: calls from other threads on
  // this Client (and its Attachments) wait behind it, so wait on a Client of its own.
  absl::StatusOr<GenerationWait> WaitGeneration(const std::string& name, uint64_t after,
                                                absl::Duration timeout);

  // Re-publishes the kept previous generation's weights as a new generation (numbers only grow);
  // a second rollback undoes the first. FAILED_PRECONDITION when the daemon keeps no previous
  // generation (config keep_previous_generation) or an update is running.
  absl::StatusOr<RollbackResult> Rollback(const std::string& name);

 private:
  friend class Attachment;
  struct Impl;
  explicit Client(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// `{"models": [...]}` as `weightctl status --json` prints it and the C ABI returns it: per model
// name, state, checkpoint, backend, tp, bytes_total, bytes_done, seconds, generation,
// previous_generation, error (when failed), update (when the daemon shows one: state,
// generation, bytes_total, bytes_done, seconds, error when failed) and ranks (rank, device,
// state, arena_bytes, tensors, lease_count, leases [{lease, pid, uid, generation}], the latter
// at most 64 in all).
// `indent` < 0 gives one line.
std::string ModelsToJson(const std::vector<ModelInfo>& models, int indent = -1);

// `{"name", "generation", "state", "seconds", "bytes_read", "ranks_rewritten",
// "targets_rewritten", "targets_copied", "segments_rewritten", "bytes_allocated", "bytes_copied"}`:
// an update's answer as the C ABI and weightctl print it.
std::string UpdateResultToJson(const std::string& name, const UpdateResult& r, int indent = -1);

}  // namespace weightd

#endif  // WEIGHTD_CLIENT_H_
