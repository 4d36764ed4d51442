// Small file helpers with Status errors that name the path.
//
//   WD_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, 16 << 20));
//
// Thread-safe (no shared state).
#ifndef WEIGHTD_FILE_UTIL_H_
#define WEIGHTD_FILE_UTIL_H_

#include <sys/stat.h>

#include <sys/uio.h>

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "weightd/unique_fd.h"

namespace weightd {

// What tells one version of a file from another: a file replaced (another inode) or rewritten in
// place (size, mtime or ctime) has a different identity.
struct FileIdentity {
  uint64_t dev = 0, ino = 0, size = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;
  bool operator==(const FileIdentity&) const = default;
};
FileIdentity IdentityOf(const struct stat& st);
// fstat of `fd` as a FileIdentity; errors name `path`.
absl::StatusOr<FileIdentity> IdentityOfFd(int fd, const std::string& path);
// DATA_LOSS naming `path` and what differs, when `now` is not `then`; OK otherwise.
absl::Status CheckUnchanged(const std::string& path, const FileIdentity& then,
                            const FileIdentity& now);

// Opens `path` read-only (plus `extra_flags`, e.g. O_DIRECT) for reading a checkpoint, the way
// untrusted paths must be opened:
//   - never blocking in open(): O_NONBLOCK, so a FIFO without a writer cannot wedge the caller;
//   - a regular file only: anything else is INVALID_ARGUMENT naming what it is ("a FIFO",
//     "a directory", "a character device", ...);
//   - with `roots` (absolute, already resolved directories), the file actually opened, after
//     every symlink (its /proc/self/fd link), must lie inside one of them: PERMISSION_DENIED
//     naming the path, where it leads and the roots. A symlink out of a model root is refused.
// O_NONBLOCK is cleared again once the file is known to be regular.
absl::StatusOr<UniqueFd> OpenRegularFile(const std::string& path,
                                         absl::Span<const std::string> roots = {},
                                         int extra_flags = 0);

// Reads a whole regular file (opened with OpenRegularFile and `roots`). Files larger than
// `max_bytes` are refused with an error naming the path and both sizes (a guard against
// pointing weightd at the wrong file).
absl::StatusOr<std::string> ReadFileToString(const std::string& path, uint64_t max_bytes,
                                             absl::Span<const std::string> roots = {});

// pread until `len` bytes are read, retrying EINTR and short reads. Reaching end of file first
// is an error naming `label`, the offset and how many bytes were missing.
absl::Status PreadExact(int fd, void* dst, uint64_t len, uint64_t offset, const std::string& label);

// pwritev of all of `iov` at `offset` (IOV_MAX at a time), retrying EINTR and short writes; `iov`
// is consumed. Errors say "writing LABEL at offset N" with the errno text (ENOSPC, EFBIG,
// ENOMEM); a write that makes no progress is DATA_LOSS rather than a spin.
absl::Status PwritevExact(int fd, std::span<iovec> iov, uint64_t offset, const std::string& label);
absl::Status PwriteExact(int fd, const void* data, uint64_t len, uint64_t offset,
                         const std::string& label);

}  // namespace weightd

#endif  // WEIGHTD_FILE_UTIL_H_
