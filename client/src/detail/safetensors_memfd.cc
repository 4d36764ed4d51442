#include "detail/safetensors_memfd.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "weightd/dtype.h"
#include "weightd/file_util.h"
#include "weightd/status_macros.h"

namespace weightd::detail {
namespace {

using ordered_json = nlohmann::ordered_json;

}  // namespace

absl::Status CheckUpdateTensors(std::span<const UpdateTensor> tensors) {
  absl::flat_hash_set<absl::string_view> seen;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const UpdateTensor& t = tensors[i];
    const std::string which = absl::StrCat("update tensor ", i, " '", t.name, "'");
    if (t.name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("update tensor ", i, " has an empty name"));
    }
    if (t.name == "__metadata__") {
      return absl::InvalidArgumentError(
          absl::StrCat(which, ": the name is reserved by the safetensors format"));
    }
    try {
      (void)ordered_json(t.name).dump();
    } catch (const nlohmann::json::exception&) {
      return absl::InvalidArgumentError(
          absl::StrCat("update tensor ", i, ": the name is not UTF-8 text"));
    }
    if (!seen.insert(t.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(which, ": the name appears twice"));
    }
    uint64_t bytes = static_cast<uint64_t>(DTypeSize(t.dtype));
    for (const int64_t d : t.shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(absl::StrCat(which, ": dimension ", d, " is negative"));
      }
      if (d != 0 && bytes > UINT64_MAX / static_cast<uint64_t>(d)) {
        return absl::InvalidArgumentError(absl::StrCat(which, ": the byte count overflows"));
      }
      bytes *= static_cast<uint64_t>(d);
    }
    if (bytes != t.nbytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(which, ": nbytes is ", t.nbytes, " but its shape and dtype ",
                       DTypeName(t.dtype), " make ", bytes, " bytes"));
    }
    if (t.data == nullptr && t.nbytes > 0) {
      return absl::InvalidArgumentError(absl::StrCat(which, ": data is null"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<UniqueFd> WriteSafetensorsMemfd(std::span<const UpdateTensor> tensors) {
  WD_RETURN_IF_ERROR(CheckUpdateTensors(tensors));
  ordered_json header = ordered_json::object();
  uint64_t data_bytes = 0;
  for (const UpdateTensor& t : tensors) {
    if (t.nbytes > UINT64_MAX / 2 - data_bytes) {
      return absl::InvalidArgumentError("the update tensors' bytes add up beyond 2^63");
    }
    header[t.name] = {{"dtype", DTypeName(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {data_bytes, data_bytes + t.nbytes}}};
    data_bytes += t.nbytes;
  }
  std::string text = header.dump();
  // The data section starts 8-byte aligned, as the format's writers do.
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t data_offset = 8 + text.size();
  const uint64_t total = data_offset + data_bytes;

  UniqueFd fd(::memfd_create("weightd-update", MFD_ALLOW_SEALING | MFD_CLOEXEC));
  if (!fd) return ErrnoError(errno, "memfd_create for the update tensors");
  WD_SYSCALL_OR_RETURN(::ftruncate(fd.get(), static_cast<off_t>(total)),
                       absl::StrCat("ftruncate of the update memfd to ", total, " bytes"));
  unsigned char prefix[8];
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<unsigned char>(text.size() >> (8 * i));
  WD_RETURN_IF_ERROR(PwriteExact(fd.get(), prefix, sizeof(prefix), 0, "the update memfd (header length)"));
  WD_RETURN_IF_ERROR(PwriteExact(fd.get(), text.data(), text.size(), 8, "the update memfd (header)"));
  uint64_t at = data_offset;
  for (const UpdateTensor& t : tensors) {
    WD_RETURN_IF_ERROR(
        PwriteExact(fd.get(), t.data, t.nbytes, at,
                    absl::StrCat("the update memfd (tensor '", t.name, "')")));
    at += t.nbytes;
  }
  WD_SYSCALL_OR_RETURN(
      ::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
      "sealing the update memfd");
  return fd;
}

}  // namespace weightd::detail
