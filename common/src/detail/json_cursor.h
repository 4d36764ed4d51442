// A strict, allocation-light JSON cursor for the hot, hostile-input path: safetensors headers.
//
// It reads one value at a time from a string_view and reports errors with the byte position.
// Only what RFC 8259 allows is accepted, and every string is well-formed UTF-8. Nesting is capped
// so a hostile header cannot blow the stack. Not thread-safe; one cursor per parse.
#ifndef WEIGHTD_COMMON_DETAIL_JSON_CURSOR_H_
#define WEIGHTD_COMMON_DETAIL_JSON_CURSOR_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace weightd::detail {

// Length of the longest prefix of [p, p + n) that is well-formed UTF-8 (the Unicode standard's
// table 3-7): no overlong forms, no UTF-16 surrogates, nothing above U+10FFFF, no sequence cut
// short. When it returns less than n, `*why` says what is wrong with the sequence starting there
// ("a truncated UTF-8 sequence", ...).
size_t ValidUtf8Prefix(const char* p, size_t n, const char** why);

class JsonCursor {
 public:
  static constexpr int kMaxDepth = 64;

  explicit JsonCursor(absl::string_view text) : text_(text) {}

  size_t pos() const { return pos_; }
  bool AtEnd() const { return pos_ >= text_.size(); }

  void SkipWhitespace();
  // Skips whitespace, then returns the next character without consuming it ('\0' at the end).
  char Peek();
  // Skips whitespace and consumes `c`, or fails with a message naming what was found.
  absl::Status Expect(char c);
  // Skips whitespace; if the next character is `c`, consumes it and returns true.
  bool Consume(char c);

  // Parses a string (opening quote included) into `out`, decoding escapes to UTF-8. The raw
  // bytes must be well-formed UTF-8 (no overlong forms, surrogates, code points above U+10FFFF
  // or truncated sequences); the error names the byte offset of the first bad sequence.
  absl::Status ParseString(std::string* out);
  // Parses a non-negative integer that fits in uint64 (no sign, fraction or exponent).
  // `what` names the value for the error message.
  absl::Status ParseUint64(uint64_t* out, absl::string_view what);
  // Skips any JSON value.
  absl::Status SkipValue(int depth = 0);

  // "at byte N (found 'x')" suffix for messages.
  std::string Where() const;
  absl::Status Error(absl::string_view message) const;

 private:
  absl::Status SkipNumber();
  absl::Status SkipLiteral(absl::string_view word);

  absl::string_view text_;
  size_t pos_ = 0;
};

}  // namespace weightd::detail

#endif  // WEIGHTD_COMMON_DETAIL_JSON_CURSOR_H_
