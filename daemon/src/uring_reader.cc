#include "weightd/detail/uring_reader.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "weightd/file_util.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

uint64_t AlignDown(uint64_t v) { return v & ~(kDirectIoAlignment - 1); }
uint64_t AlignUp(uint64_t v) { return AlignDown(v + kDirectIoAlignment - 1); }

// Retries of one request on -EAGAIN/-EINTR before the read is declared failed: the kernel
// returns them under memory pressure or signals, never forever.
constexpr int kMaxRetries = 1000;

}  // namespace

absl::StatusOr<std::unique_ptr<ReadFile>> ReadFile::Open(const std::string& path,
                                                         bool want_direct) {
  auto f = std::make_unique<ReadFile>();
  f->path_ = path;
  WD_ASSIGN_OR_RETURN(f->buffered_, OpenRegularFile(path));
  struct stat st {};
  WD_SYSCALL_OR_RETURN(::fstat(f->buffered_.get(), &st), absl::StrCat("fstat '", path, "'"));
  f->size_ = static_cast<uint64_t>(st.st_size);
  f->identity_ = IdentityOf(st);
  if (want_direct) {
    // EINVAL here is the filesystem refusing O_DIRECT (tmpfs); any other error would have
    // shown on the buffered open already, so a failure only means "buffered only". The second
    // open must reach the same file as the first (the path could have been swapped between).
    absl::StatusOr<UniqueFd> d = OpenRegularFile(path, {}, O_DIRECT);
    struct stat dst {};
    if (d.ok() && ::fstat(d->get(), &dst) == 0 && dst.st_dev == st.st_dev &&
        dst.st_ino == st.st_ino) {
      f->direct_ = std::move(*d);
      f->direct_ok_.store(true);
    }
  }
  return f;
}

struct UringReader::Impl {
  io_uring ring{};
  UringReaderOptions options;
  bool broken = false;  // a submission failed fatally; SQEs may be left in the ring
  ~Impl() { io_uring_queue_exit(&ring); }
};

UringReader::UringReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
UringReader::~UringReader() = default;

absl::StatusOr<std::unique_ptr<UringReader>> UringReader::Create(
    const UringReaderOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (impl->options.queue_depth == 0) impl->options.queue_depth = 64;
  if (impl->options.max_in_flight == 0 || impl->options.max_in_flight > impl->options.queue_depth) {
    impl->options.max_in_flight = impl->options.queue_depth;
  }
  impl->options.request_bytes =
      std::max<uint64_t>(kDirectIoAlignment, AlignDown(impl->options.request_bytes));
  const int r = io_uring_queue_init(impl->options.queue_depth, &impl->ring, 0);
  if (r < 0) {
    // Impl's destructor must not run io_uring_queue_exit on a ring that never existed.
    impl->ring = io_uring{};
    (void)impl.release();
    return ErrnoError(-r, absl::StrCat("io_uring_queue_init(", options.queue_depth, ")"));
  }
  return std::unique_ptr<UringReader>(new UringReader(std::move(impl)));
}

uint64_t UringReader::AlignedSpan(uint64_t offset, uint64_t length) {
  return AlignUp(offset + length) - AlignDown(offset);
}

absl::StatusOr<std::span<const std::byte>> UringReader::ReadExtent(ReadFile& file, uint64_t offset,
                                                                   uint64_t length,
                                                                   std::byte* buffer,
                                                                   uint64_t capacity) {
  Impl& im = *impl_;
  if (im.broken) {
    return absl::FailedPreconditionError("io_uring reader unusable after a failed submission");
  }
  const uint64_t base = AlignDown(offset);
  const uint64_t end = offset + length;
  if (reinterpret_cast<uintptr_t>(buffer) % kDirectIoAlignment != 0 ||
      AlignedSpan(offset, length) > capacity) {
    return absl::InvalidArgumentError(
        absl::StrCat("staging buffer of ", capacity, " bytes cannot hold the aligned read of ",
                     length, " bytes at offset ", offset, " of '", file.path(), "'"));
  }
  std::span<const std::byte> inner(buffer + (offset - base), length);
  if (length == 0) return inner;

  struct Req {
    uint64_t file_off;  // where this request starts in the file
    uint64_t len;
    uint64_t pos = 0;  // bytes already read
    bool direct;
    int retries = 0;
  };
  const bool direct = file.direct();
  const uint64_t first = direct ? base : offset;
  const uint64_t last = direct ? AlignUp(end) : end;
  std::vector<Req> reqs;
  reqs.reserve((last - first) / im.options.request_bytes + 1);
  for (uint64_t o = first; o < last; o += im.options.request_bytes) {
    reqs.push_back({o, std::min(im.options.request_bytes, last - o), 0, direct});
  }
  std::deque<Req*> pending;
  for (Req& r : reqs) pending.push_back(&r);

  auto where = [&](uint64_t at, uint64_t n) {
    return absl::StrCat("read ", n, " bytes at offset ", at, " of '", file.path(), "'");
  };
  auto truncated = [&](uint64_t at) {
    return absl::DataLossError(absl::StrCat("'", file.path(), "' ends at byte ", at, " but ",
                                            end - at, " more bytes were expected at offset ",
                                            offset, " (file truncated?)"));
  };
  absl::Status error;
  unsigned in_flight = 0;  // submitted, completion not yet seen
  unsigned queued = 0;     // prepared SQEs not yet accepted by the kernel
  while (!pending.empty() || in_flight > 0 || queued > 0) {
    while (error.ok() && !pending.empty() && in_flight + queued < im.options.max_in_flight) {
      io_uring_sqe* sqe = io_uring_get_sqe(&im.ring);
      if (sqe == nullptr) break;
      Req* r = pending.front();
      pending.pop_front();
      int fd = r->direct ? file.direct_fd() : file.buffered_fd();
      if (fd < 0) {  // another request of this file fell back meanwhile
        r->direct = false;
        fd = file.buffered_fd();
      }
      const uint64_t at = r->file_off + r->pos;
      io_uring_prep_read(sqe, fd, buffer + (at - base), static_cast<unsigned>(r->len - r->pos), at);
      io_uring_sqe_set_data(sqe, r);
      ++queued;
    }
    if (!error.ok()) pending.clear();
    if (queued > 0) {
      const int s = io_uring_submit(&im.ring);
      if (s >= 0) {
        queued -= static_cast<unsigned>(s);
        in_flight += static_cast<unsigned>(s);
        stats_.requests += static_cast<uint64_t>(s);
        stats_.peak_in_flight = std::max(stats_.peak_in_flight, in_flight);
      } else if (s != -EINTR && s != -EAGAIN && s != -EBUSY) {
        im.broken = true;
        if (error.ok()) error = ErrnoError(-s, "io_uring_submit");
        if (in_flight == 0) break;
      }
    }
    if (in_flight == 0) continue;
    io_uring_cqe* cqe = nullptr;
    int w = io_uring_wait_cqe(&im.ring, &cqe);
    if (w == -EINTR) continue;
    if (w < 0) {
      // The kernel still owns the buffers of the requests in flight: the reader cannot be
      // used again and the caller must not reuse `buffer` either; treat as fatal.
      im.broken = true;
      return ErrnoError(-w, "io_uring_wait_cqe");
    }
    while (cqe != nullptr) {
      Req* r = static_cast<Req*>(io_uring_cqe_get_data(cqe));
      int res = cqe->res;
      io_uring_cqe_seen(&im.ring, cqe);
      --in_flight;
      const uint64_t at = r->file_off + r->pos;
      const uint64_t asked = r->len - r->pos;
      if (im.options.fault_hook) res = im.options.fault_hook(at, static_cast<uint32_t>(asked), res);
      if (res == -EAGAIN || res == -EINTR) {
        if (++r->retries > kMaxRetries) {
          if (error.ok()) error = ErrnoError(-res, where(at, asked) + " (retries exhausted)");
        } else {
          ++stats_.retries;
          pending.push_front(r);
        }
      } else if (res == -EINVAL && r->direct) {
        // The filesystem accepted the O_DIRECT open but refuses direct reads.
        file.DisableDirect();
        r->direct = false;
        ++stats_.direct_fallbacks;
        pending.push_front(r);
      } else if (res < 0) {
        if (error.ok()) error = ErrnoError(-res, where(at, asked));
      } else if (res == 0) {
        if (at < end && error.ok()) error = truncated(at);
      } else {
        r->pos += static_cast<uint64_t>(res);
        uint64_t now = r->file_off + r->pos;
        // Past the extent's end the rest of an aligned request is padding: EOF there is fine.
        if (r->pos < r->len && now < end) {
          ++stats_.short_reads;
          if (r->direct && now % kDirectIoAlignment != 0) {
            // O_DIRECT stops short at an unaligned offset only at end of file; anything else
            // is re-read from the block start (it cannot continue unaligned).
            struct stat st {};
            if (::fstat(file.buffered_fd(), &st) == 0 && now >= static_cast<uint64_t>(st.st_size)) {
              if (error.ok()) error = truncated(now);
              goto next;
            }
            if (++r->retries > kMaxRetries) {
              if (error.ok()) error = ErrnoError(EIO, where(at, asked) + " (no progress)");
              goto next;
            }
            r->pos = AlignDown(now) - r->file_off;
          }
          pending.push_back(r);
        }
      }
    next:
      cqe = nullptr;
      if (io_uring_peek_cqe(&im.ring, &cqe) != 0) cqe = nullptr;
    }
  }
  if (!error.ok()) return error;
  return inner;
}

}  // namespace weightd
