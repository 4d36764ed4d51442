#include "weightd/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd {

absl::Status PreadExact(int fd, void* dst, uint64_t len, uint64_t offset,
                        const std::string& label) {
  uint64_t done = 0;
  while (done < len) {
    const ssize_t r =
        ::pread(fd, static_cast<char*>(dst) + done, len - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(
          errno, absl::StrCat("read ", len, " bytes at offset ", offset, " of '", label, "'"));
    }
    if (r == 0) {
      return absl::DataLossError(absl::StrCat("'", label, "' ends at byte ", offset + done, " but ",
                                              len - done,
                                              " more bytes were expected at "
                                              "offset ",
                                              offset, " (file truncated?)"));
    }
    done += static_cast<uint64_t>(r);
  }
  return absl::OkStatus();
}

absl::Status PwritevExact(int fd, std::span<iovec> iov, uint64_t offset, const std::string& label) {
  size_t first = 0;
  for (;;) {
    // Empty iovecs need no write (and a write of 0 bytes would look like no progress).
    while (first < iov.size() && iov[first].iov_len == 0) ++first;
    if (first == iov.size()) break;
    const ssize_t n = ::pwritev(fd, iov.data() + first,
                                static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX)),
                                static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, absl::StrCat("writing ", label, " at offset ", offset));
    }
    if (n == 0) {
      return absl::DataLossError(
          absl::StrCat("writing ", label, " at offset ", offset, ": the write made no progress"));
    }
    uint64_t done = static_cast<uint64_t>(n);
    offset += done;
    while (first < iov.size() && done >= iov[first].iov_len) done -= iov[first++].iov_len;
    if (done > 0) {
      iov[first].iov_base = static_cast<std::byte*>(iov[first].iov_base) + done;
      iov[first].iov_len -= done;
    }
  }
  return absl::OkStatus();
}

absl::Status PwriteExact(int fd, const void* data, uint64_t len, uint64_t offset,
                         const std::string& label) {
  iovec one{const_cast<void*>(data), len};
  return PwritevExact(fd, {&one, 1}, offset, label);
}

FileIdentity IdentityOf(const struct stat& st) {
  FileIdentity id;
  id.dev = static_cast<uint64_t>(st.st_dev);
  id.ino = static_cast<uint64_t>(st.st_ino);
  id.size = static_cast<uint64_t>(st.st_size);
  id.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  id.ctime_ns = static_cast<int64_t>(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec;
  return id;
}

absl::StatusOr<FileIdentity> IdentityOfFd(int fd, const std::string& path) {
  struct stat st {};
  WD_SYSCALL_OR_RETURN(::fstat(fd, &st), absl::StrCat("fstat '", path, "'"));
  return IdentityOf(st);
}

absl::Status CheckUnchanged(const std::string& path, const FileIdentity& then,
                            const FileIdentity& now) {
  if (then == now) return absl::OkStatus();
  std::vector<std::string> what;
  if (then.dev != now.dev || then.ino != now.ino) what.push_back("it was replaced by another file");
  if (then.size != now.size) {
    what.push_back(absl::StrCat("size ", then.size, " -> ", now.size,
                                now.size < then.size ? ": file truncated?" : ""));
  }
  if (then.mtime_ns != now.mtime_ns) what.push_back("modification time changed");
  if (then.ctime_ns != now.ctime_ns && then.mtime_ns == now.mtime_ns) {
    what.push_back("status change time changed");
  }
  return absl::DataLossError(absl::StrCat("'", path, "' changed while weightd was reading it (",
                                          absl::StrJoin(what, ", "),
                                          "); the load is refused rather than mixing versions"));
}

namespace {

absl::string_view FileKind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

bool Inside(absl::string_view path, absl::string_view root) {
  if (root == "/") return true;
  return absl::StartsWith(path, root) && (path.size() == root.size() || path[root.size()] == '/');
}

}  // namespace

absl::StatusOr<UniqueFd> OpenRegularFile(const std::string& path,
                                         absl::Span<const std::string> roots, int extra_flags) {
  WD_ASSIGN_OR_RETURN(UniqueFd fd, UniqueFd::Open(path, O_RDONLY | O_NONBLOCK | extra_flags));
  struct stat st {};
  WD_SYSCALL_OR_RETURN(::fstat(fd.get(), &st), absl::StrCat("fstat '", path, "'"));
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "' is ", FileKind(st.st_mode), ", not a regular file"));
  }
  const int fl = ::fcntl(fd.get(), F_GETFL);
  if (fl >= 0) (void)::fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK);
  if (roots.empty()) return fd;
  char target[PATH_MAX + 1];
  const std::string link = absl::StrCat("/proc/self/fd/", fd.get());
  const ssize_t n = ::readlink(link.c_str(), target, PATH_MAX);
  if (n < 0) return ErrnoError(errno, absl::StrCat("readlink ", link, " (for '", path, "')"));
  const absl::string_view resolved(target, static_cast<size_t>(n));
  for (const std::string& root : roots) {
    if (Inside(resolved, root)) return fd;
  }
  return absl::PermissionDeniedError(absl::StrCat("'", path, "' leads to '", resolved,
                                                  "', outside the configured model_roots (",
                                                  absl::StrJoin(roots, ", "), ")"));
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path, uint64_t max_bytes,
                                             absl::Span<const std::string> roots) {
  WD_ASSIGN_OR_RETURN(UniqueFd fd, OpenRegularFile(path, roots));
  struct stat st {};
  WD_SYSCALL_OR_RETURN(::fstat(fd.get(), &st), absl::StrCat("fstat '", path, "'"));
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is ", size,
                                                   " bytes, more than the ", max_bytes,
                                                   " accepted for this kind of file"));
  }
  std::string out(size, '\0');
  WD_RETURN_IF_ERROR(PreadExact(fd.get(), out.data(), size, 0, path));
  return out;
}

}  // namespace weightd
