// Small file helpers with Status errors that name the path.
//
//   WD_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, 16 << 20));
//
// Thread-safe (no shared state).
#ifndef WEIGHTD_FILE_UTIL_H_
#define WEIGHTD_FILE_UTIL_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace weightd {

// Reads a whole regular file. Files larger than `max_bytes` are refused with an error naming
// the path and both sizes (a guard against pointing weightd at the wrong file).
absl::StatusOr<std::string> ReadFileToString(const std::string& path, uint64_t max_bytes);

// pread until `len` bytes are read, retrying EINTR and short reads. Reaching end of file first
// is an error naming `label`, the offset and how many bytes were missing.
absl::Status PreadExact(int fd, void* dst, uint64_t len, uint64_t offset, const std::string& label);

}  // namespace weightd

#endif  // WEIGHTD_FILE_UTIL_H_
