// Error-propagation macros for absl::Status / absl::StatusOr.
//
// The Debian Abseil (20220623) ships no status macros, so weightd keeps these two, plus
// helpers that turn errno and syscall results into a Status carrying the failing call.
//
//   absl::StatusOr<Header> ReadHeader(int fd) {
//     WD_ASSIGN_OR_RETURN(std::string bytes, ReadAll(fd));
//     WD_RETURN_IF_ERROR(Validate(bytes));
//     WD_SYSCALL_OR_RETURN(fsync(fd), "fsync of the header file");
//     ...
//   }
#ifndef WEIGHTD_STATUS_MACROS_H_
#define WEIGHTD_STATUS_MACROS_H_

#include <cerrno>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace weightd {

// Returns a Status for `err` (an errno value) whose message reads "<what>: <strerror>".
// `what` should name the operation and the file or object involved.
absl::Status ErrnoError(int err, absl::string_view what);

// Adds `context` in front of a failed status's message, keeping its code. OK passes through.
absl::Status Annotate(const absl::Status& status, absl::string_view context);

}  // namespace weightd

#define WD_STATUS_CONCAT_INNER_(a, b) a##b
#define WD_STATUS_CONCAT_(a, b) WD_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function if not OK.
#define WD_RETURN_IF_ERROR(expr)                        \
  do {                                                  \
    ::absl::Status wd_status_ = (expr);                 \
    if (!wd_status_.ok()) return wd_status_;            \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status, otherwise moves the
// value into `lhs`, which may be a declaration ("auto x") or an existing lvalue.
#define WD_ASSIGN_OR_RETURN(lhs, rexpr) \
  WD_ASSIGN_OR_RETURN_IMPL_(WD_STATUS_CONCAT_(wd_statusor_, __LINE__), lhs, rexpr)

#define WD_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                              \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

// Runs a syscall-style expression that returns -1 and sets errno on failure; on failure returns
// ErrnoError(errno, what). `what` is any expression convertible to absl::string_view.
#define WD_SYSCALL_OR_RETURN(expr, what)                         \
  do {                                                           \
    if ((expr) == -1) return ::weightd::ErrnoError(errno, what); \
  } while (0)

#endif  // WEIGHTD_STATUS_MACROS_H_
