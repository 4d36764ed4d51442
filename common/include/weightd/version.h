// The version of this build of weightd, for `--version`, the hello reply and packages.
//
//   std::printf("weightctl %s (git %s)\n", std::string(Version()).c_str(), ...);
//
// The git revision is read when the build runs (common/cmake/gen_version.cmake): the short
// commit hash, with "-dirty" for uncommitted changes, or "unknown" outside a git checkout.
#ifndef WEIGHTD_VERSION_H_
#define WEIGHTD_VERSION_H_

#include "absl/strings/string_view.h"

namespace weightd {

absl::string_view Version();      // "0.1.0"
absl::string_view GitRevision();  // "3f2a9c01b7de", "3f2a9c01b7de-dirty", "unknown"

}  // namespace weightd

#endif  // WEIGHTD_VERSION_H_
