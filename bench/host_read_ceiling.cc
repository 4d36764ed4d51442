// host_read_ceiling: what this machine's page cache and memory allow a host load, the floors
// bench/host_load_bench.py holds weightd's host backend to.
//
// Usage: host_read_ceiling MODE THREADS FILE...   (prints one line: "<bytes> <seconds>")
//
// Method: the files (a checkpoint's shards, warm in the page cache) are cut into 16 MiB pieces
// that THREADS workers take in turn and pread, into:
//   reused    one 16 MiB buffer per worker, reused: the page-cache copy bandwidth alone;
//   malloc    fresh malloc'ed memory the size of the files (first-touch page faults included);
//   memfd     a fresh memfd of that size, mapped shared, CRC32C of each MiB right after its
//             read: the work weightd's host backend cannot avoid (fresh shmem pages, checksum);
//   populate  like memfd, after MADV_POPULATE_WRITE of each worker's part (the page zeroing
//             paid up front, without a fault per page).
//   pwrite    each MiB pread into a reused buffer, checksummed there, then pwrite into a fresh
//             memfd the size of the files, never mapped: what weightd's host executor does.
// Timing covers allocation, reads and checksums, not unmapping: the mapped modes would add
// 0.04-0.1 s for 2.5 GB to drop the mapping before a memfd can take F_SEAL_WRITE.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "weightd/crc32c.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace {

constexpr uint64_t kPiece = 16 << 20;
constexpr uint64_t kStep = 1 << 20;

struct Piece {
  int fd;
  uint64_t offset, bytes, dst;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s reused|malloc|memfd|populate|pwrite THREADS FILE...\n",
                 argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  const int threads = std::atoi(argv[2]);
  std::vector<Piece> pieces;
  uint64_t total = 0;
  for (int i = 3; i < argc; ++i) {
    const int fd = open(argv[i], O_RDONLY);
    if (fd < 0) {
      std::perror(argv[i]);
      return 1;
    }
    const uint64_t size = static_cast<uint64_t>(lseek(fd, 0, SEEK_END));
    for (uint64_t off = 0; off < size; off += kPiece) {
      const uint64_t n = std::min(kPiece, size - off);
      pieces.push_back({fd, off, n, total});
      total += n;
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::byte* arena = nullptr;
  int mfd = -1;
  if (mode == "pwrite") {
    mfd = memfd_create("ceiling", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, static_cast<off_t>(total)) != 0) return 1;
  } else if (mode == "malloc") {
    arena = static_cast<std::byte*>(std::malloc(total));
  } else if (mode == "memfd" || mode == "populate") {
    const int mfd = memfd_create("ceiling", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, static_cast<off_t>(total)) != 0) return 1;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (p == MAP_FAILED) return 1;
    arena = static_cast<std::byte*>(p);
  } else if (mode != "reused") {
    std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
  }
  std::atomic<size_t> next{0};
  std::atomic<uint32_t> sink{0};
  auto worker = [&](int w) {
    if (mode == "populate") {
      const uint64_t part = (total / threads + 4095) / 4096 * 4096;
      const uint64_t b = std::min(total, part * w), e = std::min(total, b + part);
      if (e > b) madvise(arena + b, e - b, MADV_POPULATE_WRITE);
    }
    std::vector<std::byte> own(mode == "reused" ? kPiece : mode == "pwrite" ? kStep : 0);
    uint32_t crc = 0;
    for (size_t i; (i = next.fetch_add(1)) < pieces.size();) {
      const Piece& p = pieces[i];
      if (mode == "pwrite") {
        for (uint64_t off = 0; off < p.bytes; off += kStep) {
          const uint64_t n = std::min(kStep, p.bytes - off);
          if (pread(p.fd, own.data(), n, static_cast<off_t>(p.offset + off)) !=
              static_cast<ssize_t>(n)) {
            std::abort();
          }
          crc ^= weightd::Crc32c(own.data(), n);
          if (pwrite(mfd, own.data(), n, static_cast<off_t>(p.dst + off)) !=
              static_cast<ssize_t>(n)) {
            std::abort();
          }
        }
        continue;
      }
      std::byte* dst = mode == "reused" ? own.data() : arena + p.dst;
      const bool check = mode == "memfd" || mode == "populate";
      for (uint64_t off = 0; off < p.bytes; off += kStep) {
        const uint64_t n = std::min(kStep, p.bytes - off);
        if (pread(p.fd, dst + off, n, static_cast<off_t>(p.offset + off)) !=
            static_cast<ssize_t>(n)) {
          std::abort();
        }
        if (check) crc ^= weightd::Crc32c(dst + off, n);
      }
    }
    sink += crc;
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < threads; ++w) pool.emplace_back(worker, w);
  worker(0);
  for (std::thread& t : pool) t.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%llu %.6f\n", static_cast<unsigned long long>(total), secs);
  return sink.load() == 0xFFFFFFFF ? 1 : 0;
}
