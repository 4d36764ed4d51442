// nlohmann_json at weightd's edges: parsing and writing JSON text, with the library's exceptions
// turned into Status at this one spot (it throws on malformed input, and dump() throws on a
// string that is not UTF-8).
//
//   WD_ASSIGN_OR_RETURN(nlohmann::json j, ParseJsonText(text, "my.json", /*comments=*/true));
//   WD_ASSIGN_OR_RETURN(std::string out, DumpJsonText(j, 1, "the plan"));
//
// Thread-safe: pure functions.
#ifndef WEIGHTD_COMMON_DETAIL_JSON_TEXT_H_
#define WEIGHTD_COMMON_DETAIL_JSON_TEXT_H_

#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace weightd::detail {

// Parses a whole JSON document. `allow_comments` accepts // and /* */ comments. Errors are
// INVALID_ARGUMENT "<label>: not valid JSON at byte N: <reason>", N counted from 0; bytes of the
// input that are not printable ASCII are written as \xNN in the reason.
absl::StatusOr<nlohmann::json> ParseJsonText(absl::string_view text, absl::string_view label,
                                             bool allow_comments = false);

// j.dump(indent). A string inside that is not well-formed UTF-8 gives INVALID_ARGUMENT naming
// `what` (what is being written) and the bad byte.
absl::StatusOr<std::string> DumpJsonText(const nlohmann::json& j, int indent,
                                         absl::string_view what);

// `s` with every byte outside printable ASCII written as \xNN, for error messages that quote
// input which may not be UTF-8.
std::string PrintableBytes(absl::string_view s);

}  // namespace weightd::detail

#endif  // WEIGHTD_COMMON_DETAIL_JSON_TEXT_H_
