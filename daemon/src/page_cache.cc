#include "weightd/detail/page_cache.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "absl/strings/str_cat.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd {
namespace {
uint64_t PageSize() {
  static const uint64_t kPage = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return kPage;
}
}  // namespace

absl::StatusOr<double> ResidentFraction(const void* addr, uint64_t length) {
  if (length == 0) return 1.0;
  const uint64_t page = PageSize();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(addr) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(addr) + length + page - 1) & ~(page - 1);
  const uint64_t pages = (end - begin) / page;
  std::vector<unsigned char> vec(pages);
  WD_SYSCALL_OR_RETURN(::mincore(reinterpret_cast<void*>(begin), end - begin, vec.data()),
                       absl::StrCat("mincore of ", end - begin, " bytes"));
  uint64_t resident = 0;
  for (unsigned char v : vec) resident += v & 1;
  return static_cast<double>(resident) / static_cast<double>(pages);
}

absl::StatusOr<double> ResidentFraction(int fd, uint64_t offset, uint64_t length,
                                        const std::string& label) {
  if (length == 0) return 1.0;
  const uint64_t page = PageSize();
  const uint64_t base = offset & ~(page - 1);
  const uint64_t span = offset + length - base;
  void* p = ::mmap(nullptr, span, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(base));
  if (p == MAP_FAILED) {
    return ErrnoError(errno, absl::StrCat("mmap of ", span, " bytes at offset ", base, " of '",
                                          label, "' for mincore"));
  }
  absl::StatusOr<double> f = ResidentFraction(static_cast<std::byte*>(p) + (offset - base), length);
  ::munmap(p, span);
  return f;
}

absl::Status DropFileFromPageCache(const std::string& path) {
  WD_ASSIGN_OR_RETURN(UniqueFd fd, UniqueFd::Open(path, O_RDONLY));
  WD_SYSCALL_OR_RETURN(::fdatasync(fd.get()), absl::StrCat("fdatasync '", path, "'"));
  const int r = ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
  if (r != 0) return ErrnoError(r, absl::StrCat("posix_fadvise(DONTNEED) '", path, "'"));
  return absl::OkStatus();
}

}  // namespace weightd
