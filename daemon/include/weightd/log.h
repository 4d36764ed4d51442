// Daemon logging: one line per event on stderr, journald-friendly.
//
//   InitLogging(LogLevel::kInfo);
//   LogInfo("load %s: done %s in %.1f s (%.1f GB/s)", name, HumanBytes(n), secs, gbps);
//
// When stderr is connected to the journal ($JOURNAL_STREAM names stderr's device:inode) every
// line starts with an sd-daemon priority prefix ("<6>weightd: ..."), which journald turns into
// the entry's priority; otherwise lines read "weightd: ..." with an ISO-8601 UTC timestamp.
// Thread-safe: each line is written with a single write(2).
#ifndef WEIGHTD_LOG_H_
#define WEIGHTD_LOG_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

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

// "16.06 GB" (decimal units).
std::string FormatBytes(uint64_t bytes);

}  // namespace weightd

#endif  // WEIGHTD_LOG_H_
