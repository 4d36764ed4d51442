// UniqueFd: sole owner of a POSIX file descriptor.
//
//   WD_ASSIGN_OR_RETURN(UniqueFd fd, UniqueFd::Open(path, O_RDONLY | O_CLOEXEC));
//   ::pread(fd.get(), buf, n, off);
//
// Move-only. The destructor closes the descriptor and ignores close errors (there is nothing a
// destructor could do with them); call Close() where the caller needs to see the error.
// Not thread-safe: one owner at a time, like the descriptor it holds.
#ifndef WEIGHTD_UNIQUE_FD_H_
#define WEIGHTD_UNIQUE_FD_H_

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace weightd {

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  // Takes ownership of `fd` (which may be -1, meaning "none").
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) Reset(std::exchange(other.fd_, -1));
    return *this;
  }
  ~UniqueFd() { Reset(); }

  // open(2) with O_CLOEXEC added. Errors name `path`.
  static absl::StatusOr<UniqueFd> Open(const std::string& path, int flags, int mode = 0);

  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  explicit operator bool() const noexcept { return valid(); }

  // Gives up ownership without closing.
  [[nodiscard]] int Release() noexcept { return std::exchange(fd_, -1); }
  // Closes the current descriptor (if any) and takes `fd`.
  void Reset(int fd = -1) noexcept;
  // Closes the descriptor and reports close(2)'s error. The object is empty afterwards.
  absl::Status Close();

 private:
  int fd_ = -1;
};

}  // namespace weightd

#endif  // WEIGHTD_UNIQUE_FD_H_
