#include "weightd/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "absl/strings/str_cat.h"
#include "weightd/file_util.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd {

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    Unmap();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    identity_ = other.identity_;
  }
  return *this;
}

MappedFile::~MappedFile() { Unmap(); }

void MappedFile::Unmap() noexcept {
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

absl::StatusOr<MappedFile> MappedFile::Open(const std::string& path) {
  WD_ASSIGN_OR_RETURN(UniqueFd fd, OpenRegularFile(path));
  struct stat st {};
  WD_SYSCALL_OR_RETURN(::fstat(fd.get(), &st), absl::StrCat("fstat '", path, "'"));
  MappedFile f;
  f.identity_ = IdentityOf(st);
  if (st.st_size == 0) return f;
  void* p = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return ErrnoError(errno, absl::StrCat("mmap '", path, "'"));
  f.data_ = p;
  f.size_ = static_cast<uint64_t>(st.st_size);
  return f;
}

}  // namespace weightd
