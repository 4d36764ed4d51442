// Page-cache residency of file extents: decides whether an extent is read through the page cache
// (warm: pread / mmap + memcpy, or cudaHostRegister'd mmap under CUDA) or with O_DIRECT through
// io_uring (cold: the page cache would only add a copy and evict other data).
//
//   WD_ASSIGN_OR_RETURN(double f, ResidentFraction(mapping.bytes().data() + off, len));
//   if (f >= kCachedThreshold) { ... warm path ... }
//
// mincore(2) on a mapping of the file reports, per page, whether it is in the page cache; it
// neither faults pages in nor changes their LRU position. Thread-safe (no shared state).
#ifndef WEIGHTD_DETAIL_PAGE_CACHE_H_
#define WEIGHTD_DETAIL_PAGE_CACHE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace weightd {

// An extent at least this resident counts as cached: reading the rest through the page cache
// costs less than splitting the extent between two paths.
inline constexpr double kCachedThreshold = 0.5;

// Fraction (0..1) of the pages overlapping [addr, addr + length) that are resident. `addr` lies
// in a file mapping (any alignment). An empty range counts as fully resident.
absl::StatusOr<double> ResidentFraction(const void* addr, uint64_t length);

// The same for [offset, offset + length) of an open file (maps the range temporarily). Errors
// name `label`.
absl::StatusOr<double> ResidentFraction(int fd, uint64_t offset, uint64_t length,
                                        const std::string& label);

// Asks the kernel to drop the cached pages of the whole file (posix_fadvise DONTNEED after
// fdatasync). Best effort: dirty or mapped pages may stay. For tests and benchmarks.
absl::Status DropFileFromPageCache(const std::string& path);

}  // namespace weightd

#endif  // WEIGHTD_DETAIL_PAGE_CACHE_H_
