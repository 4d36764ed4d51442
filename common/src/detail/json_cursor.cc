#include "detail/json_cursor.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace weightd::detail {
namespace {

bool IsWs(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

uint64_t Load8(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// True if any byte of `v` is '"', '\\' or a control character (< 0x20). May report true for a
// chunk without one (a borrow can flag the byte after a match); the caller rescans bytewise.
bool HasSpecialByte(uint64_t v) {
  constexpr uint64_t kOnes = 0x0101010101010101ull;
  constexpr uint64_t kHigh = 0x8080808080808080ull;
  auto has_zero = [](uint64_t x) { return (x - kOnes) & ~x & kHigh; };
  const uint64_t quote = has_zero(v ^ (kOnes * '"'));
  const uint64_t backslash = has_zero(v ^ (kOnes * '\\'));
  const uint64_t control = (v - kOnes * 0x20) & ~v & kHigh;
  return (quote | backslash | control) != 0;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace

size_t ValidUtf8Prefix(const char* p, size_t n, const char** why) {
  constexpr uint64_t kHigh = 0x8080808080808080ull;
  size_t i = 0;
  while (i < n) {
    while (i + 8 <= n && (Load8(p + i) & kHigh) == 0) i += 8;
    if (i >= n) break;
    const unsigned char c = static_cast<unsigned char>(p[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // bounds of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // below: an overlong form
      if (c == 0xED) hi = 0x9F;  // above: a UTF-16 surrogate
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // below: an overlong form
      if (c == 0xF4) hi = 0x8F;  // above: beyond U+10FFFF
    } else if (c == 0xC0 || c == 0xC1) {
      *why = "an overlong UTF-8 form";
      return i;
    } else if (c >= 0xF5) {
      *why = "a byte that never occurs in UTF-8";
      return i;
    } else {
      *why = "a UTF-8 continuation byte without a lead byte";
      return i;
    }
    if (i + len > n) {
      *why = "a truncated UTF-8 sequence";
      return i;
    }
    const unsigned char c1 = static_cast<unsigned char>(p[i + 1]);
    if (c1 < lo || c1 > hi) {
      if ((c1 & 0xC0) != 0x80) {
        *why = "a truncated UTF-8 sequence";
      } else if (c == 0xED) {
        *why = "a UTF-16 surrogate encoded in UTF-8";
      } else if (c == 0xF4) {
        *why = "a UTF-8 sequence above U+10FFFF";
      } else {
        *why = "an overlong UTF-8 form";
      }
      return i;
    }
    for (size_t k = 2; k < len; ++k) {
      if ((static_cast<unsigned char>(p[i + k]) & 0xC0) != 0x80) {
        *why = "a truncated UTF-8 sequence";
        return i;
      }
    }
    i += len;
  }
  return n;
}

void JsonCursor::SkipWhitespace() {
  while (pos_ < text_.size() && IsWs(text_[pos_])) ++pos_;
}

char JsonCursor::Peek() {
  SkipWhitespace();
  return pos_ < text_.size() ? text_[pos_] : '\0';
}

std::string JsonCursor::Where() const {
  if (pos_ >= text_.size()) return absl::StrCat("at byte ", pos_, " (end of header)");
  const unsigned char c = static_cast<unsigned char>(text_[pos_]);
  if (c >= 0x20 && c < 0x7F) return absl::StrFormat("at byte %d (found '%c')", pos_, c);
  return absl::StrFormat("at byte %d (found byte 0x%02x)", pos_, c);
}

absl::Status JsonCursor::Error(absl::string_view message) const {
  return absl::InvalidArgumentError(absl::StrCat("invalid JSON: ", message, " ", Where()));
}

absl::Status JsonCursor::Expect(char c) {
  if (Peek() != c || AtEnd()) return Error(absl::StrCat("expected '", std::string(1, c), "'"));
  ++pos_;
  return absl::OkStatus();
}

bool JsonCursor::Consume(char c) {
  if (Peek() == c && !AtEnd()) {
    ++pos_;
    return true;
  }
  return false;
}

absl::Status JsonCursor::ParseString(std::string* out) {
  if (Peek() != '"' || AtEnd()) return Error("expected a string");
  ++pos_;
  out->clear();
  while (true) {
    // Fast path: copy the run of plain characters in one go, finding its end 8 bytes at a time
    // (tensor names are long; this loop is most of the time spent on a large header).
    size_t run = pos_;
    while (run + 8 <= text_.size() && !HasSpecialByte(Load8(text_.data() + run))) run += 8;
    while (run < text_.size()) {
      const unsigned char c = static_cast<unsigned char>(text_[run]);
      if (c == '"' || c == '\\' || c < 0x20) break;
      ++run;
    }
    // A multi-byte sequence holds no byte below 0x80, so it never straddles the end of a run:
    // checking each run on its own checks the whole string.
    const char* why = nullptr;
    const size_t valid = ValidUtf8Prefix(text_.data() + pos_, run - pos_, &why);
    if (valid != run - pos_) {
      pos_ += valid;
      return Error(absl::StrCat("string holds ", why));
    }
    out->append(text_.data() + pos_, run - pos_);
    pos_ = run;
    if (pos_ >= text_.size()) return Error("unterminated string");
    const char c = text_[pos_];
    if (c == '"') {
      ++pos_;
      return absl::OkStatus();
    }
    if (c != '\\') return Error("control character inside a string");
    if (pos_ + 1 >= text_.size()) return Error("unterminated escape");
    const char e = text_[pos_ + 1];
    pos_ += 2;
    switch (e) {
      case '"':
        out->push_back('"');
        break;
      case '\\':
        out->push_back('\\');
        break;
      case '/':
        out->push_back('/');
        break;
      case 'b':
        out->push_back('\b');
        break;
      case 'f':
        out->push_back('\f');
        break;
      case 'n':
        out->push_back('\n');
        break;
      case 'r':
        out->push_back('\r');
        break;
      case 't':
        out->push_back('\t');
        break;
      case 'u': {
        auto read_hex4 = [&](uint32_t* v) -> bool {
          if (pos_ + 4 > text_.size()) return false;
          uint32_t r = 0;
          for (int i = 0; i < 4; ++i) {
            const int h = HexValue(text_[pos_ + i]);
            if (h < 0) return false;
            r = (r << 4) | static_cast<uint32_t>(h);
          }
          pos_ += 4;
          *v = r;
          return true;
        };
        uint32_t cp = 0;
        if (!read_hex4(&cp)) return Error("bad \\u escape");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          uint32_t lo = 0;
          if (pos_ + 2 > text_.size() || text_[pos_] != '\\' || text_[pos_ + 1] != 'u') {
            return Error("unpaired UTF-16 surrogate in \\u escape");
          }
          pos_ += 2;
          if (!read_hex4(&lo) || lo < 0xDC00 || lo > 0xDFFF) {
            return Error("unpaired UTF-16 surrogate in \\u escape");
          }
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
          return Error("unpaired UTF-16 surrogate in \\u escape");
        }
        AppendUtf8(cp, out);
        break;
      }
      default:
        pos_ -= 1;
        return Error("unknown escape");
    }
  }
}

absl::Status JsonCursor::ParseUint64(uint64_t* out, absl::string_view what) {
  const char first = Peek();
  if (first == '-') return Error(absl::StrCat(what, " must not be negative"));
  if (first < '0' || first > '9' || AtEnd()) {
    return Error(absl::StrCat(what, " must be a non-negative integer"));
  }
  if (first == '0' && pos_ + 1 < text_.size() && text_[pos_ + 1] >= '0' && text_[pos_ + 1] <= '9') {
    return Error(absl::StrCat(what, " has a leading zero"));
  }
  uint64_t v = 0;
  while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
    const uint64_t digit = static_cast<uint64_t>(text_[pos_] - '0');
    if (v > (UINT64_MAX - digit) / 10) {
      return Error(absl::StrCat(what, " does not fit in 64 bits"));
    }
    v = v * 10 + digit;
    ++pos_;
  }
  if (pos_ < text_.size() && (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E')) {
    return Error(absl::StrCat(what, " must be an integer"));
  }
  *out = v;
  return absl::OkStatus();
}

absl::Status JsonCursor::SkipNumber() {
  if (pos_ < text_.size() && text_[pos_] == '-') ++pos_;
  auto digits = [&]() {
    const size_t start = pos_;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    return pos_ - start;
  };
  if (pos_ < text_.size() && text_[pos_] == '0') {
    ++pos_;
  } else if (digits() == 0) {
    return Error("malformed number");
  }
  if (pos_ < text_.size() && text_[pos_] == '.') {
    ++pos_;
    if (digits() == 0) return Error("malformed number");
  }
  if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
    ++pos_;
    if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
    if (digits() == 0) return Error("malformed number");
  }
  return absl::OkStatus();
}

absl::Status JsonCursor::SkipLiteral(absl::string_view word) {
  if (text_.substr(pos_, word.size()) != word) return Error("unexpected token");
  pos_ += word.size();
  return absl::OkStatus();
}

absl::Status JsonCursor::SkipValue(int depth) {
  if (depth > kMaxDepth) return Error("nesting deeper than 64 levels");
  std::string scratch;
  switch (Peek()) {
    case '"':
      return ParseString(&scratch);
    case '{': {
      ++pos_;
      if (Consume('}')) return absl::OkStatus();
      do {
        if (absl::Status s = ParseString(&scratch); !s.ok()) return s;
        if (absl::Status s = Expect(':'); !s.ok()) return s;
        if (absl::Status s = SkipValue(depth + 1); !s.ok()) return s;
      } while (Consume(','));
      return Expect('}');
    }
    case '[': {
      ++pos_;
      if (Consume(']')) return absl::OkStatus();
      do {
        if (absl::Status s = SkipValue(depth + 1); !s.ok()) return s;
      } while (Consume(','));
      return Expect(']');
    }
    case 't':
      return SkipLiteral("true");
    case 'f':
      return SkipLiteral("false");
    case 'n':
      return SkipLiteral("null");
    default:
      if (AtEnd()) return Error("expected a value");
      return SkipNumber();
  }
}

}  // namespace weightd::detail
