#include "weightd/client.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "detail/device_mapping.h"
#include "detail/reply.h"
#include "detail/safetensors_memfd.h"
#include "nlohmann/json.hpp"
#include "weightd/crc32c.h"
#include "weightd/file_util.h"
#include "weightd/manifest.h"
#include "weightd/protocol.h"
#include "weightd/seqpacket.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd {
namespace {

using json = nlohmann::json;

// Replies are larger than requests (status of many models); a reply beyond this is an error.
constexpr size_t kMaxReplyBytes = 4 << 20;

constexpr int kRequiredSeals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;

struct Reply {
  json result;
  std::vector<UniqueFd> fds;
};

}  // namespace

// The connection, shared by a Client and its Attachments.
struct Client::Impl {
  absl::Mutex mu;
  UniqueFd fd ABSL_GUARDED_BY(mu);
  uint64_t next_id ABSL_GUARDED_BY(mu) = 1;
  int version = 0;

  // Sends `req` (its id is assigned here) with `send_fds` (an update's memfd; the kernel passes
  // the receiver its own reference, the caller keeps its fds) and returns the reply's result or
  // its error. For attach and refresh, continuation packets carrying more fds are collected too.
  // No receive timeout: a wait_generation or an update with `wait` is answered when it is done.
  absl::StatusOr<Reply> Call(Request req, std::span<const int> send_fds = {}) {
    absl::MutexLock l(&mu);
    if (!fd) return absl::UnavailableError("the connection to weightd is closed");
    const uint64_t id = next_id++;
    req.id_json = absl::StrCat(id);
    WD_ASSIGN_OR_RETURN(const std::string wire, EncodeRequest(req));
    if (absl::Status s = SendPacket(fd.get(), wire, send_fds); !s.ok()) {
      fd.Reset();
      return absl::UnavailableError(absl::StrCat("sending to weightd failed: ", s.message()));
    }
    Reply reply;
    WD_ASSIGN_OR_RETURN(reply.result, Receive(id, &reply.fds));
    if (req.op == Op::kAttach || req.op == Op::kRefresh) {
      WD_ASSIGN_OR_RETURN(const int64_t extra, detail::DecodeFdMessages(reply.result));
      for (int64_t i = 0; i < extra; ++i) {
        absl::StatusOr<json> cont = Receive(id, &reply.fds);
        if (!cont.ok()) {
          return absl::Status(
              cont.status().code(),
              absl::StrCat(OpName(req.op), " continuation: ", cont.status().message()));
        }
      }
    }
    return reply;
  }

  // The next packet's result (detail::DecodeReplyPacket), its fds appended to `fds`.
  absl::StatusOr<json> Receive(uint64_t id, std::vector<UniqueFd>* fds)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    absl::StatusOr<Packet> received = RecvPacket(fd.get(), kMaxReplyBytes);
    if (!received.ok()) {
      fd.Reset();
      return absl::UnavailableError(
          absl::StrCat("receiving from weightd failed: ", received.status().message()));
    }
    Packet& p = *received;
    if (p.eof) {
      fd.Reset();
      return absl::UnavailableError("weightd closed the connection");
    }
    if (p.truncated) return absl::InternalError("reply from weightd exceeds 4 MiB");
    for (UniqueFd& f : p.fds) fds->push_back(std::move(f));
    return detail::DecodeReplyPacket(p.data, id);
  }
};

struct Attachment::Impl {
  std::shared_ptr<Client::Impl> conn;
  std::string model;
  int rank = 0;
  uint64_t lease = 0;
  uint64_t generation = 1;
  // The mapped generation's manifest (names included): what a refresh's layout must equal.
  Manifest layout;
  // fds[0]: the manifest memfd; fds[1 + i]: arena i. They keep the memory alive.
  std::vector<UniqueFd> fds;
  // Per arena: the daemon's id of the memory mapped (empty from daemons before segments).
  std::vector<uint64_t> arena_ids;
  struct Mapping {
    void* addr = nullptr;
    size_t size = 0;
  };
  // Per arena: its host mapping ({nullptr, 0} for device arenas and empty host arenas) and its
  // DeviceMapping (nullptr for host arenas).
  std::vector<Mapping> maps;
  std::vector<std::unique_ptr<DeviceMapping>> device_maps;
  // Per tensor: its arena's DeviceMapping and byte offset there; nullptr for host tensors.
  struct DeviceRef {
    const DeviceMapping* map = nullptr;
    uint64_t offset = 0;
  };
  std::vector<DeviceRef> device_refs;
  std::vector<TensorView> tensors;
  absl::flat_hash_map<absl::string_view, size_t> index;
  uint64_t total = 0;
  bool detached = false;

  void Unmap() {
    for (Mapping& m : maps) {
      if (m.addr != nullptr) ::munmap(m.addr, m.size);
    }
    maps.clear();
    tensors.clear();
    device_refs.clear();
    device_maps.clear();
    index.clear();
    fds.clear();
  }
  ~Impl() { Unmap(); }

  // Puts the memory `fd` holds in arena `i`'s place: one mmap(MAP_FIXED) over the host mapping
  // (the kernel swaps the pages atomically), or DeviceMapping::Remap.
  absl::Status RemapArena(size_t i, int fd, const std::string& uuid);
};

namespace {

// What an attach or refresh reply carried, validated: the manifest (sealed memfd of the announced
// size, DecodeManifest) against the request (CheckAttachManifest), with each arena's device UUID.
struct ReceivedManifest {
  Manifest manifest;
  std::vector<std::string> uuids;  // "" for host arenas
};

absl::StatusOr<std::string> ReadSealedManifest(int fd, uint64_t expected) {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & kRequiredSeals) != kRequiredSeals) {
    return absl::InternalError("the manifest memfd from weightd is not sealed");
  }
  struct stat st;
  WD_SYSCALL_OR_RETURN(::fstat(fd, &st), "fstat of the manifest memfd");
  if (static_cast<uint64_t>(st.st_size) != expected || expected > kMaxManifestBytes) {
    return absl::InternalError(
        absl::StrCat("manifest memfd has ", st.st_size, " bytes, the reply announced ", expected));
  }
  std::string bytes(expected, '\0');
  WD_RETURN_IF_ERROR(PreadExact(fd, bytes.data(), expected, 0, "manifest memfd"));
  return bytes;
}

absl::StatusOr<ReceivedManifest> ReceiveManifest(const std::vector<UniqueFd>& fds,
                                                 const detail::AttachResult& res,
                                                 const std::string& name, int rank) {
  if (fds.empty()) return absl::InternalError("the reply carried no manifest fd");
  ReceivedManifest out;
  WD_ASSIGN_OR_RETURN(std::string bytes, ReadSealedManifest(fds[0].get(), res.manifest_bytes));
  WD_ASSIGN_OR_RETURN(out.manifest, DecodeManifest(bytes));
  // `arena_info` (docs/PROTOCOL.md) is present when any arena is device memory.
  WD_ASSIGN_OR_RETURN(out.uuids,
                      detail::CheckAttachManifest(out.manifest, res, fds.size() - 1, name, rank));
  return out;
}

// A host arena's memfd before it is mapped: sealed against shrinking and writing, and at least
// `size` bytes long.
absl::Status CheckHostArenaFd(int fd, size_t arena, uint64_t size) {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  // Without SHRINK a peer could truncate the memfd under the mapping (SIGBUS on access).
  if (seals < 0 || (seals & kRequiredSeals) != kRequiredSeals) {
    return absl::InternalError(absl::StrCat("arena ", arena, " memfd is not sealed"));
  }
  struct stat st;
  WD_SYSCALL_OR_RETURN(::fstat(fd, &st), absl::StrCat("fstat of the arena ", arena, " memfd"));
  if (static_cast<uint64_t>(st.st_size) < size) {
    return absl::InternalError(absl::StrCat("arena ", arena, " memfd has ", st.st_size,
                                            " bytes; the manifest says ", size));
  }
  return absl::OkStatus();
}

absl::Status Prefixed(const absl::Status& s, absl::string_view where) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(where, ": ", s.message()));
}

}  // namespace

// ---- Attachment ----

Attachment::Attachment(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Attachment::Attachment(Attachment&&) noexcept = default;
Attachment& Attachment::operator=(Attachment&& other) noexcept {
  if (this != &other) {
    (void)Detach();
    impl_ = std::move(other.impl_);
  }
  return *this;
}
Attachment::~Attachment() { (void)Detach(); }

const std::string& Attachment::model() const { return impl_->model; }
int Attachment::rank() const { return impl_->rank; }
uint64_t Attachment::lease() const { return impl_->lease; }
const std::vector<TensorView>& Attachment::tensors() const { return impl_->tensors; }
uint64_t Attachment::total_bytes() const { return impl_->total; }
uint64_t Attachment::generation() const { return impl_->generation; }

const TensorView* Attachment::Find(absl::string_view name) const {
  auto it = impl_->index.find(name);
  return it == impl_->index.end() ? nullptr : &impl_->tensors[it->second];
}

absl::Status Attachment::Verify() const {
  // Device tensors are read back in chunks, so Verify needs at most this much host memory.
  constexpr size_t kChunkBytes = 64 << 20;
  std::vector<std::byte> staging;
  for (size_t i = 0; i < impl_->tensors.size(); ++i) {
    const TensorView& t = impl_->tensors[i];
    const Impl::DeviceRef& ref = impl_->device_refs[i];
    uint32_t c = 0;
    if (ref.map == nullptr) {
      c = Crc32c(t.data, t.nbytes);
    } else {
      staging.resize(std::min<uint64_t>(t.nbytes, kChunkBytes));
      for (uint64_t done = 0; done < t.nbytes;) {
        const size_t n = std::min<uint64_t>(t.nbytes - done, kChunkBytes);
        if (absl::Status s = ref.map->CopyToHost(ref.offset + done, staging.data(), n); !s.ok()) {
          return absl::Status(
              s.code(), absl::StrCat("reading tensor '", t.name, "' of model '", impl_->model,
                                     "' rank ", impl_->rank, " back from the GPU: ", s.message()));
        }
        c = Crc32cExtend(c, staging.data(), n);
        done += n;
      }
    }
    if (c != t.crc32c) {
      return absl::DataLossError(
          absl::StrFormat("tensor '%s' of model '%s' rank %d: CRC32C %08x != manifest %08x", t.name,
                          impl_->model, impl_->rank, c, t.crc32c));
    }
  }
  return absl::OkStatus();
}

absl::Status Attachment::Read(const TensorView& tensor, uint64_t offset, void* dst,
                              uint64_t n) const {
  const std::vector<TensorView>& ts = impl_->tensors;
  if (ts.empty() || &tensor < ts.data() || &tensor >= ts.data() + ts.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor.name,
                                                   "' is not one of this attachment's (model '",
                                                   impl_->model, "' rank ", impl_->rank, ")"));
  }
  if (offset > tensor.nbytes || n > tensor.nbytes - offset) {
    return absl::OutOfRangeError(absl::StrCat("bytes [", offset, ", ", offset + n,
                                              ") leave tensor '", tensor.name, "' of ",
                                              tensor.nbytes, " bytes"));
  }
  if (n == 0) return absl::OkStatus();
  const Impl::DeviceRef& ref = impl_->device_refs[&tensor - ts.data()];
  if (ref.map == nullptr) {
    std::memcpy(dst, static_cast<const std::byte*>(tensor.data) + offset, n);
    return absl::OkStatus();
  }
  if (absl::Status s = ref.map->CopyToHost(ref.offset + offset, dst, n); !s.ok()) {
    return absl::Status(s.code(),
                        absl::StrCat("reading tensor '", tensor.name, "' of model '", impl_->model,
                                     "' rank ", impl_->rank, " back from the GPU: ", s.message()));
  }
  return absl::OkStatus();
}

absl::Status Attachment::Detach() {
  if (!impl_ || impl_->detached) return absl::OkStatus();
  impl_->detached = true;
  impl_->Unmap();
  Request r;
  r.op = Op::kDetach;
  r.name = impl_->model;
  r.rank = impl_->rank;
  if (impl_->lease != 0) r.lease = impl_->lease;
  auto reply = impl_->conn->Call(r);
  impl_->conn.reset();
  return reply.status();
}

// ---- Client ----

Client::Client(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&&) noexcept = default;
Client::~Client() = default;

int Client::version() const { return impl_->version; }

absl::StatusOr<Client> Client::Connect(const std::string& socket_path) {
  const std::string path = socket_path.empty() ? DefaultSocketPath() : socket_path;
  WD_ASSIGN_OR_RETURN(UniqueFd fd, ConnectSeqpacket(path));
  auto impl = std::make_shared<Impl>();
  {
    absl::MutexLock l(&impl->mu);
    impl->fd = std::move(fd);
  }
  Request hello;
  hello.op = Op::kHello;
  hello.version = kProtocolVersion;
  hello.client = "libweightd_client";
  WD_ASSIGN_OR_RETURN(Reply r, impl->Call(hello));
  WD_ASSIGN_OR_RETURN(const int64_t version, detail::DecodeHelloResult(r.result));
  if (version < 1 || version > kProtocolVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("weightd at ", path, " speaks protocol version ", version,
                     "; this client speaks 1..", kProtocolVersion));
  }
  impl->version = static_cast<int>(version);
  return Client(std::move(impl));
}

absl::StatusOr<std::vector<ModelInfo>> Client::List() {
  Request r;
  r.op = Op::kList;
  WD_ASSIGN_OR_RETURN(Reply reply, impl_->Call(r));
  return detail::DecodeModelsResult(reply.result);
}

absl::Status Client::Load(const std::string& name, const std::string& checkpoint,
                          const LoadOptions& o) {
  Request r;
  r.op = Op::kLoad;
  r.name = name;
  r.load.checkpoint = checkpoint;
  r.load.tp = o.tp;
  r.load.ranks = o.ranks;
  r.load.devices = o.devices;
  r.load.dtype = o.dtype;
  r.load.skip = o.skip;
  r.load.recipe_file = o.recipe_file;
  r.load.recipe = o.recipe;
  r.load.expert_parallel = o.expert_parallel;
  r.load.allow_uids = o.allow_uids;
  r.load.allow_gids = o.allow_gids;
  return impl_->Call(r).status();
}

absl::StatusOr<std::vector<ModelInfo>> Client::Status(const std::optional<std::string>& name) {
  Request r;
  r.op = Op::kStatus;
  r.name = name;
  WD_ASSIGN_OR_RETURN(Reply reply, impl_->Call(r));
  return detail::DecodeModelsResult(reply.result);
}

absl::Status Client::Unload(const std::string& name, bool force) {
  Request r;
  r.op = Op::kUnload;
  r.name = name;
  r.force = force;
  return impl_->Call(r).status();
}

absl::StatusOr<std::string> Client::Metrics() {
  Request r;
  r.op = Op::kMetrics;
  WD_ASSIGN_OR_RETURN(Reply reply, impl_->Call(r));
  return detail::DecodeMetricsResult(reply.result);
}

absl::Status Attachment::Impl::RemapArena(size_t i, int fd, const std::string& uuid) {
  if (DeviceMapping* dm = device_maps[i].get(); dm != nullptr) {
    return Prefixed(dm->Remap(fd, uuid), absl::StrCat("arena ", i, " (GPU memory)"));
  }
  const Mapping& map = maps[i];
  if (map.addr == nullptr) return absl::OkStatus();  // an empty arena has no mapping
  void* p = ::mmap(map.addr, map.size, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
  if (p == MAP_FAILED) {
    return ErrnoError(errno, absl::StrCat("mmap of arena ", i, " over its old mapping"));
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> Attachment::Refresh() {
  if (!impl_ || impl_->detached) {
    return absl::FailedPreconditionError("refresh of a detached attachment");
  }
  Impl& im = *impl_;
  const std::string where =
      absl::StrCat("refresh of model '", im.model, "' rank ", im.rank, " (lease ", im.lease, ")");
  Request r;
  r.op = Op::kRefresh;
  r.name = im.model;
  r.rank = im.rank;
  r.lease = im.lease;
  // The reply's fds are closed when `reply` goes out of scope on every path that does not adopt
  // them, and nothing below touches a mapping before everything is validated.
  WD_ASSIGN_OR_RETURN(Reply reply, im.conn->Call(r));
  absl::StatusOr<detail::RefreshResult> res = detail::DecodeRefreshResult(reply.result);
  if (!res.ok()) return Prefixed(res.status(), where);
  if (res->unchanged) {
    if (res->lease != im.lease) {
      return absl::InternalError(absl::StrCat(where, ": weightd answered for lease ", res->lease));
    }
    if (res->generation != im.generation) {
      return absl::FailedPreconditionError(
          absl::StrCat(where, ": weightd counts the lease on generation ", res->generation,
                       " but this attachment maps generation ", im.generation,
                       " (an earlier refresh failed); detach and attach again"));
    }
    return false;
  }
  const detail::AttachResult& ar = res->attach;
  if (ar.lease != im.lease) {
    return absl::InternalError(absl::StrCat(where, ": weightd answered for lease ", ar.lease));
  }
  absl::StatusOr<ReceivedManifest> received = ReceiveManifest(reply.fds, ar, im.model, im.rank);
  if (!received.ok()) return Prefixed(received.status(), where);
  const Manifest& m = received->manifest;
  WD_RETURN_IF_ERROR(detail::CheckSameLayout(im.layout, m, im.model, im.rank));
  for (size_t i = 0; i < m.arenas.size(); ++i) {
    if (m.arenas[i].kind != ArenaKind::kHostMemfd) continue;
    WD_RETURN_IF_ERROR(
        Prefixed(CheckHostArenaFd(reply.fds[i + 1].get(), i, m.arenas[i].size), where));
  }
  // Arenas the new generation shares with the mapped one (an update replaces only the segments
  // it touches) keep their mapping: same daemon arena id, and for a host arena the same memfd.
  std::vector<bool> keep(m.arenas.size(), false);
  if (ar.arena_ids.size() == m.arenas.size() && im.arena_ids.size() == m.arenas.size()) {
    for (size_t i = 0; i < m.arenas.size(); ++i) {
      if (ar.arena_ids[i] != im.arena_ids[i]) continue;
      if (m.arenas[i].kind == ArenaKind::kHostMemfd) {
        struct stat a, b;
        keep[i] = ::fstat(reply.fds[i + 1].get(), &a) == 0 &&
                  ::fstat(im.fds[i + 1].get(), &b) == 0 && a.st_dev == b.st_dev &&
                  a.st_ino == b.st_ino;
      } else {
        keep[i] = true;
      }
    }
  }

  size_t done = 0;
  absl::Status failure;
  for (; done < m.arenas.size(); ++done) {
    if (keep[done]) continue;
    failure = im.RemapArena(done, reply.fds[done + 1].get(), received->uuids[done]);
    if (!failure.ok()) break;
  }
  if (!failure.ok()) {
    // Back to the old generation: the arenas already replaced, and the failed one when it is a
    // host arena (a failed mmap(MAP_FIXED) may have dropped the old pages; DeviceMapping::Remap
    // restores its own). The old fds are still held, so the old memory is still there.
    std::string restore_errors;
    for (size_t i = 0; i <= done && i < m.arenas.size(); ++i) {
      if (keep[i]) continue;
      if (i == done && im.device_maps[i] != nullptr) break;
      if (absl::Status s = im.RemapArena(i, im.fds[i + 1].get(), received->uuids[i]); !s.ok()) {
        absl::StrAppend(&restore_errors, "; restoring arena ", i, " failed: ", s.message());
      }
    }
    return absl::Status(failure.code(),
                        absl::StrCat(where, ": ", failure.message(), restore_errors));
  }

  // A kept arena stays on the fd it was mapped from; the reply's duplicate goes with the old fds.
  for (size_t i = 0; i < m.arenas.size(); ++i) {
    if (keep[i]) std::swap(reply.fds[i + 1], im.fds[i + 1]);
  }
  im.arena_ids = ar.arena_ids;
  // The old generation's memory goes with the last close of its fds, which takes hundreds of
  // milliseconds for gigabytes of pages when this process holds the last reference: closed on a
  // thread of its own, so that refresh() returns at once.
  std::thread([old = std::exchange(im.fds, std::move(reply.fds))]() mutable { old.clear(); })
      .detach();
  for (size_t i = 0; i < im.tensors.size(); ++i) im.tensors[i].crc32c = m.tensors[i].crc32c;
  im.generation = ar.generation;
  im.layout = std::move(received->manifest);
  return true;
}

absl::StatusOr<Attachment> Client::Attach(const std::string& name, int rank) {
  Request r;
  r.op = Op::kAttach;
  r.name = name;
  r.rank = rank;
  WD_ASSIGN_OR_RETURN(Reply reply, impl_->Call(r));
  auto a = std::make_unique<Attachment::Impl>();
  a->conn = impl_;
  a->model = name;
  a->rank = rank;
  // From here on the lease exists on the daemon: any failure must detach (the Attachment's
  // destructor does) so a bad manifest does not leak a lease.
  Attachment att(std::move(a));
  Attachment::Impl& im = *att.impl_;
  im.fds = std::move(reply.fds);
  WD_ASSIGN_OR_RETURN(const detail::AttachResult res, detail::DecodeAttachResult(reply.result));
  im.lease = res.lease;
  im.generation = res.generation;
  im.arena_ids = res.arena_ids;
  const std::string where = absl::StrCat("attach of model '", name, "' rank ", rank);
  absl::StatusOr<ReceivedManifest> received = ReceiveManifest(im.fds, res, name, rank);
  if (!received.ok()) return Prefixed(received.status(), where);
  Manifest& m = received->manifest;
  const std::vector<std::string>& uuids = received->uuids;
  im.maps.resize(m.arenas.size());
  im.device_maps.resize(m.arenas.size());
  std::vector<const std::byte*> bases(m.arenas.size(), nullptr);
  for (size_t i = 0; i < m.arenas.size(); ++i) {
    const int fd = im.fds[i + 1].get();
    if (m.arenas[i].kind == ArenaKind::kCudaVmm) {
      const std::string& uuid = uuids[i];
      absl::StatusOr<std::unique_ptr<DeviceMapping>> dm =
          DeviceMapping::Map(fd, m.arenas[i].size, uuid);
      if (!dm.ok()) {
        return absl::Status(dm.status().code(),
                            absl::StrCat("model '", name, "' rank ", rank, ": arena ", i,
                                         " is in GPU memory (GPU UUID ", uuid,
                                         ") that cannot be mapped here: ", dm.status().message()));
      }
      bases[i] = reinterpret_cast<const std::byte*>(static_cast<uintptr_t>((*dm)->base()));
      im.device_maps[i] = *std::move(dm);
      continue;
    }
    WD_RETURN_IF_ERROR(Prefixed(CheckHostArenaFd(fd, i, m.arenas[i].size), where));
    if (m.arenas[i].size == 0) continue;
    void* p = ::mmap(nullptr, m.arenas[i].size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      return ErrnoError(errno, absl::StrCat(where, ": mmap of arena ", i));
    }
    im.maps[i] = {p, m.arenas[i].size};
    bases[i] = static_cast<const std::byte*>(p);
  }
  im.tensors.resize(m.tensors.size());
  im.device_refs.resize(m.tensors.size());
  im.index.reserve(m.tensors.size());
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const ManifestTensor& mt = m.tensors[i];
    TensorView& v = im.tensors[i];
    v.name = mt.name;
    v.dtype = mt.dtype;
    v.shape = mt.shape;
    v.strides = mt.strides;
    const DeviceMapping* dm = im.device_maps[mt.arena].get();
    v.device = dm != nullptr ? dm->ordinal() : -1;
    v.data = bases[mt.arena] != nullptr ? bases[mt.arena] + mt.offset : nullptr;
    im.device_refs[i] = {dm, mt.offset};
    v.nbytes = mt.nbytes;
    v.crc32c = mt.crc32c;
    im.total += mt.nbytes;
  }
  im.layout = std::move(m);
  for (size_t i = 0; i < im.tensors.size(); ++i) im.index.emplace(im.tensors[i].name, i);
  return att;
}

absl::StatusOr<UpdateResult> Client::Update(const std::string& name, const std::string& checkpoint,
                                            bool wait) {
  if (checkpoint.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("update of model '", name, "': the checkpoint path is empty"));
  }
  Request r;
  r.op = Op::kUpdate;
  r.name = name;
  r.checkpoint = checkpoint;
  r.wait = wait;
  WD_ASSIGN_OR_RETURN(Reply reply, impl_->Call(r));
  return detail::DecodeUpdateResult(reply.result);
}

absl::StatusOr<UpdateResult> Client::UpdateFromFd(const std::string& name, int memfd, bool wait) {
  const std::string where = absl::StrCat("update of model '", name, "'");
  if (memfd < 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": fd ", memfd, " is not a descriptor"));
  }
  const int seals = ::fcntl(memfd, F_GET_SEALS);
  if (seals < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": fd ", memfd, " is not a memfd created with MFD_ALLOW_SEALING (F_GET_SEALS: ",
        std::strerror(errno), ")"));
  }
  if ((seals & kRequiredSeals) != kRequiredSeals) {
    std::string missing;
    for (const auto& [seal, seal_name] : {std::pair<int, const char*>{F_SEAL_WRITE, "F_SEAL_WRITE"},
                                          {F_SEAL_SHRINK, "F_SEAL_SHRINK"},
                                          {F_SEAL_GROW, "F_SEAL_GROW"}}) {
      if ((seals & seal) == 0) absl::StrAppend(&missing, missing.empty() ? "" : "|", seal_name);
    }
    return absl::InvalidArgumentError(absl::StrCat(where, ": the memfd lacks the seals ", missing,
                                                   " (the daemon reads it while it runs)"));
  }
  // Our own reference for the send, so a caller closing its fd from another thread meanwhile
  // cannot make us send an unrelated file that reused the number.
  UniqueFd own(::fcntl(memfd, F_DUPFD_CLOEXEC, 0));
  if (!own) return ErrnoError(errno, absl::StrCat(where, ": dup of the memfd"));
  Request r;
  r.op = Op::kUpdate;
  r.name = name;
  r.wait = wait;
  const int fds[] = {own.get()};
  WD_ASSIGN_OR_RETURN(Reply reply, impl_->Call(r, fds));
  return detail::DecodeUpdateResult(reply.result);
}

absl::StatusOr<UpdateResult> Client::UpdateTensors(const std::string& name,
                                                   std::span<const UpdateTensor> tensors) {
  absl::StatusOr<UniqueFd> memfd = detail::WriteSafetensorsMemfd(tensors);
  if (!memfd.ok()) {
    return Prefixed(memfd.status(), absl::StrCat("update of model '", name, "'"));
  }
  return UpdateFromFd(name, memfd->get(), /*wait=*/true);
}

absl::StatusOr<GenerationWait> Client::WaitGeneration(const std::string& name, uint64_t after,
                                                      absl::Duration timeout) {
  Request r;
  r.op = Op::kWaitGeneration;
  r.name = name;
  r.after = after;
  // Rounded up, so a sub-millisecond timeout still waits instead of answering at once.
  const int64_t ms = absl::ToInt64Milliseconds(absl::Ceil(timeout, absl::Milliseconds(1)));
  r.timeout_ms = std::clamp<int64_t>(ms, 0, kMaxWaitGenerationMs);
  WD_ASSIGN_OR_RETURN(Reply reply, impl_->Call(r));
  return detail::DecodeGenerationWaitResult(reply.result);
}

absl::StatusOr<RollbackResult> Client::Rollback(const std::string& name) {
  Request r;
  r.op = Op::kRollback;
  r.name = name;
  WD_ASSIGN_OR_RETURN(Reply reply, impl_->Call(r));
  return detail::DecodeRollbackResult(reply.result);
}

namespace {

json ModelToJson(const ModelInfo& m) {
  json j = {{"name", m.name},
            {"state", m.state},
            {"checkpoint", m.checkpoint},
            {"backend", m.backend},
            {"tp", m.tp},
            {"bytes_total", m.bytes_total},
            {"bytes_done", m.bytes_done},
            {"seconds", m.seconds},
            {"generation", m.generation},
            {"previous_generation", m.previous_generation}};
  if (!m.error.empty()) j["error"] = m.error;
  if (m.update) {
    const UpdateStatus& u = *m.update;
    j["update"] = {{"state", u.state},
                   {"generation", u.generation},
                   {"bytes_total", u.bytes_total},
                   {"bytes_done", u.bytes_done},
                   {"seconds", u.seconds}};
    if (!u.error.empty()) j["update"]["error"] = u.error;
  }
  json ranks = json::array();
  for (const RankStatusInfo& r : m.ranks) {
    json leases = json::array();
    for (const LeaseStatus& l : r.leases) {
      leases.push_back(
          {{"lease", l.lease}, {"pid", l.pid}, {"uid", l.uid}, {"generation", l.generation}});
    }
    ranks.push_back({{"rank", r.rank},
                     {"device", r.device},
                     {"state", r.state},
                     {"arena_bytes", r.arena_bytes},
                     {"arenas", r.arenas},
                     {"tensors", r.tensors},
                     {"lease_count", r.lease_count},
                     {"leases", leases}});
  }
  j["ranks"] = ranks;
  return j;
}

}  // namespace

std::string ModelsToJson(const std::vector<ModelInfo>& models, int indent) {
  json arr = json::array();
  for (const ModelInfo& m : models) arr.push_back(ModelToJson(m));
  return json{{"models", std::move(arr)}}.dump(indent);
}

std::string UpdateResultToJson(const std::string& name, const UpdateResult& r, int indent) {
  return json{{"name", name},
              {"generation", r.generation},
              {"state", r.state},
              {"seconds", r.seconds},
              {"bytes_read", r.bytes_read},
              {"ranks_rewritten", r.ranks_rewritten},
              {"targets_rewritten", r.targets_rewritten},
              {"targets_copied", r.targets_copied},
              {"segments_rewritten", r.segments_rewritten},
              {"bytes_allocated", r.bytes_allocated},
              {"bytes_copied", r.bytes_copied}}
      .dump(indent);
}

}  // namespace weightd
