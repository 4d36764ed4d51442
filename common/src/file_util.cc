#include "weightd/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd {

absl::Status PreadExact(int fd, void* dst, uint64_t len, uint64_t offset,
                        const std::string& label) {
  uint64_t done = 0;
  while (done < len) {
    const ssize_t r = ::pread(fd, static_cast<char*>(dst) + done, len - done,
                              static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, absl::StrCat("read ", len, " bytes at offset ", offset, " of '",
                                            label, "'"));
    }
    if (r == 0) {
      return absl::DataLossError(absl::StrCat("'", label, "' ends at byte ", offset + done,
                                              " but ", len - done, " more bytes were expected at "
                                              "offset ", offset, " (file truncated?)"));
    }
    done += static_cast<uint64_t>(r);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path, uint64_t max_bytes) {
  WD_ASSIGN_OR_RETURN(UniqueFd fd, UniqueFd::Open(path, O_RDONLY));
  struct stat st {};
  WD_SYSCALL_OR_RETURN(::fstat(fd.get(), &st), absl::StrCat("fstat '", path, "'"));
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is not a regular file"));
  }
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
