// libwdsim_cuda.so: a simulated CUDA driver (libcuda.so.1 stand-in) for weightd's tests.
//
// weightd loads its driver with dlopen(path) + dlsym("cuGetProcAddress_v2") and resolves every
// entry point by base name; this library answers those lookups with CPU implementations, so the
// daemon and client run unchanged on a machine without a GPU. It is faithful where a bug in
// weightd would show on real hardware: device memory is not host-accessible (a host dereference
// of a device pointer segfaults), a mapping without cuMemSetAccess is inaccessible, writes through
// a read-only mapping fail, streams run asynchronously on their own threads, and a host buffer
// changed between an async copy's enqueue and its execution is reported as a race.
//
//   WEIGHTD_CUDA_DRIVER=/path/libwdsim_cuda.so WDSIM_DEVICES=2x8GiB weightd ...
//
// The exports are cuGetProcAddress_v2, cuGetProcAddress (the 12.0 four-argument form) and
// wdsim_abi_version (a const int, 1), by which weightd can tell it runs on the simulation.
//
// Environment (read once, at the first call into the library):
//   WDSIM_DEVICES      Devices and their memory sizes. Either COUNTxSIZE ("2x8GiB") or a comma
//                      list of SIZEs ("8GiB,4GiB"). SIZE is an integer with an optional suffix
//                      B, KiB, MiB, GiB or TiB (also K, M, G, T: binary). 0 to 8 devices; with 0,
//                      cuInit returns CUDA_ERROR_NO_DEVICE. Default "1x8GiB".
//   WDSIM_UUID_SALT    Any string, mixed into the device UUIDs (deterministic per index and salt)
//                      so that a process can "see other GPUs". Default "".
//   WDSIM_STATS_DIR    Directory: counters live in <dir>/<pid>.stats (see sim_stats.h, and
//                      sim_stats.py for Python). Unset: counters stay in process memory.
//   WDSIM_OP_DELAY_US  Microseconds every stream thread sleeps before each operation, so that
//                      races between the host and queued work show up. Default 0.
//   WDSIM_RACE_ABORT   "1": abort() when a race is detected. Default: count and print.
//   WDSIM_FAIL         NAME:N:CODE[,NAME:N:CODE...]: the N-th call (1-based, process-wide) of
//                      entry point NAME (base name, e.g. cuMemcpyHtoDAsync) returns CODE (a
//                      CUDA_ERROR_* name or a number) without doing anything.
//   WDSIM_LOSE_DEVICE  DEV:N[,DEV:N...]: after N calls made with a current context on device DEV
//                      (plus operations executed on its streams), the device is lost: calls that
//                      use it return CUDA_ERROR_DEVICE_UNAVAILABLE and queued stream work fails
//                      with it, while calls that only release resources still succeed.
// An unparsable variable makes cuInit fail with CUDA_ERROR_INVALID_VALUE (and a stderr line).
//
// Behavior weightd must expect:
//   - Everything except cuGetProcAddress, cuDriverGetVersion and cuGetError* needs cuInit first.
//   - A current context (cuCtxSetCurrent with a retained primary context, per thread) is needed by
//     every memory, stream, event, module and launch call, cuCtxSynchronize and cuMemGetInfo,
//     except cuMemUnmap, cuMemAddressFree and cuMemRelease. Missing one is CUDA_ERROR_INVALID_
//     CONTEXT and counts as misuse (stats.misuse, plus one "wdsim: misuse" stderr line).
//   - The null stream, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD execute synchronously in the
//     calling thread after the context's blocking streams (not CU_STREAM_NON_BLOCKING) drained;
//     synchronous copies and memsets behave the same way.
//   - Async operations are validated at enqueue (unmapped or inaccessible ranges return
//     CUDA_ERROR_INVALID_VALUE from the enqueueing call). An operation whose memory was unmapped
//     before it executed fails with CUDA_ERROR_ILLEGAL_ADDRESS, sticky on its stream.
//   - cuMemSetAccess applies to whole cuMemMap ranges (one or several adjacent ones); cuMemUnmap
//     takes whole cuMemMap ranges; cuMemAddressFree refuses a range that still has mappings.
//   - Releasing the last primary-context reference does not free the context's memory (a real
//     driver would): the counters expose such leaks instead.
//   - Only one kernel exists: weightd::kernels::kConvert2DKernel, run by the CPU reference.
//
// Thread-safety: every entry point may be called from any thread. Registries are guarded by one
// mutex (State::mu); each stream has its own queue mutex and worker thread. Lock order:
// State::mu before Stream::mu_; no lock is held while an operation executes.
#include <cuda.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "sim_stats.h"
#include "weightd/dtype.h"
#include "weightd/kernels/convert.h"
#include "weightd/kernels/device_kernels.h"

// cuda.h renames cuGetProcAddress to its _v2; the library exports both spellings itself.
#undef cuGetProcAddress

extern "C" {
__attribute__((visibility("default"))) extern const int wdsim_abi_version;
const int wdsim_abi_version = 1;
__attribute__((visibility("default"))) CUresult cuGetProcAddress_v2(
    const char* symbol, void** pfn, int cudaVersion, cuuint64_t flags,
    CUdriverProcAddressQueryResult* symbolStatus);
__attribute__((visibility("default"))) CUresult cuGetProcAddress(const char* symbol, void** pfn,
                                                                 int cudaVersion, cuuint64_t flags);
}

namespace weightd::sim {
namespace {

constexpr size_t kGranularity = size_t{2} << 20;
constexpr int kDriverVersion = 13000;
constexpr uint64_t kDefaultDeviceBytes = uint64_t{8} << 30;

// ----------------------------------------------------------------------------------------------
// Error names and strings (the real driver's texts).

struct ErrorText {
  CUresult code;
  const char* name;
  const char* text;
};

constexpr ErrorText kErrors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_DEVICE_UNAVAILABLE, "CUDA_ERROR_DEVICE_UNAVAILABLE",
     "CUDA-capable device(s) is/are busy or unavailable"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_ALREADY_MAPPED, "CUDA_ERROR_ALREADY_MAPPED", "resource already mapped"},
    {CUDA_ERROR_NOT_MAPPED, "CUDA_ERROR_NOT_MAPPED", "resource not mapped"},
    {CUDA_ERROR_OPERATING_SYSTEM, "CUDA_ERROR_OPERATING_SYSTEM",
     "OS call failed or operation not supported on this OS"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE",
     "the operation cannot be performed in the present state"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS",
     "an illegal memory access was encountered"},
    {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
     "too many resources requested for launch"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {CUDA_ERROR_CONTEXT_IS_DESTROYED, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed"},
    {CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
     "part or all of the requested memory range is already mapped"},
    {CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
     "pointer does not correspond to a registered memory region"},
    {CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

const ErrorText* FindError(CUresult code) {
  for (const ErrorText& e : kErrors) {
    if (e.code == code) return &e;
  }
  return nullptr;
}

const char* ErrorName(CUresult code) {
  const ErrorText* e = FindError(code);
  return e != nullptr ? e->name : "CUDA_ERROR_?";
}

// ----------------------------------------------------------------------------------------------
// Counters. Relaxed atomics on plain fields: the struct may live in a file shared with readers.

SimStats g_local_stats;
SimStats* g_stats = &g_local_stats;

void StatAdd(uint64_t& field, uint64_t d) { __atomic_fetch_add(&field, d, __ATOMIC_RELAXED); }
void StatSub(uint64_t& field, uint64_t d) { __atomic_fetch_sub(&field, d, __ATOMIC_RELAXED); }
void StatStore(uint64_t& field, uint64_t v) { __atomic_store_n(&field, v, __ATOMIC_RELAXED); }
void StatRaiseTo(uint64_t& field, uint64_t v) {
  uint64_t cur = __atomic_load_n(&field, __ATOMIC_RELAXED);
  while (cur < v && !__atomic_compare_exchange_n(&field, &cur, v, /*weak=*/true, __ATOMIC_RELAXED,
                                                 __ATOMIC_RELAXED)) {
  }
}
SimStats& St() { return *g_stats; }
SimDeviceStats& DevSt(int d) { return g_stats->device[d]; }

// ----------------------------------------------------------------------------------------------
// Configuration from the environment.

struct FailSpec {
  std::string name;
  uint64_t nth;
  CUresult code;
};

struct Config {
  std::vector<uint64_t> device_sizes;
  std::string uuid_salt;
  uint64_t op_delay_us = 0;
  bool race_abort = false;
  std::vector<FailSpec> fails;
  std::vector<std::pair<int, uint64_t>> lose;  // (device, calls before the loss)
  std::string error;                           // non-empty: the environment is invalid
};

std::vector<std::string_view> Split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  while (true) {
    const size_t p = s.find(sep);
    out.push_back(s.substr(0, p));
    if (p == std::string_view::npos) break;
    s.remove_prefix(p + 1);
  }
  return out;
}

std::optional<uint64_t> ParseUint(std::string_view s) {
  if (s.empty() || s.size() > 19) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  return v;
}

std::optional<uint64_t> ParseSize(std::string_view s) {
  size_t digits = 0;
  while (digits < s.size() && s[digits] >= '0' && s[digits] <= '9') ++digits;
  const std::optional<uint64_t> n = ParseUint(s.substr(0, digits));
  if (!n) return std::nullopt;
  const std::string_view suffix = s.substr(digits);
  int shift = 0;
  if (suffix.empty() || suffix == "B") {
    shift = 0;
  } else if (suffix == "KiB" || suffix == "K") {
    shift = 10;
  } else if (suffix == "MiB" || suffix == "M") {
    shift = 20;
  } else if (suffix == "GiB" || suffix == "G") {
    shift = 30;
  } else if (suffix == "TiB" || suffix == "T") {
    shift = 40;
  } else {
    return std::nullopt;
  }
  if (*n > (~uint64_t{0} >> shift)) return std::nullopt;
  return *n << shift;
}

std::optional<CUresult> ParseCode(std::string_view s) {
  for (const ErrorText& e : kErrors) {
    if (s == e.name) return e.code;
  }
  if (const std::optional<uint64_t> n = ParseUint(s); n && *n < 100000) {
    return static_cast<CUresult>(*n);
  }
  return std::nullopt;
}

Config ReadConfig() {
  Config c;
  auto env = [](const char* name) -> std::string_view {
    const char* v = std::getenv(name);
    return v != nullptr ? v : "";
  };
  auto bad = [&c](const char* var, std::string_view value, const char* rule) {
    if (c.error.empty()) {
      c.error = std::string(var) + "=\"" + std::string(value) + "\": " + rule;
    }
  };
  const std::string_view devices = env("WDSIM_DEVICES");
  if (devices.empty()) {
    c.device_sizes = {kDefaultDeviceBytes};
  } else if (const size_t x = devices.find('x'); x != std::string_view::npos) {
    const std::optional<uint64_t> n = ParseUint(devices.substr(0, x));
    const std::optional<uint64_t> size = ParseSize(devices.substr(x + 1));
    if (!n || !size || *n > kSimMaxDevices || *size == 0) {
      bad("WDSIM_DEVICES", devices, "expected COUNTxSIZE with COUNT <= 8, e.g. 2x8GiB");
    } else {
      c.device_sizes.assign(*n, *size);
    }
  } else {
    for (std::string_view part : Split(devices, ',')) {
      const std::optional<uint64_t> size = ParseSize(part);
      if (!size || *size == 0) {
        bad("WDSIM_DEVICES", devices, "expected a comma list of sizes, e.g. 8GiB,4GiB");
        break;
      }
      c.device_sizes.push_back(*size);
    }
    if (c.device_sizes.size() > kSimMaxDevices) {
      bad("WDSIM_DEVICES", devices, "at most 8 devices");
      c.device_sizes.resize(kSimMaxDevices);
    }
  }
  c.uuid_salt = std::string(env("WDSIM_UUID_SALT"));
  if (const std::string_view d = env("WDSIM_OP_DELAY_US"); !d.empty()) {
    const std::optional<uint64_t> us = ParseUint(d);
    if (!us) bad("WDSIM_OP_DELAY_US", d, "expected microseconds");
    c.op_delay_us = us.value_or(0);
  }
  c.race_abort = env("WDSIM_RACE_ABORT") == "1";
  if (const std::string_view f = env("WDSIM_FAIL"); !f.empty()) {
    for (std::string_view entry : Split(f, ',')) {
      const std::vector<std::string_view> p = Split(entry, ':');
      const std::optional<uint64_t> nth = p.size() == 3 ? ParseUint(p[1]) : std::nullopt;
      const std::optional<CUresult> code = p.size() == 3 ? ParseCode(p[2]) : std::nullopt;
      if (!nth || *nth == 0 || !code || p[0].empty()) {
        bad("WDSIM_FAIL", f, "expected NAME:N:CODE[,...] with N >= 1, CODE a CUDA_ERROR_* name");
        break;
      }
      c.fails.push_back({std::string(p[0]), *nth, *code});
    }
  }
  if (const std::string_view l = env("WDSIM_LOSE_DEVICE"); !l.empty()) {
    for (std::string_view entry : Split(l, ',')) {
      const std::vector<std::string_view> p = Split(entry, ':');
      const std::optional<uint64_t> dev = p.size() == 2 ? ParseUint(p[0]) : std::nullopt;
      const std::optional<uint64_t> n = p.size() == 2 ? ParseUint(p[1]) : std::nullopt;
      if (!dev || !n || *dev >= kSimMaxDevices) {
        bad("WDSIM_LOSE_DEVICE", l, "expected DEV:N[,...]");
        break;
      }
      c.lose.emplace_back(static_cast<int>(*dev), *n);
    }
  }
  return c;
}

// 64-bit hash of bytes, 8 at a time: fast enough to run over every async upload.
uint64_t HashBytes(const void* data, size_t n, uint64_t h = 0x9E3779B97F4A7C15ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  constexpr uint64_t kMul = 0xFF51AFD7ED558CCDull;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * kMul;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * kMul;
  h ^= h >> 32;
  return h ^ n;
}

// ----------------------------------------------------------------------------------------------
// Devices (each one is also its primary context: CUcontext points at the Device).

struct Device {
  int index = 0;
  uint64_t size = 0;
  CUuuid uuid{};
  int64_t lose_after = -1;           // calls before the loss; -1: never
  std::atomic<int64_t> ctx_refs{0};  // primary context references
  std::atomic<uint64_t> touches{0};  // calls and stream operations on this device
  std::atomic<bool> lost{false};
  std::atomic<uint64_t> allocated{0};  // bytes counted against `size`
};

Config* g_config = nullptr;
Device g_devices[kSimMaxDevices];
int g_device_count = 0;
std::atomic<bool> g_initialized{false};

thread_local Device* t_ctx = nullptr;
thread_local const char* t_call = "?";

void OpenStatsFile() {
  const char* dir = std::getenv("WDSIM_STATS_DIR");
  if (dir == nullptr || *dir == '\0') return;
  const std::string path = std::string(dir) + "/" + std::to_string(::getpid()) + ".stats";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::fprintf(stderr, "wdsim: cannot create %s: %s (counters stay in memory)\n", path.c_str(),
                 std::strerror(errno));
    return;
  }
  void* p = MAP_FAILED;
  if (::ftruncate(fd, sizeof(SimStats)) == 0) {
    p = ::mmap(nullptr, sizeof(SimStats), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "wdsim: cannot map %s: %s (counters stay in memory)\n", path.c_str(),
                 std::strerror(errno));
  } else {
    g_stats = static_cast<SimStats*>(p);
  }
  ::close(fd);
}

// Reads the environment and sets up devices and counters, once per process.
void LoadOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    g_config = new Config(ReadConfig());
    OpenStatsFile();
    g_device_count = static_cast<int>(g_config->device_sizes.size());
    for (int i = 0; i < g_device_count; ++i) {
      Device& d = g_devices[i];
      d.index = i;
      d.size = g_config->device_sizes[i];
      const std::string seed = g_config->uuid_salt + "/wdsim-gpu/" + std::to_string(i);
      const uint64_t a = HashBytes(seed.data(), seed.size(), 0x6A09E667F3BCC908ull);
      const uint64_t b = HashBytes(seed.data(), seed.size(), 0xBB67AE8584CAA73Bull);
      std::memcpy(d.uuid.bytes, &a, 8);
      std::memcpy(d.uuid.bytes + 8, &b, 8);
    }
    for (const auto& [dev, n] : g_config->lose) {
      if (dev < g_device_count) g_devices[dev].lose_after = static_cast<int64_t>(n);
    }
    StatStore(St().version, kSimStatsVersion);
    StatStore(St().pid, static_cast<uint64_t>(::getpid()));
    StatStore(St().device_count, static_cast<uint64_t>(g_device_count));
  });
}

// Records one call or operation on `d`; the device is lost once more than lose_after happened.
void Touch(Device& d) {
  const uint64_t n = d.touches.fetch_add(1, std::memory_order_relaxed) + 1;
  if (d.lose_after >= 0 && n > static_cast<uint64_t>(d.lose_after) && !d.lost.exchange(true)) {
    StatStore(DevSt(d.index).lost, 1);
    std::fprintf(stderr, "wdsim: device %d lost after %lld calls (WDSIM_LOSE_DEVICE)\n", d.index,
                 static_cast<long long>(d.lose_after));
  }
}

__attribute__((format(printf, 2, 3))) CUresult Misuse(CUresult code, const char* fmt, ...) {
  StatAdd(St().misuse, 1);
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "wdsim: misuse in %s: %s -> %s\n", t_call, msg, ErrorName(code));
  return code;
}

// Per entry point call counter, for WDSIM_FAIL.
struct EntryPoint {
  const char* name;
  std::atomic<uint64_t> calls{0};
};

CUresult Enter(EntryPoint& ep, bool need_init) {
  LoadOnce();
  t_call = ep.name;
  StatAdd(St().calls, 1);
  const uint64_t n = ep.calls.fetch_add(1, std::memory_order_relaxed) + 1;
  for (const FailSpec& f : g_config->fails) {
    if (f.nth == n && f.name == ep.name) {
      StatAdd(St().injected, 1);
      std::fprintf(stderr, "wdsim: injected %s into call %llu of %s\n", ErrorName(f.code),
                   static_cast<unsigned long long>(n), ep.name);
      return f.code;
    }
  }
  if (need_init && !g_initialized.load(std::memory_order_acquire)) {
    return CUDA_ERROR_NOT_INITIALIZED;
  }
  if (t_ctx != nullptr) Touch(*t_ctx);
  return CUDA_SUCCESS;
}

#define WDSIM_ENTER_IMPL(name, need_init) \
  static EntryPoint wdsim_ep{name};       \
  if (const CUresult wdsim_r = Enter(wdsim_ep, need_init); wdsim_r != CUDA_SUCCESS) return wdsim_r
// An entry point that needs cuInit first.
#define WDSIM_ENTER(name) WDSIM_ENTER_IMPL(name, true)

// The current context, or the error a real driver returns. `release` calls still work on a lost
// device so that callers can clean up.
CUresult CurrentCtx(Device** out, bool release = false) {
  Device* d = t_ctx;
  if (d == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_CONTEXT, "no current context (cuCtxSetCurrent first)");
  }
  if (d->ctx_refs.load(std::memory_order_relaxed) <= 0) {
    return Misuse(CUDA_ERROR_INVALID_CONTEXT,
                  "the current context of device %d has no primary-context reference left",
                  d->index);
  }
  if (!release && d->lost.load()) return CUDA_ERROR_DEVICE_UNAVAILABLE;
  *out = d;
  return CUDA_SUCCESS;
}

#define WDSIM_CTX(dev)   \
  Device* dev = nullptr; \
  if (const CUresult wdsim_c = CurrentCtx(&dev); wdsim_c != CUDA_SUCCESS) return wdsim_c
#define WDSIM_CTX_RELEASE(dev) \
  Device* dev = nullptr;       \
  if (const CUresult wdsim_c = CurrentCtx(&dev, true); wdsim_c != CUDA_SUCCESS) return wdsim_c

Device* DeviceAt(CUdevice d) { return d >= 0 && d < g_device_count ? &g_devices[d] : nullptr; }

// ----------------------------------------------------------------------------------------------
// Device memory.

// One physical allocation: a memfd plus the simulation's own read-write alias of it. Shared by the
// handle table, the mappings and queued operations, so it lives until the last of them is gone.
struct PhysAlloc {
  int device = 0;
  int fd = -1;
  size_t size = 0;
  char* alias = nullptr;
  bool counted = false;  // against the device size (cuMemCreate, cuMemAlloc; not imports)
  CUmemAllocationHandleType handle_types = CU_MEM_HANDLE_TYPE_NONE;

  PhysAlloc() = default;
  PhysAlloc(const PhysAlloc&) = delete;
  PhysAlloc& operator=(const PhysAlloc&) = delete;
  ~PhysAlloc() {
    if (alias != nullptr) ::munmap(alias, size);
    if (fd >= 0) ::close(fd);
    if (counted) {
      g_devices[device].allocated.fetch_sub(size);
      StatSub(DevSt(device).allocated_bytes, size);
    }
    StatSub(DevSt(device).allocations, 1);
  }
};

struct Mapping {
  size_t size = 0;
  std::shared_ptr<PhysAlloc> alloc;
  size_t offset = 0;
  uint64_t id = 0;  // unique per cuMemMap: queued operations check their mapping is still there
  CUmemAccess_flags access[kSimMaxDevices] = {};
};

struct Reservation {
  size_t size = 0;
  int device = 0;  // the context's device when reserved, for the per-device counter
};

// A byte range resolved to memory the simulation can touch: a host pointer (keep == nullptr) or
// a piece of a device allocation's alias.
struct Piece {
  char* ptr = nullptr;
  size_t len = 0;
  std::shared_ptr<PhysAlloc> keep;
  CUdeviceptr va = 0;
  uint64_t map_id = 0;
};
using Span = std::vector<Piece>;

Span HostSpan(const void* p, size_t n) {
  return {Piece{static_cast<char*>(const_cast<void*>(p)), n, nullptr, 0, 0}};
}

class Stream;
struct Event;

struct Module {
  int device;
};
struct Function {
  uint64_t module;
  int device;
};

// Everything with a handle. Handles are tagged integers (not pointers) so that a stale or forged
// handle is an error, not a crash.
struct State {
  absl::Mutex mu;
  uint64_t next_id ABSL_GUARDED_BY(mu) = 1;
  uint64_t next_map_id ABSL_GUARDED_BY(mu) = 1;
  std::map<uint64_t, std::shared_ptr<PhysAlloc>> handles ABSL_GUARDED_BY(mu);
  std::map<CUdeviceptr, Mapping> maps ABSL_GUARDED_BY(mu);
  std::map<CUdeviceptr, Reservation> reservations ABSL_GUARDED_BY(mu);
  std::map<CUdeviceptr, size_t> mem_allocs ABSL_GUARDED_BY(mu);  // cuMemAlloc base -> size
  std::map<uintptr_t, size_t> host_allocs ABSL_GUARDED_BY(mu);
  std::map<uintptr_t, size_t> host_regs ABSL_GUARDED_BY(mu);
  std::map<uint64_t, std::shared_ptr<Stream>> streams ABSL_GUARDED_BY(mu);
  std::map<uint64_t, std::shared_ptr<Event>> events ABSL_GUARDED_BY(mu);
  std::map<uint64_t, Module> modules ABSL_GUARDED_BY(mu);
  std::map<uint64_t, Function> functions ABSL_GUARDED_BY(mu);

  uint64_t NewId(uint64_t tag) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return (tag << 40) | next_id++; }
};

constexpr uint64_t kTagMem = 0x5D1;
constexpr uint64_t kTagStream = 0x5D2;
constexpr uint64_t kTagEvent = 0x5D3;
constexpr uint64_t kTagModule = 0x5D4;
constexpr uint64_t kTagFunction = 0x5D5;

// Leaked on purpose: stream threads may still run while static destructors do.
State& S() {
  static State* s = new State;
  return *s;
}

// The mapping containing `va`, or maps.end().
std::map<CUdeviceptr, Mapping>::iterator FindMapping(State& s, CUdeviceptr va)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  auto it = s.maps.upper_bound(va);
  if (it == s.maps.begin()) return s.maps.end();
  --it;
  return va < it->first + it->second.size ? it : s.maps.end();
}

// Resolves [va, va + n) for an access from `device`; `what` names the operand in messages.
CUresult Translate(State& s, CUdeviceptr va, size_t n, int device, bool write, const char* what,
                   Span* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  CUdeviceptr cur = va;
  const CUdeviceptr end = va + n;
  if (end < va) return Misuse(CUDA_ERROR_INVALID_VALUE, "%s range wraps around", what);
  while (cur < end) {
    auto it = FindMapping(s, cur);
    if (it == s.maps.end()) {
      return Misuse(CUDA_ERROR_INVALID_VALUE,
                    "%s range 0x%llx (+%zu bytes): byte 0x%llx is not mapped device memory", what,
                    static_cast<unsigned long long>(va), n, static_cast<unsigned long long>(cur));
    }
    const Mapping& m = it->second;
    const CUmemAccess_flags a = m.access[device];
    if (a == CU_MEM_ACCESS_FLAGS_PROT_NONE) {
      return Misuse(CUDA_ERROR_INVALID_VALUE,
                    "%s range 0x%llx (+%zu bytes) is mapped but not accessible from device %d "
                    "(no cuMemSetAccess)",
                    what, static_cast<unsigned long long>(va), n, device);
    }
    if (write && a != CU_MEM_ACCESS_FLAGS_PROT_READWRITE) {
      return Misuse(CUDA_ERROR_INVALID_VALUE,
                    "%s range 0x%llx (+%zu bytes) is read-only for device %d: write refused", what,
                    static_cast<unsigned long long>(va), n, device);
    }
    const size_t in = cur - it->first;
    const size_t len = std::min<size_t>(end - cur, m.size - in);
    out->push_back(Piece{m.alloc->alias + m.offset + in, len, m.alloc, cur, m.id});
    cur += len;
  }
  return CUDA_SUCCESS;
}

CUresult TranslateLocked(CUdeviceptr va, size_t n, int device, bool write, const char* what,
                         Span* out) {
  State& s = S();
  absl::MutexLock l(&s.mu);
  return Translate(s, va, n, device, write, what, out);
}

// At execution: every device piece must still be mapped as it was at enqueue (a real GPU would
// fault on memory unmapped under queued work).
CUresult StillMapped(const Span& span) {
  State& s = S();
  absl::MutexLock l(&s.mu);
  for (const Piece& p : span) {
    if (p.keep == nullptr) continue;
    auto it = FindMapping(s, p.va);
    if (it == s.maps.end() || it->second.id != p.map_id) {
      return Misuse(CUDA_ERROR_ILLEGAL_ADDRESS,
                    "device range 0x%llx (+%zu bytes) was unmapped before queued work used it",
                    static_cast<unsigned long long>(p.va), p.len);
    }
  }
  return CUDA_SUCCESS;
}

// memmove from `src` pieces to `dst` pieces (same total length).
void CopySpans(const Span& dst, const Span& src) {
  size_t di = 0, doff = 0, si = 0, soff = 0;
  while (di < dst.size() && si < src.size()) {
    const size_t n = std::min(dst[di].len - doff, src[si].len - soff);
    std::memmove(dst[di].ptr + doff, src[si].ptr + soff, n);
    doff += n;
    soff += n;
    if (doff == dst[di].len) ++di, doff = 0;
    if (soff == src[si].len) ++si, soff = 0;
  }
}

// A contiguous pointer to the span's bytes: the piece itself, or `tmp` gathered.
const char* Gather(const Span& span, size_t n, std::vector<char>& tmp) {
  if (span.size() == 1) return span[0].ptr;
  tmp.resize(n);
  CopySpans(HostSpan(tmp.data(), n), span);
  return tmp.data();
}

// ----------------------------------------------------------------------------------------------
// Streams.

using Op = std::function<CUresult()>;

// A FIFO of operations executed by one worker thread. Thread-safe.
class Stream {
 public:
  Stream(Device* device, unsigned flags) : device_(device), flags_(flags) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~Stream() { Shutdown(); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  Device* device() const { return device_; }
  bool blocking() const { return (flags_ & CU_STREAM_NON_BLOCKING) == 0; }

  // Returns the ticket of the operation (it has executed once Done(ticket)), or 0 when the stream
  // is being destroyed: the worker may be gone, so the operation would never complete.
  uint64_t Enqueue(Op op) {
    absl::MutexLock l(&mu_);
    if (stop_) return 0;
    q_.push_back(std::move(op));
    return ++enqueued_;
  }
  uint64_t Ticket() {
    absl::MutexLock l(&mu_);
    return enqueued_;
  }
  bool Done(uint64_t ticket) {
    absl::MutexLock l(&mu_);
    return completed_ >= ticket;
  }
  void WaitFor(uint64_t ticket) {
    TicketWait w{&completed_, ticket};
    absl::MutexLock l(&mu_);
    mu_.Await(absl::Condition(&TicketDone, &w));
  }
  void Drain() { WaitFor(Ticket()); }
  CUresult Sticky() {
    absl::MutexLock l(&mu_);
    return sticky_;
  }
  // Finishes queued work, then stops the thread. Idempotent.
  void Shutdown() {
    {
      absl::MutexLock l(&mu_);
      stop_ = true;
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct TicketWait {
    const uint64_t* completed;
    uint64_t ticket;
  };
  // Await conditions run with mu_ held.
  static bool TicketDone(TicketWait* w) { return *w->completed >= w->ticket; }
  static bool HasWork(Stream* s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return !s->q_.empty() || s->stop_;
  }

  void Loop() {
    const uint64_t delay_us = g_config->op_delay_us;
    while (true) {
      Op op;
      {
        absl::MutexLock l(&mu_);
        mu_.Await(absl::Condition(&HasWork, this));
        if (q_.empty()) return;
        op = std::move(q_.front());
        q_.pop_front();
      }
      if (delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
      bool skip;
      {
        absl::MutexLock l(&mu_);
        skip = sticky_ != CUDA_SUCCESS;
      }
      CUresult r = CUDA_SUCCESS;
      if (!skip) {
        t_call = "stream operation";
        Touch(*device_);
        r = device_->lost.load() ? CUDA_ERROR_DEVICE_UNAVAILABLE : op();
      }
      absl::MutexLock l(&mu_);
      if (r != CUDA_SUCCESS && sticky_ == CUDA_SUCCESS) sticky_ = r;
      ++completed_;
    }
  }

  Device* const device_;
  const unsigned flags_;
  absl::Mutex mu_;
  std::deque<Op> q_ ABSL_GUARDED_BY(mu_);
  uint64_t enqueued_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t completed_ ABSL_GUARDED_BY(mu_) = 0;
  CUresult sticky_ ABSL_GUARDED_BY(mu_) = CUDA_SUCCESS;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// The work an event stands for: for each stream, the ticket recorded.
using Deps = std::vector<std::pair<std::shared_ptr<Stream>, uint64_t>>;

struct Event {
  Device* device;
  Deps deps;  // guarded by State::mu
};

bool IsNullStream(CUstream s) {
  return s == nullptr || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD;
}

uint64_t HandleId(const void* h) { return reinterpret_cast<uintptr_t>(h); }

std::shared_ptr<Stream> FindStream(CUstream h) {
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.streams.find(HandleId(h));
  return it != s.streams.end() ? it->second : nullptr;
}

// The blocking streams of `d` with their current tickets: what the legacy stream waits for.
Deps BlockingDeps(Device* d) {
  State& s = S();
  absl::MutexLock l(&s.mu);
  Deps deps;
  for (auto& [id, st] : s.streams) {
    if (st->device() == d && st->blocking()) deps.emplace_back(st, st->Ticket());
  }
  return deps;
}

void WaitDeps(const Deps& deps) {
  for (const auto& [st, ticket] : deps) st->WaitFor(ticket);
}

// Runs `op` on stream `h` of context `d`: queued on a created stream, or, for the null/legacy/
// per-thread stream, synchronously after the context's blocking streams drained.
CUresult Submit(Device* d, CUstream h, Op op) {
  if (IsNullStream(h)) {
    WaitDeps(BlockingDeps(d));
    return op();
  }
  std::shared_ptr<Stream> st = FindStream(h);
  if (st == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "stream %p is not a live stream",
                  static_cast<void*>(h));
  }
  if (st->Enqueue(std::move(op)) == 0) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "stream %p is being destroyed", static_cast<void*>(h));
  }
  return CUDA_SUCCESS;
}

// The device whose access rights an operation on stream `h` uses.
CUresult StreamDevice(Device* ctx, CUstream h, Device** out) {
  if (IsNullStream(h)) {
    *out = ctx;
    return CUDA_SUCCESS;
  }
  std::shared_ptr<Stream> st = FindStream(h);
  if (st == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "stream %p is not a live stream",
                  static_cast<void*>(h));
  }
  *out = st->device();
  return CUDA_SUCCESS;
}

// Wraps a host->device copy so that a change of the host bytes between enqueue and execution is
// reported (compute-sanitizer's racecheck for DMA sources).
Op WithRaceCheck(CUstream h, const char* call, std::vector<std::pair<const char*, size_t>> rows,
                 Op op) {
  if (IsNullStream(h)) return op;  // executes before the call returns: no window
  uint64_t hash = 0;
  size_t total = 0;
  for (const auto& [p, n] : rows) hash = HashBytes(p, n, hash), total += n;
  return [rows = std::move(rows), hash, total, call, op = std::move(op)]() -> CUresult {
    uint64_t now = 0;
    for (const auto& [p, n] : rows) now = HashBytes(p, n, now);
    if (now != hash) {
      StatAdd(St().races, 1);
      std::fprintf(stderr,
                   "wdsim: RACE: host buffer %p (%zu bytes) changed between %s enqueue and "
                   "execution\n",
                   static_cast<const void*>(rows.front().first), total, call);
      if (g_config->race_abort) std::abort();
    }
    return op();
  };
}

// ----------------------------------------------------------------------------------------------
// Entry points: initialization, devices, contexts.

CUresult SimInit(unsigned int flags) {
  WDSIM_ENTER_IMPL("cuInit", false);
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  if (!g_config->error.empty()) {
    std::fprintf(stderr, "wdsim: cuInit: %s\n", g_config->error.c_str());
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (g_device_count == 0) return CUDA_ERROR_NO_DEVICE;
  g_initialized.store(true, std::memory_order_release);
  return CUDA_SUCCESS;
}

CUresult SimDriverGetVersion(int* version) {
  WDSIM_ENTER_IMPL("cuDriverGetVersion", false);
  if (version == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *version = kDriverVersion;
  return CUDA_SUCCESS;
}

CUresult SimGetErrorName(CUresult error, const char** str) {
  WDSIM_ENTER_IMPL("cuGetErrorName", false);
  if (str == nullptr) return CUDA_ERROR_INVALID_VALUE;
  const ErrorText* e = FindError(error);
  *str = e != nullptr ? e->name : nullptr;
  return e != nullptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult SimGetErrorString(CUresult error, const char** str) {
  WDSIM_ENTER_IMPL("cuGetErrorString", false);
  if (str == nullptr) return CUDA_ERROR_INVALID_VALUE;
  const ErrorText* e = FindError(error);
  *str = e != nullptr ? e->text : nullptr;
  return e != nullptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult SimDeviceGetCount(int* count) {
  WDSIM_ENTER("cuDeviceGetCount");
  if (count == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *count = g_device_count;
  return CUDA_SUCCESS;
}

CUresult SimDeviceGet(CUdevice* device, int ordinal) {
  WDSIM_ENTER("cuDeviceGet");
  if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (DeviceAt(ordinal) == nullptr) return CUDA_ERROR_INVALID_DEVICE;
  *device = ordinal;
  return CUDA_SUCCESS;
}

CUresult SimDeviceGetUuid(CUuuid* uuid, CUdevice dev) {
  WDSIM_ENTER("cuDeviceGetUuid");
  if (uuid == nullptr) return CUDA_ERROR_INVALID_VALUE;
  Device* d = DeviceAt(dev);
  if (d == nullptr) return CUDA_ERROR_INVALID_DEVICE;
  *uuid = d->uuid;
  return CUDA_SUCCESS;
}

CUresult SimDeviceGetName(char* name, int len, CUdevice dev) {
  WDSIM_ENTER("cuDeviceGetName");
  if (name == nullptr || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  if (DeviceAt(dev) == nullptr) return CUDA_ERROR_INVALID_DEVICE;
  std::snprintf(name, static_cast<size_t>(len), "weightd simulated GPU %d", dev);
  return CUDA_SUCCESS;
}

CUresult SimDeviceTotalMem(size_t* bytes, CUdevice dev) {
  WDSIM_ENTER("cuDeviceTotalMem");
  if (bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
  Device* d = DeviceAt(dev);
  if (d == nullptr) return CUDA_ERROR_INVALID_DEVICE;
  *bytes = d->size;
  return CUDA_SUCCESS;
}

CUresult SimDeviceGetAttribute(int* pi, CUdevice_attribute attrib, CUdevice dev) {
  WDSIM_ENTER("cuDeviceGetAttribute");
  if (pi == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (DeviceAt(dev) == nullptr) return CUDA_ERROR_INVALID_DEVICE;
  switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR:
      *pi = 9;
      break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR:
      *pi = 0;
      break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT:
      *pi = 132;
      break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK:
      *pi = 1024;
      break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE:
      *pi = 32;
      break;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING:
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED:
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED:
      *pi = 1;
      break;
    case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID:
      *pi = dev + 1;
      break;
    default:
      *pi = 0;
      break;
  }
  return CUDA_SUCCESS;
}

CUresult SimDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
  WDSIM_ENTER("cuDevicePrimaryCtxRetain");
  if (pctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
  Device* d = DeviceAt(dev);
  if (d == nullptr) return CUDA_ERROR_INVALID_DEVICE;
  if (d->lost.load()) return CUDA_ERROR_DEVICE_UNAVAILABLE;
  d->ctx_refs.fetch_add(1);
  StatAdd(DevSt(dev).primary_ctx_refs, 1);
  *pctx = reinterpret_cast<CUcontext>(d);
  return CUDA_SUCCESS;
}

CUresult SimDevicePrimaryCtxRelease(CUdevice dev) {
  WDSIM_ENTER("cuDevicePrimaryCtxRelease");
  Device* d = DeviceAt(dev);
  if (d == nullptr) return CUDA_ERROR_INVALID_DEVICE;
  int64_t refs = d->ctx_refs.load();
  do {
    if (refs <= 0) {
      return Misuse(CUDA_ERROR_INVALID_CONTEXT,
                    "device %d's primary context released more often than retained", dev);
    }
  } while (!d->ctx_refs.compare_exchange_weak(refs, refs - 1));
  StatSub(DevSt(dev).primary_ctx_refs, 1);
  return CUDA_SUCCESS;
}

Device* ContextDevice(CUcontext ctx) {
  for (int i = 0; i < g_device_count; ++i) {
    if (reinterpret_cast<CUcontext>(&g_devices[i]) == ctx) return &g_devices[i];
  }
  return nullptr;
}

CUresult SimCtxSetCurrent(CUcontext ctx) {
  WDSIM_ENTER("cuCtxSetCurrent");
  if (ctx == nullptr) {
    t_ctx = nullptr;
    return CUDA_SUCCESS;
  }
  Device* d = ContextDevice(ctx);
  if (d == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_CONTEXT, "%p is not a context", static_cast<void*>(ctx));
  }
  t_ctx = d;
  return CUDA_SUCCESS;
}

CUresult SimCtxGetCurrent(CUcontext* pctx) {
  WDSIM_ENTER("cuCtxGetCurrent");
  if (pctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *pctx = reinterpret_cast<CUcontext>(t_ctx);
  return CUDA_SUCCESS;
}

CUresult SimCtxGetDevice(CUdevice* device) {
  WDSIM_ENTER("cuCtxGetDevice");
  if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
  WDSIM_CTX(d);
  *device = d->index;
  return CUDA_SUCCESS;
}

CUresult SimCtxSynchronize() {
  WDSIM_ENTER("cuCtxSynchronize");
  WDSIM_CTX(d);
  std::vector<std::shared_ptr<Stream>> streams;
  {
    State& s = S();
    absl::MutexLock l(&s.mu);
    for (auto& [id, st] : s.streams) {
      if (st->device() == d) streams.push_back(st);
    }
  }
  CUresult first = CUDA_SUCCESS;
  for (auto& st : streams) {
    st->Drain();
    if (first == CUDA_SUCCESS) first = st->Sticky();
  }
  if (d->lost.load()) return CUDA_ERROR_DEVICE_UNAVAILABLE;
  return first;
}

// ----------------------------------------------------------------------------------------------
// Entry points: virtual memory management.

CUresult SimMemGetInfo(size_t* free, size_t* total) {
  WDSIM_ENTER("cuMemGetInfo");
  if (free == nullptr || total == nullptr) return CUDA_ERROR_INVALID_VALUE;
  WDSIM_CTX(d);
  *total = d->size;
  *free = d->size - std::min<uint64_t>(d->size, d->allocated.load());
  return CUDA_SUCCESS;
}

CUresult CheckProp(const CUmemAllocationProp* prop) {
  if (prop == nullptr) return Misuse(CUDA_ERROR_INVALID_VALUE, "prop is null");
  if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
      prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
      DeviceAt(prop->location.id) == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_VALUE,
                  "prop must be CU_MEM_ALLOCATION_TYPE_PINNED on a device location with a valid "
                  "id (type %d, location type %d, id %d)",
                  prop->type, prop->location.type, prop->location.id);
  }
  return CUDA_SUCCESS;
}

CUresult SimMemGetAllocationGranularity(size_t* granularity, const CUmemAllocationProp* prop,
                                        CUmemAllocationGranularity_flags option) {
  WDSIM_ENTER("cuMemGetAllocationGranularity");
  if (granularity == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (const CUresult r = CheckProp(prop); r != CUDA_SUCCESS) return r;
  *granularity = kGranularity;
  return CUDA_SUCCESS;
}

// A memfd of `size` bytes on `device` with its alias mapping, counted against the device size
// when `counted`.
CUresult NewPhysAlloc(int device, size_t size, bool counted, const char* name,
                      std::shared_ptr<PhysAlloc>* out) {
  Device& d = g_devices[device];
  if (counted) {
    uint64_t cur = d.allocated.load();
    do {
      if (cur + size > d.size) return CUDA_ERROR_OUT_OF_MEMORY;
    } while (!d.allocated.compare_exchange_weak(cur, cur + size));
  }
  auto a = std::make_shared<PhysAlloc>();
  a->device = device;
  a->size = size;
  a->counted = counted;
  StatAdd(DevSt(device).allocations, 1);
  if (counted) StatAdd(DevSt(device).allocated_bytes, size);
  a->fd = ::memfd_create(name, MFD_CLOEXEC);
  if (a->fd < 0 || ::ftruncate(a->fd, static_cast<off_t>(size)) != 0) {
    std::fprintf(stderr, "wdsim: memfd of %zu bytes: %s\n", size, std::strerror(errno));
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, a->fd, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  a->alias = static_cast<char*>(p);
  *out = std::move(a);
  return CUDA_SUCCESS;
}

CUresult SimMemCreate(CUmemGenericAllocationHandle* handle, size_t size,
                      const CUmemAllocationProp* prop, unsigned long long flags) {
  WDSIM_ENTER("cuMemCreate");
  WDSIM_CTX(ctx);
  if (handle == nullptr || flags != 0) return CUDA_ERROR_INVALID_VALUE;
  if (const CUresult r = CheckProp(prop); r != CUDA_SUCCESS) return r;
  if (size == 0 || size % kGranularity != 0) {
    return Misuse(CUDA_ERROR_INVALID_VALUE,
                  "size %zu is not a positive multiple of the 2 MiB granularity", size);
  }
  const int dev = prop->location.id;
  if (g_devices[dev].lost.load()) return CUDA_ERROR_DEVICE_UNAVAILABLE;
  std::shared_ptr<PhysAlloc> a;
  const std::string name = "wdsim-dev" + std::to_string(dev);
  if (const CUresult r = NewPhysAlloc(dev, size, true, name.c_str(), &a); r != CUDA_SUCCESS) {
    return r;
  }
  a->handle_types = prop->requestedHandleTypes;
  State& s = S();
  absl::MutexLock l(&s.mu);
  const uint64_t id = s.NewId(kTagMem);
  s.handles.emplace(id, std::move(a));
  *handle = id;
  return CUDA_SUCCESS;
}

CUresult SimMemRelease(CUmemGenericAllocationHandle handle) {
  WDSIM_ENTER("cuMemRelease");
  std::shared_ptr<PhysAlloc> a;  // destroyed (if last) after the lock is dropped
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.handles.find(handle);
  if (it == s.handles.end()) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "0x%llx is not a live allocation handle", handle);
  }
  a = std::move(it->second);
  s.handles.erase(it);
  return CUDA_SUCCESS;
}

CUresult SimMemAddressReserve(CUdeviceptr* ptr, size_t size, size_t alignment, CUdeviceptr addr,
                              unsigned long long flags) {
  WDSIM_ENTER("cuMemAddressReserve");
  WDSIM_CTX(d);
  if (ptr == nullptr || size == 0 || size % kGranularity != 0 ||
      (alignment & (alignment - 1)) != 0) {
    return Misuse(CUDA_ERROR_INVALID_VALUE,
                  "size %zu must be a positive multiple of 2 MiB, alignment %zu a power of two",
                  size, alignment);
  }
  // Real VA ranges are aligned to at least the granularity: over-reserve, then trim.
  const size_t align = std::max(alignment, kGranularity);
  const size_t span = size + align;
  void* p = ::mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  const uintptr_t raw = reinterpret_cast<uintptr_t>(p);
  const uintptr_t base = (raw + align - 1) & ~(uintptr_t{align} - 1);
  if (base > raw) ::munmap(p, base - raw);
  if (raw + span > base + size)
    ::munmap(reinterpret_cast<void*>(base + size), raw + span - base - size);
  State& s = S();
  absl::MutexLock l(&s.mu);
  s.reservations.emplace(base, Reservation{size, d->index});
  StatAdd(DevSt(d->index).reserved_ranges, 1);
  *ptr = base;
  return CUDA_SUCCESS;
}

CUresult SimMemAddressFree(CUdeviceptr ptr, size_t size) {
  WDSIM_ENTER("cuMemAddressFree");
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.reservations.find(ptr);
  if (it == s.reservations.end() || it->second.size != size) {
    return Misuse(CUDA_ERROR_INVALID_VALUE,
                  "0x%llx (+%zu bytes) is not a range returned by cuMemAddressReserve",
                  static_cast<unsigned long long>(ptr), size);
  }
  auto m = s.maps.lower_bound(ptr);
  if (m != s.maps.end() && m->first < ptr + size) {
    return Misuse(CUDA_ERROR_INVALID_VALUE,
                  "0x%llx (+%zu bytes) still has mappings: cuMemUnmap them first",
                  static_cast<unsigned long long>(ptr), size);
  }
  ::munmap(reinterpret_cast<void*>(ptr), size);
  StatSub(DevSt(it->second.device).reserved_ranges, 1);
  s.reservations.erase(it);
  return CUDA_SUCCESS;
}

// The reservation containing [ptr, ptr + size), or end().
std::map<CUdeviceptr, Reservation>::iterator FindReservation(State& s, CUdeviceptr ptr, size_t size)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  auto it = s.reservations.upper_bound(ptr);
  if (it == s.reservations.begin()) return s.reservations.end();
  --it;
  return ptr + size <= it->first + it->second.size ? it : s.reservations.end();
}

CUresult MapLocked(State& s, CUdeviceptr ptr, size_t size, size_t offset,
                   const std::shared_ptr<PhysAlloc>& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  if (size == 0 || size % kGranularity != 0 || offset % kGranularity != 0 ||
      offset + size > a->size || ptr % kGranularity != 0) {
    return Misuse(CUDA_ERROR_INVALID_VALUE,
                  "map of 0x%llx (+%zu bytes) at offset %zu of a %zu-byte allocation: sizes and "
                  "offsets must be 2 MiB multiples inside the allocation",
                  static_cast<unsigned long long>(ptr), size, offset, a->size);
  }
  if (FindReservation(s, ptr, size) == s.reservations.end()) {
    return Misuse(CUDA_ERROR_INVALID_VALUE,
                  "0x%llx (+%zu bytes) is not inside a cuMemAddressReserve range",
                  static_cast<unsigned long long>(ptr), size);
  }
  auto next = s.maps.lower_bound(ptr);
  const bool overlaps =
      FindMapping(s, ptr) != s.maps.end() || (next != s.maps.end() && next->first < ptr + size);
  if (overlaps) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "0x%llx (+%zu bytes) overlaps an existing mapping",
                  static_cast<unsigned long long>(ptr), size);
  }
  // Device memory is not host-accessible: PROT_NONE, so a host dereference faults.
  void* p = ::mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE, MAP_SHARED | MAP_FIXED, a->fd,
                   static_cast<off_t>(offset));
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "wdsim: mmap of the device range: %s\n", std::strerror(errno));
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  Mapping m;
  m.size = size;
  m.alloc = a;
  m.offset = offset;
  m.id = s.next_map_id++;
  s.maps.emplace(ptr, std::move(m));
  StatAdd(DevSt(a->device).mappings, 1);
  return CUDA_SUCCESS;
}

CUresult SimMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                   unsigned long long flags) {
  WDSIM_ENTER("cuMemMap");
  WDSIM_CTX(d);
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto h = s.handles.find(handle);
  if (h == s.handles.end()) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "0x%llx is not a live allocation handle", handle);
  }
  if (g_devices[h->second->device].lost.load()) return CUDA_ERROR_DEVICE_UNAVAILABLE;
  return MapLocked(s, ptr, size, offset, h->second);
}

// Removes whole mappings covering exactly [ptr, ptr + size).
CUresult UnmapLocked(State& s, CUdeviceptr ptr, size_t size,
                     std::vector<std::shared_ptr<PhysAlloc>>* dropped)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  CUdeviceptr cur = ptr;
  auto it = s.maps.find(ptr);
  while (cur < ptr + size) {
    if (it == s.maps.end() || it->first != cur || cur + it->second.size > ptr + size) {
      return Misuse(CUDA_ERROR_INVALID_VALUE,
                    "0x%llx (+%zu bytes) is not a union of whole cuMemMap ranges",
                    static_cast<unsigned long long>(ptr), size);
    }
    cur += it->second.size;
    ++it;
  }
  if (size == 0) return Misuse(CUDA_ERROR_INVALID_VALUE, "size 0");
  for (it = s.maps.find(ptr); it != s.maps.end() && it->first < ptr + size;) {
    // Back to a bare reservation: PROT_NONE anonymous memory over the range.
    ::mmap(reinterpret_cast<void*>(it->first), it->second.size, PROT_NONE,
           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    StatSub(DevSt(it->second.alloc->device).mappings, 1);
    dropped->push_back(std::move(it->second.alloc));
    it = s.maps.erase(it);
  }
  return CUDA_SUCCESS;
}

CUresult SimMemUnmap(CUdeviceptr ptr, size_t size) {
  WDSIM_ENTER("cuMemUnmap");
  std::vector<std::shared_ptr<PhysAlloc>> dropped;  // freed after the lock is dropped
  State& s = S();
  absl::MutexLock l(&s.mu);
  return UnmapLocked(s, ptr, size, &dropped);
}

CUresult SimMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc* desc, size_t count) {
  WDSIM_ENTER("cuMemSetAccess");
  WDSIM_CTX(d);
  if (desc == nullptr || count == 0) return CUDA_ERROR_INVALID_VALUE;
  for (size_t i = 0; i < count; ++i) {
    if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
        DeviceAt(desc[i].location.id) == nullptr ||
        (desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_NONE &&
         desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READ &&
         desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE)) {
      return Misuse(CUDA_ERROR_INVALID_VALUE, "access descriptor %zu is invalid", i);
    }
  }
  State& s = S();
  absl::MutexLock l(&s.mu);
  CUdeviceptr cur = ptr;
  for (auto it = s.maps.find(ptr); cur < ptr + size; ++it) {
    if (it == s.maps.end() || it->first != cur || cur + it->second.size > ptr + size) {
      return Misuse(CUDA_ERROR_INVALID_VALUE,
                    "0x%llx (+%zu bytes) is not a union of whole mapped ranges",
                    static_cast<unsigned long long>(ptr), size);
    }
    cur += it->second.size;
  }
  if (size == 0) return Misuse(CUDA_ERROR_INVALID_VALUE, "size 0");
  for (auto it = s.maps.find(ptr); it != s.maps.end() && it->first < ptr + size; ++it) {
    for (size_t i = 0; i < count; ++i) it->second.access[desc[i].location.id] = desc[i].flags;
  }
  return CUDA_SUCCESS;
}

CUresult SimMemExportToShareableHandle(void* shareable, CUmemGenericAllocationHandle handle,
                                       CUmemAllocationHandleType type, unsigned long long flags) {
  WDSIM_ENTER("cuMemExportToShareableHandle");
  WDSIM_CTX(d);
  if (shareable == nullptr || flags != 0) return CUDA_ERROR_INVALID_VALUE;
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto h = s.handles.find(handle);
  if (h == s.handles.end()) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "0x%llx is not a live allocation handle", handle);
  }
  if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR ||
      (h->second->handle_types & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) == 0) {
    return Misuse(CUDA_ERROR_INVALID_VALUE,
                  "export as type %d: the allocation was not created with "
                  "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR in requestedHandleTypes",
                  type);
  }
  if (g_devices[h->second->device].lost.load()) return CUDA_ERROR_DEVICE_UNAVAILABLE;
  const int fd = ::fcntl(h->second->fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return CUDA_ERROR_OPERATING_SYSTEM;
  *static_cast<int*>(shareable) = fd;
  return CUDA_SUCCESS;
}

CUresult SimMemImportFromShareableHandle(CUmemGenericAllocationHandle* handle, void* os_handle,
                                         CUmemAllocationHandleType type) {
  WDSIM_ENTER("cuMemImportFromShareableHandle");
  WDSIM_CTX(ctx);
  if (handle == nullptr || type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  const int fd = static_cast<int>(reinterpret_cast<intptr_t>(os_handle));
  char target[256] = {};
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(link.c_str(), target, sizeof(target) - 1);
  const char* tag = n > 0 ? std::strstr(target, "wdsim-dev") : nullptr;
  struct stat st {};
  if (tag == nullptr || ::fstat(fd, &st) != 0) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "fd %d is not an exported simulated allocation (%s)",
                  fd, n > 0 ? target : "not an open fd");
  }
  const int dev = std::atoi(tag + std::strlen("wdsim-dev"));
  if (DeviceAt(dev) == nullptr || st.st_size <= 0 || st.st_size % kGranularity != 0) {
    return Misuse(CUDA_ERROR_INVALID_VALUE,
                  "fd %d is an allocation of device %d (%lld bytes), which this process lacks", fd,
                  dev, static_cast<long long>(st.st_size));
  }
  if (g_devices[dev].lost.load()) return CUDA_ERROR_DEVICE_UNAVAILABLE;
  auto a = std::make_shared<PhysAlloc>();
  a->device = dev;
  a->size = static_cast<size_t>(st.st_size);
  a->handle_types = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  StatAdd(DevSt(dev).allocations, 1);
  a->fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (a->fd < 0) return CUDA_ERROR_OPERATING_SYSTEM;
  void* p = ::mmap(nullptr, a->size, PROT_READ | PROT_WRITE, MAP_SHARED, a->fd, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  a->alias = static_cast<char*>(p);
  State& s = S();
  absl::MutexLock l(&s.mu);
  const uint64_t id = s.NewId(kTagMem);
  s.handles.emplace(id, std::move(a));
  *handle = id;
  return CUDA_SUCCESS;
}

CUresult SimMemGetAllocationPropertiesFromHandle(CUmemAllocationProp* prop,
                                                 CUmemGenericAllocationHandle handle) {
  WDSIM_ENTER("cuMemGetAllocationPropertiesFromHandle");
  if (prop == nullptr) return CUDA_ERROR_INVALID_VALUE;
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto h = s.handles.find(handle);
  if (h == s.handles.end()) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "0x%llx is not a live allocation handle", handle);
  }
  *prop = CUmemAllocationProp{};
  prop->type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop->requestedHandleTypes = h->second->handle_types;
  prop->location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop->location.id = h->second->device;
  return CUDA_SUCCESS;
}

CUresult SimMemAlloc(CUdeviceptr* dptr, size_t bytes) {
  WDSIM_ENTER("cuMemAlloc");
  WDSIM_CTX(d);
  if (dptr == nullptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  const size_t size = (bytes + kGranularity - 1) / kGranularity * kGranularity;
  std::shared_ptr<PhysAlloc> a;
  if (const CUresult r = NewPhysAlloc(d->index, size, true, "wdsim-alloc", &a); r != CUDA_SUCCESS) {
    return r;
  }
  void* p = ::mmap(nullptr, size + kGranularity, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  const uintptr_t raw = reinterpret_cast<uintptr_t>(p);
  const uintptr_t base = (raw + kGranularity - 1) & ~(uintptr_t{kGranularity} - 1);
  if (base > raw) ::munmap(p, base - raw);
  if (raw + size + kGranularity > base + size) {
    ::munmap(reinterpret_cast<void*>(base + size), raw + kGranularity - base);
  }
  State& s = S();
  absl::MutexLock l(&s.mu);
  s.reservations.emplace(base, Reservation{size, d->index});
  StatAdd(DevSt(d->index).reserved_ranges, 1);
  if (const CUresult r = MapLocked(s, base, size, 0, a); r != CUDA_SUCCESS) {
    StatSub(DevSt(d->index).reserved_ranges, 1);
    s.reservations.erase(base);
    ::munmap(reinterpret_cast<void*>(base), size);
    return r;
  }
  for (CUmemAccess_flags& f : s.maps[base].access) f = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  s.mem_allocs.emplace(base, size);
  *dptr = base;
  return CUDA_SUCCESS;
}

CUresult SimMemFree(CUdeviceptr dptr) {
  WDSIM_ENTER("cuMemFree");
  WDSIM_CTX_RELEASE(d);
  std::vector<std::shared_ptr<PhysAlloc>> dropped;
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.mem_allocs.find(dptr);
  if (it == s.mem_allocs.end()) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "0x%llx was not returned by cuMemAlloc",
                  static_cast<unsigned long long>(dptr));
  }
  const size_t size = it->second;
  s.mem_allocs.erase(it);
  UnmapLocked(s, dptr, size, &dropped);
  auto r = s.reservations.find(dptr);
  if (r != s.reservations.end()) {
    StatSub(DevSt(r->second.device).reserved_ranges, 1);
    s.reservations.erase(r);
  }
  ::munmap(reinterpret_cast<void*>(dptr), size);
  return CUDA_SUCCESS;
}

// ----------------------------------------------------------------------------------------------
// Entry points: host memory.

void PinnedAdd(size_t n) {
  const uint64_t now = __atomic_add_fetch(&St().pinned_bytes, n, __ATOMIC_RELAXED);
  StatRaiseTo(St().pinned_peak, now);
}

CUresult SimMemHostAlloc(void** pp, size_t bytes, unsigned int flags) {
  WDSIM_ENTER("cuMemHostAlloc");
  WDSIM_CTX(d);
  if (pp == nullptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  State& s = S();
  absl::MutexLock l(&s.mu);
  s.host_allocs.emplace(reinterpret_cast<uintptr_t>(p), bytes);
  PinnedAdd(bytes);
  *pp = p;
  return CUDA_SUCCESS;
}

CUresult SimMemFreeHost(void* p) {
  WDSIM_ENTER("cuMemFreeHost");
  WDSIM_CTX_RELEASE(d);
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.host_allocs.find(reinterpret_cast<uintptr_t>(p));
  if (it == s.host_allocs.end()) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "%p was not returned by cuMemHostAlloc", p);
  }
  ::munmap(p, it->second);
  StatSub(St().pinned_bytes, it->second);
  s.host_allocs.erase(it);
  return CUDA_SUCCESS;
}

CUresult SimMemHostRegister(void* p, size_t bytes, unsigned int flags) {
  WDSIM_ENTER("cuMemHostRegister");
  WDSIM_CTX(d);
  if (p == nullptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto next = s.host_regs.lower_bound(b);
  const bool overlaps_next = next != s.host_regs.end() && next->first < b + bytes;
  const bool overlaps_prev =
      next != s.host_regs.begin() && std::prev(next)->first + std::prev(next)->second > b;
  if (overlaps_next || overlaps_prev) {
    return Misuse(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED,
                  "%p (+%zu bytes) overlaps a registered range", p, bytes);
  }
  s.host_regs.emplace(b, bytes);
  PinnedAdd(bytes);
  return CUDA_SUCCESS;
}

CUresult SimMemHostUnregister(void* p) {
  WDSIM_ENTER("cuMemHostUnregister");
  WDSIM_CTX_RELEASE(d);
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.host_regs.find(reinterpret_cast<uintptr_t>(p));
  if (it == s.host_regs.end()) {
    return Misuse(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED,
                  "%p is not the start of a cuMemHostRegister range", p);
  }
  StatSub(St().pinned_bytes, it->second);
  s.host_regs.erase(it);
  return CUDA_SUCCESS;
}

// ----------------------------------------------------------------------------------------------
// Entry points: copies and memsets.

// An operation that checks its device pieces at execution, then copies.
Op CopyOp(Span dst, Span src) {
  return [dst = std::move(dst), src = std::move(src)]() -> CUresult {
    if (CUresult r = StillMapped(dst); r != CUDA_SUCCESS) return r;
    if (CUresult r = StillMapped(src); r != CUDA_SUCCESS) return r;
    CopySpans(dst, src);
    return CUDA_SUCCESS;
  };
}

CUresult CopyHtoD(CUdeviceptr dst, const void* src, size_t n, CUstream h, const char* call) {
  WDSIM_CTX(d);
  Device* sd = nullptr;
  if (CUresult r = StreamDevice(d, h, &sd); r != CUDA_SUCCESS) return r;
  if (src == nullptr && n > 0) return Misuse(CUDA_ERROR_INVALID_VALUE, "null host source");
  Span dspan;
  if (CUresult r = TranslateLocked(dst, n, sd->index, true, "destination", &dspan);
      r != CUDA_SUCCESS) {
    return r;
  }
  Op op = CopyOp(std::move(dspan), HostSpan(src, n));
  return Submit(d, h, WithRaceCheck(h, call, {{static_cast<const char*>(src), n}}, std::move(op)));
}

CUresult CopyDtoH(void* dst, CUdeviceptr src, size_t n, CUstream h) {
  WDSIM_CTX(d);
  Device* sd = nullptr;
  if (CUresult r = StreamDevice(d, h, &sd); r != CUDA_SUCCESS) return r;
  if (dst == nullptr && n > 0) return Misuse(CUDA_ERROR_INVALID_VALUE, "null host destination");
  Span sspan;
  if (CUresult r = TranslateLocked(src, n, sd->index, false, "source", &sspan); r != CUDA_SUCCESS) {
    return r;
  }
  return Submit(d, h, CopyOp(HostSpan(dst, n), std::move(sspan)));
}

CUresult CopyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h) {
  WDSIM_CTX(d);
  Device* sd = nullptr;
  if (CUresult r = StreamDevice(d, h, &sd); r != CUDA_SUCCESS) return r;
  Span dspan, sspan;
  if (CUresult r = TranslateLocked(src, n, sd->index, false, "source", &sspan); r != CUDA_SUCCESS) {
    return r;
  }
  if (CUresult r = TranslateLocked(dst, n, sd->index, true, "destination", &dspan);
      r != CUDA_SUCCESS) {
    return r;
  }
  return Submit(d, h, CopyOp(std::move(dspan), std::move(sspan)));
}

CUresult SimMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
  WDSIM_ENTER("cuMemcpyHtoD");
  return CopyHtoD(dst, src, n, nullptr, "cuMemcpyHtoD");
}
CUresult SimMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
  WDSIM_ENTER("cuMemcpyDtoH");
  return CopyDtoH(dst, src, n, nullptr);
}
CUresult SimMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  WDSIM_ENTER("cuMemcpyDtoD");
  return CopyDtoD(dst, src, n, nullptr);
}
CUresult SimMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream h) {
  WDSIM_ENTER("cuMemcpyHtoDAsync");
  return CopyHtoD(dst, src, n, h, "cuMemcpyHtoDAsync");
}
CUresult SimMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, CUstream h) {
  WDSIM_ENTER("cuMemcpyDtoHAsync");
  return CopyDtoH(dst, src, n, h);
}
CUresult SimMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h) {
  WDSIM_ENTER("cuMemcpyDtoDAsync");
  return CopyDtoD(dst, src, n, h);
}

bool IsHostType(CUmemorytype t) { return t == CU_MEMORYTYPE_HOST; }
bool IsDeviceType(CUmemorytype t) {
  return t == CU_MEMORYTYPE_DEVICE || t == CU_MEMORYTYPE_UNIFIED;
}

CUresult Copy2D(const CUDA_MEMCPY2D* c, CUstream h, const char* call) {
  WDSIM_CTX(d);
  Device* sd = nullptr;
  if (CUresult r = StreamDevice(d, h, &sd); r != CUDA_SUCCESS) return r;
  if (c == nullptr) return CUDA_ERROR_INVALID_VALUE;
  const bool src_host = IsHostType(c->srcMemoryType);
  const bool dst_host = IsHostType(c->dstMemoryType);
  if ((!src_host && !IsDeviceType(c->srcMemoryType)) ||
      (!dst_host && !IsDeviceType(c->dstMemoryType))) {
    return Misuse(CUDA_ERROR_NOT_SUPPORTED, "2-D copies support host and device memory only");
  }
  const size_t w = c->WidthInBytes;
  if ((c->Height > 1 && (c->srcPitch < w || c->dstPitch < w))) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "pitch (src %zu, dst %zu) below WidthInBytes %zu",
                  c->srcPitch, c->dstPitch, w);
  }
  Span dst, src;
  std::vector<std::pair<const char*, size_t>> host_rows;
  for (size_t y = 0; y < c->Height && w > 0; ++y) {
    const size_t soff = (c->srcY + y) * c->srcPitch + c->srcXInBytes;
    const size_t doff = (c->dstY + y) * c->dstPitch + c->dstXInBytes;
    if (src_host) {
      const char* p = static_cast<const char*>(c->srcHost) + soff;
      if (c->srcHost == nullptr) return Misuse(CUDA_ERROR_INVALID_VALUE, "null srcHost");
      src.push_back(Piece{const_cast<char*>(p), w, nullptr, 0, 0});
      host_rows.emplace_back(p, w);
    } else if (CUresult r =
                   TranslateLocked(c->srcDevice + soff, w, sd->index, false, "source", &src);
               r != CUDA_SUCCESS) {
      return r;
    }
    if (dst_host) {
      if (c->dstHost == nullptr) return Misuse(CUDA_ERROR_INVALID_VALUE, "null dstHost");
      dst.push_back(Piece{static_cast<char*>(c->dstHost) + doff, w, nullptr, 0, 0});
    } else if (CUresult r =
                   TranslateLocked(c->dstDevice + doff, w, sd->index, true, "destination", &dst);
               r != CUDA_SUCCESS) {
      return r;
    }
  }
  Op op = CopyOp(std::move(dst), std::move(src));
  if (src_host && !dst_host && !host_rows.empty()) {
    op = WithRaceCheck(h, call, std::move(host_rows), std::move(op));
  }
  return Submit(d, h, std::move(op));
}

CUresult SimMemcpy2D(const CUDA_MEMCPY2D* c) {
  WDSIM_ENTER("cuMemcpy2D");
  return Copy2D(c, nullptr, "cuMemcpy2D");
}
CUresult SimMemcpy2DAsync(const CUDA_MEMCPY2D* c, CUstream h) {
  WDSIM_ENTER("cuMemcpy2DAsync");
  return Copy2D(c, h, "cuMemcpy2DAsync");
}

CUresult Memset(CUdeviceptr dst, unsigned char value, size_t n, CUstream h) {
  WDSIM_CTX(d);
  Device* sd = nullptr;
  if (CUresult r = StreamDevice(d, h, &sd); r != CUDA_SUCCESS) return r;
  Span dspan;
  if (CUresult r = TranslateLocked(dst, n, sd->index, true, "destination", &dspan);
      r != CUDA_SUCCESS) {
    return r;
  }
  return Submit(d, h, [dspan = std::move(dspan), value]() -> CUresult {
    if (CUresult r = StillMapped(dspan); r != CUDA_SUCCESS) return r;
    for (const Piece& p : dspan) std::memset(p.ptr, value, p.len);
    return CUDA_SUCCESS;
  });
}

CUresult SimMemsetD8(CUdeviceptr dst, unsigned char value, size_t n) {
  WDSIM_ENTER("cuMemsetD8");
  return Memset(dst, value, n, nullptr);
}
CUresult SimMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream h) {
  WDSIM_ENTER("cuMemsetD8Async");
  return Memset(dst, value, n, h);
}

// ----------------------------------------------------------------------------------------------
// Entry points: streams and events.

CUresult SimStreamCreate(CUstream* ph, unsigned int flags) {
  WDSIM_ENTER("cuStreamCreate");
  WDSIM_CTX(d);
  if (ph == nullptr || (flags & ~CU_STREAM_NON_BLOCKING) != 0) return CUDA_ERROR_INVALID_VALUE;
  auto st = std::make_shared<Stream>(d, flags);
  State& s = S();
  absl::MutexLock l(&s.mu);
  const uint64_t id = s.NewId(kTagStream);
  s.streams.emplace(id, std::move(st));
  StatAdd(DevSt(d->index).streams, 1);
  *ph = reinterpret_cast<CUstream>(id);
  return CUDA_SUCCESS;
}

CUresult SimStreamDestroy(CUstream h) {
  WDSIM_ENTER("cuStreamDestroy");
  std::shared_ptr<Stream> st;
  {
    State& s = S();
    absl::MutexLock l(&s.mu);
    auto it = s.streams.find(HandleId(h));
    if (it == s.streams.end()) {
      return Misuse(CUDA_ERROR_INVALID_HANDLE, "stream %p is not a live stream",
                    static_cast<void*>(h));
    }
    st = std::move(it->second);
    s.streams.erase(it);
  }
  StatSub(DevSt(st->device()->index).streams, 1);
  // Queued work still runs (the real driver finishes it too); events keep the object alive.
  st->Shutdown();
  return CUDA_SUCCESS;
}

CUresult SimStreamSynchronize(CUstream h) {
  WDSIM_ENTER("cuStreamSynchronize");
  WDSIM_CTX(d);
  if (IsNullStream(h)) {
    WaitDeps(BlockingDeps(d));
    return d->lost.load() ? CUDA_ERROR_DEVICE_UNAVAILABLE : CUDA_SUCCESS;
  }
  std::shared_ptr<Stream> st = FindStream(h);
  if (st == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "stream %p is not a live stream",
                  static_cast<void*>(h));
  }
  st->Drain();
  return st->Sticky();
}

CUresult SimStreamQuery(CUstream h) {
  WDSIM_ENTER("cuStreamQuery");
  WDSIM_CTX(d);
  Deps deps;
  if (IsNullStream(h)) {
    deps = BlockingDeps(d);
  } else {
    std::shared_ptr<Stream> st = FindStream(h);
    if (st == nullptr) {
      return Misuse(CUDA_ERROR_INVALID_HANDLE, "stream %p is not a live stream",
                    static_cast<void*>(h));
    }
    if (CUresult r = st->Sticky(); r != CUDA_SUCCESS) return r;
    deps.emplace_back(st, st->Ticket());
  }
  for (const auto& [st, ticket] : deps) {
    if (!st->Done(ticket)) return CUDA_ERROR_NOT_READY;
  }
  return CUDA_SUCCESS;
}

std::shared_ptr<Event> FindEvent(CUevent h) {
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.events.find(HandleId(h));
  return it != s.events.end() ? it->second : nullptr;
}

CUresult SimEventCreate(CUevent* ph, unsigned int flags) {
  WDSIM_ENTER("cuEventCreate");
  WDSIM_CTX(d);
  if (ph == nullptr) return CUDA_ERROR_INVALID_VALUE;
  auto e = std::make_shared<Event>();
  e->device = d;
  State& s = S();
  absl::MutexLock l(&s.mu);
  const uint64_t id = s.NewId(kTagEvent);
  s.events.emplace(id, std::move(e));
  StatAdd(DevSt(d->index).events, 1);
  *ph = reinterpret_cast<CUevent>(id);
  return CUDA_SUCCESS;
}

CUresult SimEventDestroy(CUevent h) {
  WDSIM_ENTER("cuEventDestroy");
  std::shared_ptr<Event> e;  // may hold the last reference to a destroyed stream
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.events.find(HandleId(h));
  if (it == s.events.end()) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "event %p is not a live event", static_cast<void*>(h));
  }
  e = std::move(it->second);
  s.events.erase(it);
  StatSub(DevSt(e->device->index).events, 1);
  return CUDA_SUCCESS;
}

CUresult SimEventRecord(CUevent he, CUstream hs) {
  WDSIM_ENTER("cuEventRecord");
  WDSIM_CTX(d);
  std::shared_ptr<Event> e = FindEvent(he);
  if (e == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "event %p is not a live event",
                  static_cast<void*>(he));
  }
  Deps deps;
  if (IsNullStream(hs)) {
    deps = BlockingDeps(d);  // the legacy stream's position: after all blocking work so far
  } else {
    std::shared_ptr<Stream> st = FindStream(hs);
    if (st == nullptr) {
      return Misuse(CUDA_ERROR_INVALID_HANDLE, "stream %p is not a live stream",
                    static_cast<void*>(hs));
    }
    if (st->device() != e->device) {
      return Misuse(CUDA_ERROR_INVALID_HANDLE, "event of device %d recorded on a stream of %d",
                    e->device->index, st->device()->index);
    }
    deps.emplace_back(st, st->Ticket());
  }
  State& s = S();
  absl::MutexLock l(&s.mu);
  e->deps = std::move(deps);
  return CUDA_SUCCESS;
}

Deps EventDeps(const Event& e) {
  State& s = S();
  absl::MutexLock l(&s.mu);
  return e.deps;
}

CUresult SimEventSynchronize(CUevent he) {
  WDSIM_ENTER("cuEventSynchronize");
  WDSIM_CTX(d);
  std::shared_ptr<Event> e = FindEvent(he);
  if (e == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "event %p is not a live event",
                  static_cast<void*>(he));
  }
  WaitDeps(EventDeps(*e));
  return e->device->lost.load() ? CUDA_ERROR_DEVICE_UNAVAILABLE : CUDA_SUCCESS;
}

CUresult SimEventQuery(CUevent he) {
  WDSIM_ENTER("cuEventQuery");
  WDSIM_CTX(d);
  std::shared_ptr<Event> e = FindEvent(he);
  if (e == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "event %p is not a live event",
                  static_cast<void*>(he));
  }
  for (const auto& [st, ticket] : EventDeps(*e)) {
    if (!st->Done(ticket)) return CUDA_ERROR_NOT_READY;
  }
  return CUDA_SUCCESS;
}

CUresult SimStreamWaitEvent(CUstream hs, CUevent he, unsigned int flags) {
  WDSIM_ENTER("cuStreamWaitEvent");
  WDSIM_CTX(d);
  std::shared_ptr<Event> e = FindEvent(he);
  if (e == nullptr) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "event %p is not a live event",
                  static_cast<void*>(he));
  }
  Deps deps = EventDeps(*e);  // the most recent record as of now, not of execution time
  return Submit(d, hs, [deps = std::move(deps)]() -> CUresult {
    WaitDeps(deps);
    return CUDA_SUCCESS;
  });
}

// ----------------------------------------------------------------------------------------------
// Entry points: modules and kernels.

CUresult SimModuleLoadData(CUmodule* module, const void* image) {
  WDSIM_ENTER("cuModuleLoadData");
  WDSIM_CTX(d);
  if (module == nullptr) return CUDA_ERROR_INVALID_VALUE;
  const auto* b = static_cast<const unsigned char*>(image);
  uint32_t magic = 0;
  if (b != nullptr) std::memcpy(&magic, b, 4);
  const bool fatbin = magic == 0xBA55ED50u;
  const bool elf = b != nullptr && std::memcmp(b,
                                               "\x7f"
                                               "ELF",
                                               4) == 0;
  // PTX is NUL-terminated text; reading further than its first byte could overrun the image.
  const bool ptx = b != nullptr && (b[0] == '/' || b[0] == '.' || b[0] == '\n' || b[0] == ' ');
  if (b == nullptr || (!fatbin && !elf && !ptx)) {
    return Misuse(CUDA_ERROR_INVALID_IMAGE, "the image is empty or not a fatbin, ELF or PTX");
  }
  State& s = S();
  absl::MutexLock l(&s.mu);
  const uint64_t id = s.NewId(kTagModule);
  s.modules.emplace(id, Module{d->index});
  StatAdd(DevSt(d->index).modules, 1);
  *module = reinterpret_cast<CUmodule>(id);
  return CUDA_SUCCESS;
}

CUresult SimModuleUnload(CUmodule module) {
  WDSIM_ENTER("cuModuleUnload");
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.modules.find(HandleId(module));
  if (it == s.modules.end()) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "module %p is not loaded", static_cast<void*>(module));
  }
  StatSub(DevSt(it->second.device).modules, 1);
  s.modules.erase(it);
  std::erase_if(s.functions, [&](const auto& f) { return f.second.module == HandleId(module); });
  return CUDA_SUCCESS;
}

CUresult SimModuleGetFunction(CUfunction* fn, CUmodule module, const char* name) {
  WDSIM_ENTER("cuModuleGetFunction");
  WDSIM_CTX(d);
  if (fn == nullptr || name == nullptr) return CUDA_ERROR_INVALID_VALUE;
  State& s = S();
  absl::MutexLock l(&s.mu);
  auto it = s.modules.find(HandleId(module));
  if (it == s.modules.end()) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "module %p is not loaded", static_cast<void*>(module));
  }
  if (std::strcmp(name, weightd::kernels::kConvert2DKernel) != 0) return CUDA_ERROR_NOT_FOUND;
  const uint64_t id = s.NewId(kTagFunction);
  s.functions.emplace(id, Function{HandleId(module), it->second.device});
  *fn = reinterpret_cast<CUfunction>(id);
  return CUDA_SUCCESS;
}

bool ValidDType(int32_t t) { return t >= 0 && t < kNumDTypes; }

CUresult SimLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         unsigned by, unsigned bz, unsigned shared_mem, CUstream h, void** params,
                         void** extra) {
  WDSIM_ENTER("cuLaunchKernel");
  WDSIM_CTX(d);
  int fdev = -1;
  {
    State& s = S();
    absl::MutexLock l(&s.mu);
    auto it = s.functions.find(HandleId(f));
    if (it != s.functions.end()) fdev = it->second.device;
  }
  if (fdev < 0) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "function %p is not loaded", static_cast<void*>(f));
  }
  if (fdev != d->index) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE,
                  "function of device %d launched in device %d's context", fdev, d->index);
  }
  if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 ||
      uint64_t{bx} * by * bz > 1024) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "grid %ux%ux%u / block %ux%ux%u is invalid", gx, gy, gz,
                  bx, by, bz);
  }
  if (params == nullptr || params[0] == nullptr) {
    return Misuse(extra != nullptr ? CUDA_ERROR_NOT_SUPPORTED : CUDA_ERROR_INVALID_VALUE,
                  "kernelParams must hold the Convert2DArgs (extra is not supported)");
  }
  Device* sd = nullptr;
  if (CUresult r = StreamDevice(d, h, &sd); r != CUDA_SUCCESS) return r;
  if (sd != d) {
    return Misuse(CUDA_ERROR_INVALID_HANDLE, "launch on a stream of device %d from device %d",
                  sd->index, d->index);
  }
  weightd::kernels::Convert2DArgs a;
  std::memcpy(&a, params[0], sizeof(a));
  if (!ValidDType(a.from) || !ValidDType(a.to) ||
      !weightd::kernels::IsConvertible(static_cast<DType>(a.from), static_cast<DType>(a.to)) ||
      a.width < 0 || a.height < 0) {
    return Misuse(CUDA_ERROR_INVALID_VALUE, "Convert2DArgs: dtypes %d -> %d, %lld x %lld invalid",
                  a.from, a.to, static_cast<long long>(a.width), static_cast<long long>(a.height));
  }
  const size_t ssz = static_cast<size_t>(DTypeSize(static_cast<DType>(a.from)));
  const size_t dsz = static_cast<size_t>(DTypeSize(static_cast<DType>(a.to)));
  const size_t sw = static_cast<size_t>(a.width) * ssz;
  const size_t dw = static_cast<size_t>(a.width) * dsz;
  std::vector<Span> srows(static_cast<size_t>(a.height)), drows(static_cast<size_t>(a.height));
  if (a.width > 0) {
    State& s = S();
    absl::MutexLock l(&s.mu);
    for (int64_t r = 0; r < a.height; ++r) {
      const CUdeviceptr sp =
          reinterpret_cast<CUdeviceptr>(a.src) + static_cast<CUdeviceptr>(r * a.src_pitch);
      const CUdeviceptr dp =
          reinterpret_cast<CUdeviceptr>(a.dst) + static_cast<CUdeviceptr>(r * a.dst_pitch);
      if (CUresult e = Translate(s, sp, sw, d->index, false, "kernel source", &srows[r]);
          e != CUDA_SUCCESS) {
        return e;
      }
      if (CUresult e = Translate(s, dp, dw, d->index, true, "kernel destination", &drows[r]);
          e != CUDA_SUCCESS) {
        return e;
      }
    }
  }
  StatAdd(St().kernel_launches, 1);
  return Submit(d, h, [a, sw, dw, srows = std::move(srows), drows = std::move(drows)]() {
    for (size_t r = 0; r < srows.size(); ++r) {
      if (CUresult e = StillMapped(srows[r]); e != CUDA_SUCCESS) return e;
      if (CUresult e = StillMapped(drows[r]); e != CUDA_SUCCESS) return e;
    }
    std::vector<char> stmp, dtmp(dw);
    for (size_t r = 0; r < srows.size(); ++r) {
      const char* src = Gather(srows[r], sw, stmp);
      char* dst = drows[r].size() == 1 ? drows[r][0].ptr : dtmp.data();
      weightd::kernels::ConvertHost(static_cast<DType>(a.from), src, static_cast<DType>(a.to), dst,
                                    a.width);
      if (dst == dtmp.data()) CopySpans(drows[r], HostSpan(dtmp.data(), dw));
    }
    return CUDA_SUCCESS;
  });
}

// ----------------------------------------------------------------------------------------------
// The proc-address table.

struct ProcEntry {
  const char* name;
  void* fn;
};

// Each entry is checked against cuda.h's prototype of the name (macro-renamed to the version the
// 12.0 ABI resolves, e.g. cuMemGetInfo -> cuMemGetInfo_v2).
#define WDSIM_PROC(name, impl)                                                        \
  ProcEntry {                                                                         \
#name, [] {                                                                         \
      static_assert(std::is_same_v<decltype(&impl), decltype(&::name)>, #impl " type"); \
      return reinterpret_cast<void*>(&impl);                                            \
    }() \
  }

const ProcEntry* ProcTable(size_t* n) {
  static const ProcEntry kTable[] = {
      WDSIM_PROC(cuInit, SimInit),
      WDSIM_PROC(cuDriverGetVersion, SimDriverGetVersion),
      WDSIM_PROC(cuGetErrorName, SimGetErrorName),
      WDSIM_PROC(cuGetErrorString, SimGetErrorString),
      WDSIM_PROC(cuDeviceGetCount, SimDeviceGetCount),
      WDSIM_PROC(cuDeviceGet, SimDeviceGet),
      WDSIM_PROC(cuDeviceGetUuid, SimDeviceGetUuid),
      WDSIM_PROC(cuDeviceGetUuid_v2, SimDeviceGetUuid),
      WDSIM_PROC(cuDeviceGetName, SimDeviceGetName),
      WDSIM_PROC(cuDeviceTotalMem, SimDeviceTotalMem),
      WDSIM_PROC(cuDeviceGetAttribute, SimDeviceGetAttribute),
      WDSIM_PROC(cuDevicePrimaryCtxRetain, SimDevicePrimaryCtxRetain),
      WDSIM_PROC(cuDevicePrimaryCtxRelease, SimDevicePrimaryCtxRelease),
      WDSIM_PROC(cuCtxSetCurrent, SimCtxSetCurrent),
      WDSIM_PROC(cuCtxGetCurrent, SimCtxGetCurrent),
      WDSIM_PROC(cuCtxGetDevice, SimCtxGetDevice),
      WDSIM_PROC(cuCtxSynchronize, SimCtxSynchronize),
      WDSIM_PROC(cuMemGetInfo, SimMemGetInfo),
      WDSIM_PROC(cuMemGetAllocationGranularity, SimMemGetAllocationGranularity),
      WDSIM_PROC(cuMemCreate, SimMemCreate),
      WDSIM_PROC(cuMemRelease, SimMemRelease),
      WDSIM_PROC(cuMemAddressReserve, SimMemAddressReserve),
      WDSIM_PROC(cuMemAddressFree, SimMemAddressFree),
      WDSIM_PROC(cuMemMap, SimMemMap),
      WDSIM_PROC(cuMemUnmap, SimMemUnmap),
      WDSIM_PROC(cuMemSetAccess, SimMemSetAccess),
      WDSIM_PROC(cuMemExportToShareableHandle, SimMemExportToShareableHandle),
      WDSIM_PROC(cuMemImportFromShareableHandle, SimMemImportFromShareableHandle),
      WDSIM_PROC(cuMemGetAllocationPropertiesFromHandle, SimMemGetAllocationPropertiesFromHandle),
      WDSIM_PROC(cuMemAlloc, SimMemAlloc),
      WDSIM_PROC(cuMemFree, SimMemFree),
      WDSIM_PROC(cuMemHostAlloc, SimMemHostAlloc),
      WDSIM_PROC(cuMemFreeHost, SimMemFreeHost),
      WDSIM_PROC(cuMemHostRegister, SimMemHostRegister),
      WDSIM_PROC(cuMemHostUnregister, SimMemHostUnregister),
      WDSIM_PROC(cuMemcpyHtoD, SimMemcpyHtoD),
      WDSIM_PROC(cuMemcpyDtoH, SimMemcpyDtoH),
      WDSIM_PROC(cuMemcpyDtoD, SimMemcpyDtoD),
      WDSIM_PROC(cuMemcpyHtoDAsync, SimMemcpyHtoDAsync),
      WDSIM_PROC(cuMemcpyDtoHAsync, SimMemcpyDtoHAsync),
      WDSIM_PROC(cuMemcpyDtoDAsync, SimMemcpyDtoDAsync),
      WDSIM_PROC(cuMemcpy2D, SimMemcpy2D),
      WDSIM_PROC(cuMemcpy2DAsync, SimMemcpy2DAsync),
      WDSIM_PROC(cuMemsetD8, SimMemsetD8),
      WDSIM_PROC(cuMemsetD8Async, SimMemsetD8Async),
      WDSIM_PROC(cuStreamCreate, SimStreamCreate),
      WDSIM_PROC(cuStreamDestroy, SimStreamDestroy),
      WDSIM_PROC(cuStreamSynchronize, SimStreamSynchronize),
      WDSIM_PROC(cuStreamQuery, SimStreamQuery),
      WDSIM_PROC(cuStreamWaitEvent, SimStreamWaitEvent),
      WDSIM_PROC(cuEventCreate, SimEventCreate),
      WDSIM_PROC(cuEventDestroy, SimEventDestroy),
      WDSIM_PROC(cuEventRecord, SimEventRecord),
      WDSIM_PROC(cuEventSynchronize, SimEventSynchronize),
      WDSIM_PROC(cuEventQuery, SimEventQuery),
      WDSIM_PROC(cuModuleLoadData, SimModuleLoadData),
      WDSIM_PROC(cuModuleUnload, SimModuleUnload),
      WDSIM_PROC(cuModuleGetFunction, SimModuleGetFunction),
      WDSIM_PROC(cuLaunchKernel, SimLaunchKernel),
      // At the 12.0+ ABI the name resolves to the five-argument _v2.
      ProcEntry{"cuGetProcAddress", reinterpret_cast<void*>(&::cuGetProcAddress_v2)},
  };
  *n = sizeof(kTable) / sizeof(kTable[0]);
  return kTable;
}

}  // namespace
}  // namespace weightd::sim

extern "C" CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int cudaVersion,
                                        cuuint64_t flags,
                                        CUdriverProcAddressQueryResult* symbolStatus) {
  using namespace weightd::sim;
  WDSIM_ENTER_IMPL("cuGetProcAddress", false);
  if (symbol == nullptr || pfn == nullptr) return CUDA_ERROR_INVALID_VALUE;
  size_t n = 0;
  const ProcEntry* table = ProcTable(&n);
  for (size_t i = 0; i < n; ++i) {
    if (std::strcmp(table[i].name, symbol) == 0) {
      *pfn = table[i].fn;
      if (symbolStatus != nullptr) *symbolStatus = CU_GET_PROC_ADDRESS_SUCCESS;
      return CUDA_SUCCESS;
    }
  }
  *pfn = nullptr;
  if (symbolStatus != nullptr) *symbolStatus = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  return CUDA_ERROR_NOT_FOUND;
}

extern "C" CUresult cuGetProcAddress(const char* symbol, void** pfn, int cudaVersion,
                                     cuuint64_t flags) {
  return cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, nullptr);
}
