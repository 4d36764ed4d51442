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
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "detail/device_mapping.h"
#include "detail/reply.h"
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

  // Sends `req` (its id is assigned here) and returns the reply's result or its error. For
  // attach, continuation packets carrying more fds are collected too.
  absl::StatusOr<Reply> Call(Request req) {
    absl::MutexLock l(&mu);
    if (!fd) return absl::UnavailableError("the connection to weightd is closed");
    const uint64_t id = next_id++;
    req.id_json = absl::StrCat(id);
    WD_ASSIGN_OR_RETURN(const std::string wire, EncodeRequest(req));
    if (absl::Status s = SendPacket(fd.get(), wire); !s.ok()) {
      fd.Reset();
      return absl::UnavailableError(absl::StrCat("sending to weightd failed: ", s.message()));
    }
    Reply reply;
    WD_ASSIGN_OR_RETURN(reply.result, Receive(id, &reply.fds));
    if (req.op == Op::kAttach) {
      WD_ASSIGN_OR_RETURN(const int64_t extra, detail::DecodeFdMessages(reply.result));
      for (int64_t i = 0; i < extra; ++i) {
        absl::StatusOr<json> cont = Receive(id, &reply.fds);
        if (!cont.ok()) {
          return absl::Status(cont.status().code(),
                              absl::StrCat("attach continuation: ", cont.status().message()));
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
  std::vector<UniqueFd> fds;
  struct Mapping {
    void* addr = nullptr;
    size_t size = 0;
  };
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
};

namespace {

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
  if (im.fds.empty()) return absl::InternalError("attach reply carried no manifest fd");
  WD_ASSIGN_OR_RETURN(std::string bytes, ReadSealedManifest(im.fds[0].get(), res.manifest_bytes));
  WD_ASSIGN_OR_RETURN(Manifest m, DecodeManifest(bytes));
  // `arena_info` (docs/PROTOCOL.md) is present when any arena is device memory.
  WD_ASSIGN_OR_RETURN(const std::vector<std::string> uuids,
                      detail::CheckAttachManifest(m, res, im.fds.size() - 1, name, rank));
  std::vector<const std::byte*> bases(m.arenas.size(), nullptr);
  std::vector<const DeviceMapping*> device_maps(m.arenas.size(), nullptr);
  for (size_t i = 0; i < m.arenas.size(); ++i) {
    const int fd = im.fds[i + 1].get();
    if (m.arenas[i].kind == ArenaKind::kCudaVmm) {
      const std::string where =
          absl::StrCat("model '", name, "' rank ", rank, ": arena ", i, " is in GPU memory");
      const std::string& uuid = uuids[i];
      absl::StatusOr<std::unique_ptr<DeviceMapping>> dm =
          DeviceMapping::Map(fd, m.arenas[i].size, uuid);
      if (!dm.ok()) {
        return absl::Status(dm.status().code(),
                            absl::StrCat(where, " (GPU UUID ", uuid,
                                         ") that cannot be mapped here: ", dm.status().message()));
      }
      device_maps[i] = dm->get();
      bases[i] = reinterpret_cast<const std::byte*>(static_cast<uintptr_t>((*dm)->base()));
      im.device_maps.push_back(*std::move(dm));
      continue;
    }
    const int seals = ::fcntl(fd, F_GET_SEALS);
    // Without SHRINK a peer could truncate the memfd under the mapping (SIGBUS on access).
    if (seals < 0 || (seals & kRequiredSeals) != kRequiredSeals) {
      return absl::InternalError(absl::StrCat("arena ", i, " memfd is not sealed"));
    }
    struct stat st;
    WD_SYSCALL_OR_RETURN(::fstat(fd, &st), "fstat of an arena memfd");
    if (static_cast<uint64_t>(st.st_size) < m.arenas[i].size) {
      return absl::InternalError(absl::StrCat("arena ", i, " memfd has ", st.st_size,
                                              " bytes; the manifest says ", m.arenas[i].size));
    }
    if (m.arenas[i].size == 0) continue;
    void* p = ::mmap(nullptr, m.arenas[i].size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return ErrnoError(errno, absl::StrCat("mmap of arena ", i));
    im.maps.push_back({p, m.arenas[i].size});
    bases[i] = static_cast<const std::byte*>(p);
  }
  im.tensors.resize(m.tensors.size());
  im.device_refs.resize(m.tensors.size());
  im.index.reserve(m.tensors.size());
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    ManifestTensor& mt = m.tensors[i];
    TensorView& v = im.tensors[i];
    v.name = std::move(mt.name);
    v.dtype = mt.dtype;
    v.shape = std::move(mt.shape);
    v.strides = std::move(mt.strides);
    const DeviceMapping* dm = device_maps[mt.arena];
    v.device = dm != nullptr ? dm->ordinal() : -1;
    v.data = bases[mt.arena] != nullptr ? bases[mt.arena] + mt.offset : nullptr;
    im.device_refs[i] = {dm, mt.offset};
    v.nbytes = mt.nbytes;
    v.crc32c = mt.crc32c;
    im.total += mt.nbytes;
  }
  for (size_t i = 0; i < im.tensors.size(); ++i) im.index.emplace(im.tensors[i].name, i);
  return att;
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
            {"seconds", m.seconds}};
  if (!m.error.empty()) j["error"] = m.error;
  json ranks = json::array();
  for (const RankStatusInfo& r : m.ranks) {
    json leases = json::array();
    for (const LeaseStatus& l : r.leases) {
      leases.push_back({{"lease", l.lease}, {"pid", l.pid}, {"uid", l.uid}});
    }
    ranks.push_back({{"rank", r.rank},
                     {"device", r.device},
                     {"state", r.state},
                     {"arena_bytes", r.arena_bytes},
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

}  // namespace weightd
