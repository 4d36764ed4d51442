#include "weightd/log.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace weightd {
namespace {

std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<bool> g_journal{false};

bool StderrIsJournal() {
  const char* env = std::getenv("JOURNAL_STREAM");
  if (env == nullptr) return false;
  unsigned long long dev = 0, ino = 0;
  if (std::sscanf(env, "%llu:%llu", &dev, &ino) != 2) return false;
  struct stat st;
  if (::fstat(STDERR_FILENO, &st) != 0) return false;
  return st.st_dev == dev && st.st_ino == ino;
}

}  // namespace

absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name) {
  if (name == "error" || name == "err") return LogLevel::kError;
  if (name == "warning" || name == "warn") return LogLevel::kWarning;
  if (name == "notice") return LogLevel::kNotice;
  if (name == "info") return LogLevel::kInfo;
  if (name == "debug") return LogLevel::kDebug;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown log level '", name, "' (expected error, warning, notice, info or debug)"));
}

void InitLogging(LogLevel min_level) {
  g_min_level.store(static_cast<int>(min_level));
  g_journal.store(StderrIsJournal());
}

bool LogEnabled(LogLevel level) { return static_cast<int>(level) <= g_min_level.load(); }

void LogLine(LogLevel level, absl::string_view message) {
  std::string line;
  if (g_journal.load()) {
    line = absl::StrCat("<", static_cast<int>(level), ">weightd: ", message, "\n");
  } else {
    line = absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
                        " weightd: ", message, "\n");
  }
  // One write per line keeps lines of concurrent threads whole.
  (void)!::write(STDERR_FILENO, line.data(), line.size());
}

bool LogRateLimit::Admit(absl::Time now, uint64_t* suppressed) {
  absl::MutexLock l(&mu_);
  if (now - window_start_ >= interval_) {
    window_start_ = now;
    written_ = 0;
  }
  if (written_ >= lines_) {
    ++suppressed_;
    return false;
  }
  ++written_;
  *suppressed = std::exchange(suppressed_, 0);
  return true;
}

void LogLineLimited(LogRateLimit& limit, LogLevel level, absl::string_view message) {
  if (!LogEnabled(level)) return;
  uint64_t suppressed = 0;
  if (!limit.Admit(absl::Now(), &suppressed)) return;
  if (suppressed == 0) return LogLine(level, message);
  LogLine(level, absl::StrCat(message, " [suppressed ", suppressed, " similar lines]"));
}

std::string FormatBytes(uint64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= 1000000000ull) return absl::StrFormat("%.2f GB", b / 1e9);
  if (bytes >= 1000000ull) return absl::StrFormat("%.2f MB", b / 1e6);
  if (bytes >= 1000ull) return absl::StrFormat("%.2f kB", b / 1e3);
  return absl::StrCat(bytes, " B");
}

}  // namespace weightd
