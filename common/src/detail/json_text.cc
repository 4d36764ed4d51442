#include "detail/json_text.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace weightd::detail {
namespace {

// nlohmann's messages read "[json.exception.parse_error.101] parse error at line 1, column 9:
// <reason>; last read: '<input bytes>'". The position is given separately in bytes and the
// quoted input can be any bytes, so only the reason is kept.
std::string ParseErrorReason(absl::string_view what) {
  if (const size_t colon = what.find(": "); colon != absl::string_view::npos) {
    what.remove_prefix(colon + 2);
  }
  if (const size_t last = what.find("; last read"); last != absl::string_view::npos) {
    what = what.substr(0, last);
  }
  return PrintableBytes(what);
}

}  // namespace

std::string PrintableBytes(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7F) {
      out.push_back(ch);
    } else {
      absl::StrAppendFormat(&out, "\\x%02x", c);
    }
  }
  return out;
}

absl::StatusOr<nlohmann::json> ParseJsonText(absl::string_view text, absl::string_view label,
                                             bool allow_comments) {
  try {
    return nlohmann::json::parse(text.begin(), text.end(), /*cb=*/nullptr,
                                 /*allow_exceptions=*/true, allow_comments);
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte counts from 1 and points at the last byte read, the one that was wrong.
    const size_t at = e.byte > 0 ? e.byte - 1 : 0;
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": not valid JSON at byte ", at, ": ", ParseErrorReason(e.what())));
  } catch (const nlohmann::json::exception& e) {
    // Other errors of the parser: a number too large for a double ("1e999").
    absl::string_view what = e.what();
    if (const size_t bracket = what.find("] "); bracket != absl::string_view::npos) {
      what.remove_prefix(bracket + 2);
    }
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": not valid JSON: ", PrintableBytes(what)));
  }
}

absl::StatusOr<std::string> DumpJsonText(const nlohmann::json& j, int indent,
                                         absl::string_view what) {
  try {
    return j.dump(indent);
  } catch (const nlohmann::json::type_error& e) {
    // 316: "invalid UTF-8 byte at index 3: 0xFF", the only error dump() raises.
    return absl::InvalidArgumentError(absl::StrCat("cannot write ", what,
                                                   " as JSON: a string in it is not UTF-8 (",
                                                   PrintableBytes(e.what()), ")"));
  }
}

}  // namespace weightd::detail
