// UringReader: deep-queue reads of checkpoint extents with io_uring, O_DIRECT when the
// filesystem allows it, into 4 KiB-aligned staging memory (a StagingSlot).
//
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<ReadFile> f, ReadFile::Open(path, /*direct=*/true));
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<UringReader> r, UringReader::Create({}));
//   WD_ASSIGN_OR_RETURN(StagingSlot slot, ring->Acquire());
//   WD_ASSIGN_OR_RETURN(std::span<const std::byte> bytes,
//                       r->ReadExtent(*f, offset, length, slot.data(), slot.size()));
//
// O_DIRECT needs the file offset, the length and the buffer aligned (4 KiB covers every block
// size weightd meets), so ReadExtent reads the aligned superset [floor(offset), ceil(end)) of the
// extent and returns the inner span. When the filesystem refuses O_DIRECT (tmpfs: open fails
// with EINVAL; some FUSE filesystems: the read fails with EINVAL) the file falls back to
// buffered reads for the rest of its life, transparently.
//
// Completion loop (liburing's io-uring-cp.c): each extent is split into requests of at most
// `request_bytes`; at most `max_in_flight` are submitted at once; each SQE carries a pointer to
// its request; -EAGAIN and -EINTR completions are retried, short reads re-queued for the
// remainder, every CQE is marked seen, and an error stops new submissions but waits for the
// requests in flight before returning (their buffers belong to the caller). Reaching end of file
// before the extent's end is DATA_LOSS naming the file, the offset and the missing bytes.
//
// Thread-safety: a UringReader and its ring are owned by one thread (the thread that calls its
// methods); use one reader per thread. ReadFile is shared by readers on several threads.
#ifndef WEIGHTD_DETAIL_URING_READER_H_
#define WEIGHTD_DETAIL_URING_READER_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "weightd/file_util.h"
#include "weightd/unique_fd.h"

namespace weightd {

inline constexpr uint64_t kDirectIoAlignment = 4096;

// A checkpoint file opened twice: buffered, and (when possible) O_DIRECT. Thread-safe.
class ReadFile {
 public:
  // Opens `path` read-only (OpenRegularFile: never blocks, regular files only); with
  // `want_direct`, also with O_DIRECT (silently buffered-only when the filesystem refuses it).
  // Errors name the path.
  static absl::StatusOr<std::unique_ptr<ReadFile>> Open(const std::string& path, bool want_direct);
  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  // Of the buffered descriptor, when opened.
  const FileIdentity& identity() const { return identity_; }
  int buffered_fd() const { return buffered_.get(); }
  // The O_DIRECT descriptor, or -1 once direct I/O is off for this file.
  int direct_fd() const { return direct_ok_.load(std::memory_order_relaxed) ? direct_.get() : -1; }
  bool direct() const { return direct_fd() >= 0; }
  void DisableDirect() { direct_ok_.store(false, std::memory_order_relaxed); }

 private:
  std::string path_;
  uint64_t size_ = 0;
  FileIdentity identity_;
  UniqueFd buffered_;
  UniqueFd direct_;
  std::atomic<bool> direct_ok_{false};
};

// Test hook: sees every completion (file offset and length of the request, the kernel's
// result) and returns the result the reader acts on, e.g. -EAGAIN, -EINTR or a shorter count.
using ReadFaultHook = std::function<int(uint64_t offset, uint32_t length, int result)>;

struct UringReaderOptions {
  unsigned queue_depth = 64;            // SQ entries of the ring
  unsigned max_in_flight = 0;           // requests submitted at once; 0 = queue_depth
  uint64_t request_bytes = 1ull << 20;  // largest single read (1 MiB: best on the H100 machine)
  ReadFaultHook fault_hook;             // tests only
};

struct UringReaderStats {
  uint64_t requests = 0;          // SQEs submitted
  uint64_t retries = 0;           // -EAGAIN / -EINTR resubmissions
  uint64_t short_reads = 0;       // completions with fewer bytes than asked, re-queued
  uint64_t direct_fallbacks = 0;  // requests moved to the buffered fd after EINVAL
  unsigned peak_in_flight = 0;
};

class UringReader {
 public:
  // Creates the ring. Errors (e.g. io_uring disabled by sysctl or seccomp: EPERM/ENOSYS) carry
  // the errno text; callers fall back to pread.
  static absl::StatusOr<std::unique_ptr<UringReader>> Create(const UringReaderOptions& options);
  ~UringReader();
  UringReader(const UringReader&) = delete;
  UringReader& operator=(const UringReader&) = delete;

  // Reads [offset, offset + length) of `file` into `buffer` (4 KiB aligned, `capacity` bytes) and
  // returns the span of the extent inside it. INVALID_ARGUMENT when the aligned superset does
  // not fit `capacity` or `buffer` is misaligned; DATA_LOSS on a short file; the errno text of
  // a failed read otherwise.
  absl::StatusOr<std::span<const std::byte>> ReadExtent(ReadFile& file, uint64_t offset,
                                                        uint64_t length, std::byte* buffer,
                                                        uint64_t capacity);

  // Bytes a buffer needs for ReadExtent(offset, length).
  static uint64_t AlignedSpan(uint64_t offset, uint64_t length);

  const UringReaderStats& stats() const { return stats_; }

 private:
  struct Impl;
  explicit UringReader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  UringReaderStats stats_;
};

}  // namespace weightd

#endif  // WEIGHTD_DETAIL_URING_READER_H_
