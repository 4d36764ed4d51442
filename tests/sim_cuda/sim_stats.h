// Counters of the simulated CUDA driver (tests/sim_cuda), shared with tests through a file.
//
//   WDSIM_STATS_DIR=/tmp/x  ->  each process that loads the simulation keeps its counters in
//   /tmp/x/<pid>.stats: one SimStats, mmap'ed MAP_SHARED, updated with relaxed atomics.
//
//   const SimStats* s = weightd::sim::MapStats("/tmp/x/1234.stats");   // or read the file
//   s->pinned_bytes, s->device[0].allocated_bytes, s->races, ...
//
// Readers see the live values of a running process and the final ones after it exits (the file
// stays). All fields are little-endian uint64 so Python can read them with struct.unpack: the
// layout is the field order below, no padding, version first.
#ifndef WEIGHTD_TESTS_SIM_CUDA_SIM_STATS_H_
#define WEIGHTD_TESTS_SIM_CUDA_SIM_STATS_H_

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <string>

namespace weightd::sim {

inline constexpr uint64_t kSimStatsVersion = 1;
inline constexpr int kSimMaxDevices = 8;

struct SimDeviceStats {
  uint64_t allocated_bytes;   // live cuMemCreate + cuMemAlloc bytes on this device
  uint64_t allocations;       // live physical allocations (created or imported)
  uint64_t mappings;          // live cuMemMap ranges
  uint64_t reserved_ranges;   // live cuMemAddressReserve ranges
  uint64_t primary_ctx_refs;  // cuDevicePrimaryCtxRetain minus cuDevicePrimaryCtxRelease
  uint64_t streams;           // live streams
  uint64_t events;            // live events
  uint64_t modules;           // loaded modules
  uint64_t lost;              // 1 once the device was lost (fault injection)
};

struct SimStats {
  uint64_t version;  // kSimStatsVersion
  uint64_t pid;
  uint64_t device_count;
  uint64_t pinned_bytes;  // live cuMemHostAlloc + cuMemHostRegister bytes
  uint64_t pinned_peak;   // highest pinned_bytes seen
  uint64_t races;         // host buffers changed between an async copy's enqueue and execution
  uint64_t misuse;        // calls refused as misuse (no context, unmapped, read-only, ...)
  uint64_t injected;      // calls failed by WDSIM_FAIL
  uint64_t calls;         // driver calls made
  uint64_t kernel_launches;
  SimDeviceStats device[kSimMaxDevices];
};

// Maps a stats file read-only. nullptr when it cannot be opened or is too short. The mapping is
// never unmapped (tests map a handful of files); fields change under the reader while the process
// that writes them runs: read them with __atomic_load_n(..., __ATOMIC_RELAXED) or after it exited.
inline const SimStats* MapStats(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return nullptr;
  struct stat st {};
  void* p = MAP_FAILED;
  if (::fstat(fd, &st) == 0 && st.st_size >= static_cast<off_t>(sizeof(SimStats))) {
    p = ::mmap(nullptr, sizeof(SimStats), PROT_READ, MAP_SHARED, fd, 0);
  }
  ::close(fd);
  return p == MAP_FAILED ? nullptr : static_cast<const SimStats*>(p);
}

}  // namespace weightd::sim

#endif  // WEIGHTD_TESTS_SIM_CUDA_SIM_STATS_H_
