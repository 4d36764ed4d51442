// read_gate: an LD_PRELOAD shim for tests that need a load to stay in progress until they say.
//
//   WD_READ_GATE=/tmp/x/gate WD_READ_GATE_MATCH=gated-ckpt LD_PRELOAD=libwd_read_gate.so weightd ...
//   rm /tmp/x/gate    # the blocked reads go on
//
// read, pread and preadv (and their 64-bit and v2 variants) of a descriptor whose path
// (/proc/self/fd) contains WD_READ_GATE_MATCH wait, polling every 10 ms, while the file
// WD_READ_GATE exists. Every other call goes straight to libc. Without both variables the shim
// does nothing. Thread-safe (no state but the resolved libc symbols).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static void WaitAtGate(int fd) {
  const char* gate = getenv("WD_READ_GATE");
  const char* match = getenv("WD_READ_GATE_MATCH");
  if (gate == NULL || match == NULL || *match == '\0') return;
  char link[64];
  char path[4096];
  snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(link, path, sizeof(path) - 1);
  if (n <= 0) return;
  path[n] = '\0';
  if (strstr(path, match) == NULL) return;
  while (access(gate, F_OK) == 0) usleep(10000);
}

#define WD_REAL(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

ssize_t read(int fd, void* buf, size_t count) {
  WaitAtGate(fd);
  return WD_REAL(read)(fd, buf, count);
}

ssize_t pread(int fd, void* buf, size_t count, off_t offset) {
  WaitAtGate(fd);
  return WD_REAL(pread)(fd, buf, count, offset);
}

ssize_t pread64(int fd, void* buf, size_t count, off64_t offset) {
  WaitAtGate(fd);
  return WD_REAL(pread64)(fd, buf, count, offset);
}

ssize_t preadv(int fd, const struct iovec* iov, int iovcnt, off_t offset) {
  WaitAtGate(fd);
  return WD_REAL(preadv)(fd, iov, iovcnt, offset);
}

ssize_t preadv64(int fd, const struct iovec* iov, int iovcnt, off64_t offset) {
  WaitAtGate(fd);
  return WD_REAL(preadv64)(fd, iov, iovcnt, offset);
}

ssize_t preadv2(int fd, const struct iovec* iov, int iovcnt, off_t offset, int flags) {
  WaitAtGate(fd);
  return WD_REAL(preadv2)(fd, iov, iovcnt, offset, flags);
}
