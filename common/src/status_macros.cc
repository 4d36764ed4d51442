#include "weightd/status_macros.h"

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace weightd {

absl::Status ErrnoError(int err, absl::string_view what) {
  return absl::ErrnoToStatus(err, what);
}

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace weightd
