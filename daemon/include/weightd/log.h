// Daemon logging: one line per event on stderr, journald-friendly.
//
//   InitLogging(LogLevel::kInfo);
//   LogInfo("load %s: done %s in %.1f s (%.1f GB/s)", name, HumanBytes(n), secs, gbps);
//
// When stderr is connected to the journal ($JOURNAL_STREAM names stderr's device:inode) every
// line starts with an sd-daemon priority prefix ("<6>weightd: ..."), which journald turns into
// the entry's priority; otherwise lines read "weightd: ..." with an ISO-8601 UTC timestamp.
//
// A line that a client or the environment can repeat at will (a refused request, a failing
// accept) goes through WD_LOG_LIMITED, which writes at most kLogLimitLines such lines per
// kLogLimitInterval from one call site and appends to the next line it writes how many it
// dropped:
//
//   WD_LOG_LIMITED(LogLevel::kWarning, "accept failed: %s", std::strerror(errno));
//   // ... weightd: accept failed: Too many open files [suppressed 51234 similar lines]
//
// Thread-safe: each line is written with a single write(2).
#ifndef WEIGHTD_LOG_H_
#define WEIGHTD_LOG_H_

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace weightd {

// Values are the syslog priorities.
enum class LogLevel : int { kError = 3, kWarning = 4, kNotice = 5, kInfo = 6, kDebug = 7 };

// "error", "warning", "notice", "info", "debug".
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name);

// Sets the threshold and detects journald. Call once at start; safe to call again.
void InitLogging(LogLevel min_level);

bool LogEnabled(LogLevel level);
void LogLine(LogLevel level, absl::string_view message);

template <typename... Args>
void Logf(LogLevel level, const absl::FormatSpec<Args...>& format, const Args&... args) {
  if (LogEnabled(level)) LogLine(level, absl::StrFormat(format, args...));
}
template <typename... Args>
void LogInfo(const absl::FormatSpec<Args...>& format, const Args&... args) {
  Logf(LogLevel::kInfo, format, args...);
}
template <typename... Args>
void LogNotice(const absl::FormatSpec<Args...>& format, const Args&... args) {
  Logf(LogLevel::kNotice, format, args...);
}
template <typename... Args>
void LogWarning(const absl::FormatSpec<Args...>& format, const Args&... args) {
  Logf(LogLevel::kWarning, format, args...);
}
template <typename... Args>
void LogError(const absl::FormatSpec<Args...>& format, const Args&... args) {
  Logf(LogLevel::kError, format, args...);
}
template <typename... Args>
void LogDebug(const absl::FormatSpec<Args...>& format, const Args&... args) {
  Logf(LogLevel::kDebug, format, args...);
}

// The budget of one call site of WD_LOG_LIMITED.
inline constexpr int kLogLimitLines = 5;
inline constexpr absl::Duration kLogLimitInterval = absl::Seconds(10);

// Admits at most `lines` lines per `interval` (a fixed window that opens with the first line
// after the previous one closed) and counts the rest. Thread-safe.
class LogRateLimit {
 public:
  LogRateLimit(int lines, absl::Duration interval) : lines_(lines), interval_(interval) {}
  LogRateLimit(const LogRateLimit&) = delete;
  LogRateLimit& operator=(const LogRateLimit&) = delete;

  // True when a line may be written at `now`; then *suppressed is the number of lines refused
  // since the last admitted one (and is reset). False counts the line as suppressed.
  bool Admit(absl::Time now, uint64_t* suppressed);

 private:
  const int lines_;
  const absl::Duration interval_;
  absl::Mutex mu_;
  absl::Time window_start_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  int written_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t suppressed_ ABSL_GUARDED_BY(mu_) = 0;
};

// Writes the line if `level` is enabled and `limit` admits it, with " [suppressed K similar
// lines]" appended when K lines of the same limit were dropped before it.
void LogLineLimited(LogRateLimit& limit, LogLevel level, absl::string_view message);

template <typename... Args>
void LogfLimited(LogRateLimit& limit, LogLevel level, const absl::FormatSpec<Args...>& format,
                 const Args&... args) {
  if (LogEnabled(level)) LogLineLimited(limit, level, absl::StrFormat(format, args...));
}

// "16.06 GB" (decimal units).
std::string FormatBytes(uint64_t bytes);

}  // namespace weightd

// Rate-limited logging, one budget per call site (a function-local static LogRateLimit).
#define WD_LOG_LIMITED(level, ...)                                                  \
  do {                                                                              \
    static ::weightd::LogRateLimit wd_log_limit_site(::weightd::kLogLimitLines,     \
                                                     ::weightd::kLogLimitInterval); \
    ::weightd::LogfLimited(wd_log_limit_site, level, __VA_ARGS__);                  \
  } while (0)

#endif  // WEIGHTD_LOG_H_
