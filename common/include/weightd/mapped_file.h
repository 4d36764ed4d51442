// MappedFile: a read-only, shared mmap of a whole file.
//
//   WD_ASSIGN_OR_RETURN(MappedFile f, MappedFile::Open("/models/x/model.safetensors"));
//   std::span<const std::byte> bytes = f.bytes();   // valid while `f` lives
//
// The mapping is MAP_SHARED + PROT_READ, so pages come straight from the page cache and nothing
// is copied up front. An empty file maps to an empty span. Move-only; the destructor unmaps.
// Const methods are safe to call from several threads.
//
// Reading through the mapping of a file that another process truncates raises SIGBUS; weightd
// code that may race with such a writer uses pread (ReadAt in checkpoint.h) instead.
#ifndef WEIGHTD_MAPPED_FILE_H_
#define WEIGHTD_MAPPED_FILE_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "weightd/file_util.h"

namespace weightd {

class MappedFile {
 public:
  MappedFile() noexcept = default;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)),
        identity_(other.identity_) {}
  MappedFile& operator=(MappedFile&& other) noexcept;
  ~MappedFile();

  // Maps `path` read-only (opened with OpenRegularFile: never blocks, regular files only).
  // Errors name the path and the failing call.
  static absl::StatusOr<MappedFile> Open(const std::string& path);

  std::span<const std::byte> bytes() const noexcept {
    return {static_cast<const std::byte*>(data_), size_};
  }
  uint64_t size() const noexcept { return size_; }
  // The file's identity when it was mapped.
  const FileIdentity& identity() const noexcept { return identity_; }

 private:
  void Unmap() noexcept;

  void* data_ = nullptr;
  uint64_t size_ = 0;
  FileIdentity identity_;
};

}  // namespace weightd

#endif  // WEIGHTD_MAPPED_FILE_H_
