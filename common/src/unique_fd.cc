#include "weightd/unique_fd.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "weightd/status_macros.h"

namespace weightd {

absl::StatusOr<UniqueFd> UniqueFd::Open(const std::string& path, int flags, int mode) {
  int fd;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return ErrnoError(errno, absl::StrCat("open '", path, "'"));
  return UniqueFd(fd);
}

void UniqueFd::Reset(int fd) noexcept {
  // close() is not retried on EINTR: on Linux the descriptor is released regardless.
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

absl::Status UniqueFd::Close() {
  if (fd_ < 0) return absl::OkStatus();
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0 && errno != EINTR) return ErrnoError(errno, "close");
  return absl::OkStatus();
}

}  // namespace weightd
