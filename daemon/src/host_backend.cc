#include "weightd/host_backend.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "weightd/log.h"
#include "weightd/status_macros.h"
#ifdef WEIGHTD_HAVE_CUDA_BACKEND
#include "weightd/cuda_backend.h"
#endif

namespace weightd {
namespace {

constexpr int kAllSeals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

absl::StatusOr<UniqueFd> CreateMemfd(absl::string_view label, uint64_t bytes) {
  const std::string name = absl::StrCat("weightd:", label);
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return ErrnoError(errno, absl::StrCat("memfd_create for ", label));
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
    return ErrnoError(errno, absl::StrCat("ftruncate of the ", bytes, "-byte memfd for ", label));
  }
  return fd;
}

class HostArena;

}  // namespace

// The arenas alive now, for admission. An arena registers when made and leaves in its
// destructor, both under `mu`, so Admit may look at any registered arena while holding it.
struct HostBackend::Ledger {
  mutable absl::Mutex mu;
  std::map<const HostArena*, uint64_t> arenas ABSL_GUARDED_BY(mu);  // -> bytes
};

namespace {

class HostArena final : public Arena {
 public:
  HostArena(UniqueFd fd, uint64_t size, std::string label,
            std::shared_ptr<HostBackend::Ledger> ledger)
      : fd_(std::move(fd)), size_(size), label_(std::move(label)), ledger_(std::move(ledger)) {
    absl::MutexLock l(&ledger_->mu);
    ledger_->arenas[this] = size_;
  }
  ~HostArena() override {
    {
      absl::MutexLock l(&ledger_->mu);
      ledger_->arenas.erase(this);
    }
    if (write_map_ != nullptr) ::munmap(write_map_, size_);
    if (read_map_ != nullptr) ::munmap(const_cast<std::byte*>(read_map_), size_);
  }

  uint64_t size() const override { return size_; }
  int device() const override { return -1; }
  ArenaKind kind() const override { return ArenaKind::kHostMemfd; }
  // Mapped on first use only: the executor writes through host_fd(), so a load leaves no
  // writable mapping of its arenas in the daemon (and none to tear down at Seal()).
  std::span<std::byte> writable() override {
    absl::MutexLock l(&map_mu_);
    if (sealed_.load() || size_ == 0) return {};
    if (write_map_ == nullptr) {
      void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
      if (p == MAP_FAILED) return {};
      write_map_ = static_cast<std::byte*>(p);
    }
    return {write_map_, size_};
  }
  std::span<const std::byte> readable() const override {
    return read_map_ ? std::span<const std::byte>(read_map_, size_) : std::span<const std::byte>();
  }
  int host_fd() const override { return sealed_.load() ? -1 : fd_.get(); }
  absl::string_view label() const override { return label_; }

  absl::Status Seal() override {
    if (sealed_) return absl::OkStatus();
    // F_SEAL_WRITE is refused (EBUSY) while any writable shared mapping exists.
    {
      absl::MutexLock l(&map_mu_);
      if (write_map_ != nullptr) {
        ::munmap(write_map_, size_);
        write_map_ = nullptr;
      }
    }
    WD_SYSCALL_OR_RETURN(::fcntl(fd_.get(), F_ADD_SEALS, kAllSeals),
                         absl::StrCat("sealing the memfd of ", label_));
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_.get(), 0);
      if (p == MAP_FAILED) {
        return ErrnoError(errno, absl::StrCat("read-only mmap of the memfd of ", label_));
      }
      read_map_ = static_cast<const std::byte*>(p);
    }
    sealed_ = true;
    return absl::OkStatus();
  }

  // A sealed memfd of an earlier daemon: only the read-only mapping is made.
  absl::Status AdoptSealed() {
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_.get(), 0);
      if (p == MAP_FAILED) {
        return ErrnoError(errno, absl::StrCat("read-only mmap of the adopted memfd of ", label_));
      }
      read_map_ = static_cast<const std::byte*>(p);
    }
    sealed_ = true;
    return absl::OkStatus();
  }

  // Bytes not yet resident while the arena is being filled (0 once sealed: nothing more is
  // written). A memfd's st_blocks counts its allocated pages.
  uint64_t PendingBytes() const {
    if (sealed_.load(std::memory_order_acquire)) return 0;
    struct stat st;
    if (::fstat(fd_.get(), &st) != 0) return size_;
    const uint64_t resident = static_cast<uint64_t>(st.st_blocks) * 512;
    return resident >= size_ ? 0 : size_ - resident;
  }

  absl::StatusOr<UniqueFd> Export() const override {
    if (!sealed_) {
      return absl::FailedPreconditionError(
          absl::StrCat("arena ", label_, " is still being written"));
    }
    UniqueFd fd(::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0));
    if (!fd) return ErrnoError(errno, absl::StrCat("dup of the memfd of ", label_));
    return fd;
  }

 private:
  UniqueFd fd_;
  uint64_t size_;
  std::string label_;
  absl::Mutex map_mu_;
  std::byte* write_map_ ABSL_GUARDED_BY(map_mu_) = nullptr;
  const std::byte* read_map_ = nullptr;
  std::atomic<bool> sealed_{false};
  std::shared_ptr<HostBackend::Ledger> ledger_;
};

// The first line of `path`, or nullopt.
std::optional<std::string> ReadLine(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  if (!f || !std::getline(f, line)) return std::nullopt;
  return line;
}

std::optional<uint64_t> ReadBytes(const std::string& path) {
  std::optional<std::string> line = ReadLine(path);
  uint64_t v;
  if (!line || !absl::SimpleAtoi(absl::StripAsciiWhitespace(*line), &v)) return std::nullopt;
  return v;
}

// The tightest limit less usage over `dir` and its ancestors up to `root` (both included).
void TightestCgroup(const std::string& root, std::string dir, const char* limit_file,
                    const char* usage_file, HostMemoryState* out) {
  for (;;) {
    const std::optional<uint64_t> limit = ReadBytes(dir + "/" + limit_file);
    const std::optional<uint64_t> usage = ReadBytes(dir + "/" + usage_file);
    // cgroup v2 writes "max" (not a number) for no limit; v1 a huge number, never reached.
    if (limit && usage && *limit < (1ull << 60)) {
      const uint64_t left = *limit > *usage ? *limit - *usage : 0;
      if (!out->cgroup_left || left < *out->cgroup_left) {
        out->cgroup_left = left;
        out->cgroup = dir;
      }
    }
    if (dir.size() <= root.size()) return;
    dir.resize(dir.rfind('/'));
  }
}

}  // namespace

HostMemoryState ReadHostMemory(const HostMemorySources& sources) {
  HostMemoryState st;
  {
    std::ifstream f(sources.meminfo);
    std::string line;
    while (std::getline(f, line)) {
      absl::string_view v = line;
      if (!absl::ConsumePrefix(&v, "MemAvailable:")) continue;
      v = absl::StripAsciiWhitespace(v);
      uint64_t kb;
      if (absl::ConsumeSuffix(&v, "kB") && absl::SimpleAtoi(absl::StripAsciiWhitespace(v), &kb)) {
        st.mem_available = kb * 1024;
      }
      break;
    }
  }
  std::ifstream f(sources.self_cgroup);
  std::string line;
  while (std::getline(f, line)) {
    // "ID:controllers:path"; v2 is "0::path", v1 names "memory" among the controllers.
    std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3 || parts[2].empty() || parts[2][0] != '/') continue;
    const std::string path = parts[2] == "/" ? "" : parts[2];
    if (parts[1].empty()) {
      TightestCgroup(sources.cgroup_root, sources.cgroup_root + path, "memory.max",
                     "memory.current", &st);
      continue;
    }
    for (absl::string_view c : absl::StrSplit(parts[1], ',')) {
      if (c != "memory") continue;
      const std::string root = sources.cgroup_root + "/memory";
      TightestCgroup(root, root + path, "memory.limit_in_bytes", "memory.usage_in_bytes", &st);
    }
  }
  return st;
}

HostBackend::HostBackend(uint64_t memory_budget, HostMemorySources sources)
    : memory_budget_(memory_budget),
      sources_(std::move(sources)),
      ledger_(std::make_shared<Ledger>()) {}

HostBackend::~HostBackend() = default;

uint64_t HostBackend::held_bytes() const {
  absl::MutexLock l(&ledger_->mu);
  uint64_t n = 0;
  for (const auto& [arena, bytes] : ledger_->arenas) n += bytes;
  return n;
}

uint64_t HostBackend::pending_bytes() const {
  absl::MutexLock l(&ledger_->mu);
  uint64_t n = 0;
  for (const auto& [arena, bytes] : ledger_->arenas) n += arena->PendingBytes();
  return n;
}

absl::Status HostBackend::Admit(absl::string_view model, absl::Span<const ArenaRequest> arenas) {
  uint64_t needed = 0;
  for (const ArenaRequest& r : arenas) needed += r.bytes;
  if (needed == 0) return absl::OkStatus();
  const uint64_t held = held_bytes(), pending = pending_bytes();
  auto less = [](uint64_t a, uint64_t b) { return a > b ? a - b : 0; };
  uint64_t available = std::numeric_limits<uint64_t>::max();
  std::string why;
  auto consider = [&](uint64_t left, std::string what) {
    if (left < available) {
      available = left;
      why = std::move(what);
    }
  };
  if (memory_budget_ > 0) {
    consider(less(memory_budget_, held),
             absl::StrCat("host_memory_budget of ", FormatBytes(memory_budget_), " less ",
                          FormatBytes(held), " of arenas held"));
  }
  const HostMemoryState st = ReadHostMemory(sources_);
  const std::string filling =
      pending > 0 ? absl::StrCat(" less ", FormatBytes(pending), " of arenas still being filled")
                  : "";
  if (st.mem_available) {
    consider(less(*st.mem_available, pending),
             absl::StrCat("MemAvailable of ", FormatBytes(*st.mem_available), filling));
  }
  if (st.cgroup_left) {
    consider(less(*st.cgroup_left, pending),
             absl::StrCat("memory cgroup ", st.cgroup, " with ", FormatBytes(*st.cgroup_left),
                          " left under its limit", filling));
  }
  if (needed <= available) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      absl::StrCat("model '", model, "' needs ", needed, " bytes (", FormatBytes(needed),
                   ") of host memory for ", arenas.size(), " arena(s), but only ", available,
                   " bytes (", FormatBytes(available), ") are available: ", why));
}

absl::StatusOr<std::unique_ptr<Arena>> HostBackend::Allocate(const ArenaRequest& request) {
  if (request.device >= 0) {
    // The host backend places every rank in host memory whatever device was asked for; the
    // device ordinal is kept in status for the engine's benefit.
  }
  WD_ASSIGN_OR_RETURN(UniqueFd fd, CreateMemfd(request.label, request.bytes));
  return std::make_unique<HostArena>(std::move(fd), request.bytes, request.label, ledger_);
}

absl::StatusOr<std::unique_ptr<Arena>> HostBackend::Adopt(UniqueFd fd,
                                                          const AdoptRequest& request) {
  const std::string& label = request.label;
  if (request.kind != ArenaKind::kHostMemfd) {
    return ArenaKindMismatch(label, request.kind, *this, "its record");
  }
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0) {
    // A CUDA device arena's fd (cuMemExportToShareableHandle) is no memfd: say so, since a
    // record claiming a host arena for it is the likely cause.
    return absl::FailedPreconditionError(absl::StrCat(
        "arena ", label, " is not a memfd (F_GET_SEALS: ", std::strerror(errno), "), so not a ",
        ArenaKindText(ArenaKind::kHostMemfd), " that backend 'host' can adopt; if it is ",
        ArenaKindText(ArenaKind::kCudaVmm), ", restart weightd with --backend cuda"));
  }
  if ((seals & kAllSeals) != kAllSeals) {
    return absl::FailedPreconditionError(
        absl::StrCat("arena ", label, " is not sealed (seals 0x", absl::Hex(seals), ")"));
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoError(errno, absl::StrCat("fstat of ", label));
  if (static_cast<uint64_t>(st.st_size) != request.bytes) {
    return absl::FailedPreconditionError(absl::StrCat("arena ", label, " has ", st.st_size,
                                                      " bytes; its record says ", request.bytes));
  }
  auto a = std::make_unique<HostArena>(std::move(fd), request.bytes, label, ledger_);
  WD_RETURN_IF_ERROR(a->AdoptSealed());
  return a;
}

absl::string_view ArenaKindText(ArenaKind kind) {
  switch (kind) {
    case ArenaKind::kHostMemfd:
      return "a host memfd";
    case ArenaKind::kCudaVmm:
      return "CUDA VMM device memory";
  }
  return "an arena of unknown kind";
}

absl::string_view ArenaKindToken(ArenaKind kind) {
  switch (kind) {
    case ArenaKind::kHostMemfd:
      return "host_memfd";
    case ArenaKind::kCudaVmm:
      return "cuda_vmm";
  }
  return "unknown";
}

absl::Status ArenaKindMismatch(absl::string_view label, ArenaKind offered, const Backend& backend,
                               absl::string_view according_to) {
  const absl::string_view other = offered == ArenaKind::kHostMemfd ? "host" : "cuda";
  return absl::FailedPreconditionError(
      absl::StrCat("arena ", label, " is ", ArenaKindText(offered), " (according to ", according_to,
                   "), but backend '", backend.name(), "' keeps its arenas in ",
                   ArenaKindText(backend.arena_kind()), "; restart weightd with --backend ", other,
                   " to adopt it"));
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(absl::string_view kind,
                                                     const BackendOptions& options,
                                                     std::string* reason) {
  auto explain = [reason](std::string why) {
    if (reason != nullptr) *reason = std::move(why);
  };
  if (kind == "host") {
    explain("backend host: asked for (arenas are sealed memfds in RAM)");
    return std::make_unique<HostBackend>(options.host_memory_budget);
  }
  if (kind != "auto" && kind != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown backend '", kind, "' (expected auto, cuda or host)"));
  }
#ifdef WEIGHTD_HAVE_CUDA_BACKEND
  // Create() succeeds exactly when CudaDeviceAvailable() holds, and says why not otherwise.
  absl::StatusOr<std::unique_ptr<CudaBackend>> b = CudaBackend::Create(options);
  if (b.ok()) {
    explain(absl::StrCat("backend cuda: ", kind == "auto" ? "auto found " : "asked for; ",
                         (*b)->device_count(), " CUDA device(s)"));
    return std::unique_ptr<Backend>(std::move(*b));
  }
  if (kind == "cuda") {
    return absl::FailedPreconditionError(absl::StrCat(
        "backend 'cuda' is not available: ", b.status().message(), "; use --backend host"));
  }
  explain(
      absl::StrCat("backend host: auto found no usable CUDA device (", b.status().message(), ")"));
  return std::make_unique<HostBackend>(options.host_memory_budget);
#else
  if (kind == "cuda") {
    return absl::FailedPreconditionError(
        "backend 'cuda' is not available in this build (configured with "
        "WEIGHTD_ENABLE_CUDA=OFF); use --backend host or auto");
  }
  explain("backend host: auto, and this build has no CUDA backend (WEIGHTD_ENABLE_CUDA=OFF)");
  return std::make_unique<HostBackend>(options.host_memory_budget);
#endif
}

absl::StatusOr<UniqueFd> MakeSealedMemfd(absl::string_view label, absl::string_view bytes) {
  WD_ASSIGN_OR_RETURN(UniqueFd fd, CreateMemfd(label, 0));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, absl::StrCat("write of the memfd ", label));
    }
    done += static_cast<size_t>(n);
  }
  WD_SYSCALL_OR_RETURN(::fcntl(fd.get(), F_ADD_SEALS, kAllSeals),
                       absl::StrCat("sealing the memfd ", label));
  return fd;
}

}  // namespace weightd
