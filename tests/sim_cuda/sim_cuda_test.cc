// Tests of the simulated CUDA driver (libwdsim_cuda.so), loaded the way weightd loads a driver:
// dlopen(path), dlsym("cuGetProcAddress_v2"), every entry point resolved by base name.
//
// The simulation reads its environment once per process, so every case runs in a fork()ed child
// that sets its variables, then loads the library fresh (this process never loads it). A child
// reports gtest failures through its exit status; its stderr is captured for the assertions on
// the simulation's messages.
#include <cuda.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "sim_stats.h"
#include "weightd/dtype.h"
#include "weightd/kernels/convert.h"
#include "weightd/kernels/device_kernels.h"

namespace weightd::sim {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

// The entry points, typed as cuda.h declares them (names macro-renamed to the 12.0 ABI versions).
struct Cu {
  CUresult (*GetProcAddress)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);
#define WDSIM_FN(name) decltype(&::name) name;
  WDSIM_FN(cuInit)
  WDSIM_FN(cuDriverGetVersion)
  WDSIM_FN(cuGetErrorName)
  WDSIM_FN(cuGetErrorString)
  WDSIM_FN(cuDeviceGetCount)
  WDSIM_FN(cuDeviceGet)
  WDSIM_FN(cuDeviceGetUuid)
  WDSIM_FN(cuDeviceGetName)
  WDSIM_FN(cuDeviceTotalMem)
  WDSIM_FN(cuDeviceGetAttribute)
  WDSIM_FN(cuDevicePrimaryCtxRetain)
  WDSIM_FN(cuDevicePrimaryCtxRelease)
  WDSIM_FN(cuCtxSetCurrent)
  WDSIM_FN(cuCtxSynchronize)
  WDSIM_FN(cuMemGetInfo)
  WDSIM_FN(cuMemGetAllocationGranularity)
  WDSIM_FN(cuMemCreate)
  WDSIM_FN(cuMemRelease)
  WDSIM_FN(cuMemAddressReserve)
  WDSIM_FN(cuMemAddressFree)
  WDSIM_FN(cuMemMap)
  WDSIM_FN(cuMemUnmap)
  WDSIM_FN(cuMemSetAccess)
  WDSIM_FN(cuMemExportToShareableHandle)
  WDSIM_FN(cuMemImportFromShareableHandle)
  WDSIM_FN(cuMemAlloc)
  WDSIM_FN(cuMemFree)
  WDSIM_FN(cuMemHostAlloc)
  WDSIM_FN(cuMemFreeHost)
  WDSIM_FN(cuMemHostRegister)
  WDSIM_FN(cuMemHostUnregister)
  WDSIM_FN(cuMemcpyHtoD)
  WDSIM_FN(cuMemcpyDtoH)
  WDSIM_FN(cuMemcpyDtoD)
  WDSIM_FN(cuMemcpyHtoDAsync)
  WDSIM_FN(cuMemcpyDtoHAsync)
  WDSIM_FN(cuMemsetD8)
  WDSIM_FN(cuMemsetD8Async)
  WDSIM_FN(cuStreamCreate)
  WDSIM_FN(cuStreamDestroy)
  WDSIM_FN(cuStreamSynchronize)
  WDSIM_FN(cuStreamWaitEvent)
  WDSIM_FN(cuEventCreate)
  WDSIM_FN(cuEventDestroy)
  WDSIM_FN(cuEventRecord)
  WDSIM_FN(cuEventSynchronize)
  WDSIM_FN(cuEventQuery)
  WDSIM_FN(cuModuleLoadData)
  WDSIM_FN(cuModuleUnload)
  WDSIM_FN(cuModuleGetFunction)
  WDSIM_FN(cuLaunchKernel)
#undef WDSIM_FN
};

// Loads the library and resolves every entry point as weightd does; fails the test on a miss.
const Cu& LoadCu() {
  static Cu cu;
  void* lib = ::dlopen(WDSIM_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  EXPECT_NE(lib, nullptr) << ::dlerror();
  if (lib == nullptr) std::_Exit(2);
  cu.GetProcAddress =
      reinterpret_cast<decltype(cu.GetProcAddress)>(::dlsym(lib, "cuGetProcAddress_v2"));
  EXPECT_NE(cu.GetProcAddress, nullptr);
  EXPECT_NE(::dlsym(lib, "wdsim_abi_version"), nullptr);
  auto get = [&](auto& fn, const char* name) {
    void* p = nullptr;
    CUdriverProcAddressQueryResult q{};
    EXPECT_EQ(cu.GetProcAddress(name, &p, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &q), CUDA_SUCCESS)
        << name;
    EXPECT_EQ(q, CU_GET_PROC_ADDRESS_SUCCESS) << name;
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
  };
#define WDSIM_GET(name) get(cu.name, #name);
  WDSIM_GET(cuInit)
  WDSIM_GET(cuDriverGetVersion)
  WDSIM_GET(cuGetErrorName)
  WDSIM_GET(cuGetErrorString)
  WDSIM_GET(cuDeviceGetCount)
  WDSIM_GET(cuDeviceGet)
  WDSIM_GET(cuDeviceGetUuid)
  WDSIM_GET(cuDeviceGetName)
  WDSIM_GET(cuDeviceTotalMem)
  WDSIM_GET(cuDeviceGetAttribute)
  WDSIM_GET(cuDevicePrimaryCtxRetain)
  WDSIM_GET(cuDevicePrimaryCtxRelease)
  WDSIM_GET(cuCtxSetCurrent)
  WDSIM_GET(cuCtxSynchronize)
  WDSIM_GET(cuMemGetInfo)
  WDSIM_GET(cuMemGetAllocationGranularity)
  WDSIM_GET(cuMemCreate)
  WDSIM_GET(cuMemRelease)
  WDSIM_GET(cuMemAddressReserve)
  WDSIM_GET(cuMemAddressFree)
  WDSIM_GET(cuMemMap)
  WDSIM_GET(cuMemUnmap)
  WDSIM_GET(cuMemSetAccess)
  WDSIM_GET(cuMemExportToShareableHandle)
  WDSIM_GET(cuMemImportFromShareableHandle)
  WDSIM_GET(cuMemAlloc)
  WDSIM_GET(cuMemFree)
  WDSIM_GET(cuMemHostAlloc)
  WDSIM_GET(cuMemFreeHost)
  WDSIM_GET(cuMemHostRegister)
  WDSIM_GET(cuMemHostUnregister)
  WDSIM_GET(cuMemcpyHtoD)
  WDSIM_GET(cuMemcpyDtoH)
  WDSIM_GET(cuMemcpyDtoD)
  WDSIM_GET(cuMemcpyHtoDAsync)
  WDSIM_GET(cuMemcpyDtoHAsync)
  WDSIM_GET(cuMemsetD8)
  WDSIM_GET(cuMemsetD8Async)
  WDSIM_GET(cuStreamCreate)
  WDSIM_GET(cuStreamDestroy)
  WDSIM_GET(cuStreamSynchronize)
  WDSIM_GET(cuStreamWaitEvent)
  WDSIM_GET(cuEventCreate)
  WDSIM_GET(cuEventDestroy)
  WDSIM_GET(cuEventRecord)
  WDSIM_GET(cuEventSynchronize)
  WDSIM_GET(cuEventQuery)
  WDSIM_GET(cuModuleLoadData)
  WDSIM_GET(cuModuleUnload)
  WDSIM_GET(cuModuleGetFunction)
  WDSIM_GET(cuLaunchKernel)
#undef WDSIM_GET
  return cu;
}

#define CU_OK(call) ASSERT_EQ((call), CUDA_SUCCESS) << #call

// cuInit, then device `dev`'s primary context made current.
CUcontext InitCtx(const Cu& cu, int dev = 0) {
  CUcontext ctx = nullptr;
  EXPECT_EQ(cu.cuInit(0), CUDA_SUCCESS);
  EXPECT_EQ(cu.cuDevicePrimaryCtxRetain(&ctx, dev), CUDA_SUCCESS);
  EXPECT_EQ(cu.cuCtxSetCurrent(ctx), CUDA_SUCCESS);
  return ctx;
}

CUmemAllocationProp DeviceProp(int dev, bool exportable) {
  CUmemAllocationProp p{};
  p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  p.location.id = dev;
  if (exportable) p.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  return p;
}

// One cuMemCreate'd allocation mapped at its own reservation.
struct VmmRange {
  CUmemGenericAllocationHandle handle = 0;
  CUdeviceptr ptr = 0;
  size_t size = 0;
};

void MapRange(const Cu& cu, CUmemGenericAllocationHandle h, size_t size, CUmemAccess_flags flags,
              int dev, VmmRange* out) {
  out->handle = h;
  out->size = size;
  CU_OK(cu.cuMemAddressReserve(&out->ptr, size, 0, 0, 0));
  CU_OK(cu.cuMemMap(out->ptr, size, 0, h, 0));
  CUmemAccessDesc d{};
  d.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  d.location.id = dev;
  d.flags = flags;
  CU_OK(cu.cuMemSetAccess(out->ptr, size, &d, 1));
}

void UnmapRange(const Cu& cu, const VmmRange& r) {
  EXPECT_EQ(cu.cuMemUnmap(r.ptr, r.size), CUDA_SUCCESS);
  EXPECT_EQ(cu.cuMemAddressFree(r.ptr, r.size), CUDA_SUCCESS);
  EXPECT_EQ(cu.cuMemRelease(r.handle), CUDA_SUCCESS);
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct ChildResult {
  int status = 0;
  std::string err;  // the child's stderr
  bool ok() const { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }
};

// Runs `body` in a fork()ed child with `env` set and stderr captured.
ChildResult InChild(const std::vector<std::pair<std::string, std::string>>& env,
                    const std::function<void()>& body) {
  char path[] = "/tmp/wdsim_test_stderr_XXXXXX";
  const int fd = ::mkstemp(path);
  EXPECT_GE(fd, 0);
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fd, 2);
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    body();
    std::fflush(stdout);
    std::_Exit(::testing::Test::HasFailure() ? 1 : 0);
  }
  ChildResult r;
  ::waitpid(pid, &r.status, 0);
  ::close(fd);
  r.err = ReadAll(path);
  ::unlink(path);
  return r;
}

#define EXPECT_CHILD_OK(r) \
  EXPECT_TRUE((r).ok()) << "child status " << (r).status << ":\n" << (r).err

std::string MakeTempDir() {
  char dir[] = "/tmp/wdsim_test_dir_XXXXXX";
  EXPECT_NE(::mkdtemp(dir), nullptr);
  return dir;
}

// A temporary directory, removed with its stats files when the test ends.
struct TempDir {
  std::string path = MakeTempDir();
  TempDir() = default;
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() { std::filesystem::remove_all(path); }
};

std::string StatsPath(const std::string& dir) {
  return dir + "/" + std::to_string(::getpid()) + ".stats";
}

uint64_t Load(const uint64_t& f) { return __atomic_load_n(&f, __ATOMIC_RELAXED); }

// Every live-object counter of device `d` is zero.
void ExpectDeviceClean(const SimDeviceStats& d) {
  EXPECT_EQ(Load(d.allocated_bytes), 0u);
  EXPECT_EQ(Load(d.allocations), 0u);
  EXPECT_EQ(Load(d.mappings), 0u);
  EXPECT_EQ(Load(d.reserved_ranges), 0u);
  EXPECT_EQ(Load(d.streams), 0u);
  EXPECT_EQ(Load(d.events), 0u);
  EXPECT_EQ(Load(d.modules), 0u);
}

// The harness itself: a failed expectation in the child fails the child.
TEST(SimCuda, ChildFailuresPropagate) {
  const ChildResult r = InChild({}, [] { EXPECT_EQ(1, 2) << "deliberate"; });
  EXPECT_FALSE(r.ok());
}

TEST(SimCuda, LookupInitAndNoContext) {
  const TempDir tmp;
  const std::string& dir = tmp.path;
  ChildResult r = InChild({{"WDSIM_STATS_DIR", dir}}, [&] {
    const Cu& cu = LoadCu();
    void* p = reinterpret_cast<void*>(1);
    CUdriverProcAddressQueryResult q{};
    EXPECT_EQ(cu.GetProcAddress("cuNoSuchThing", &p, 12000, 0, &q), CUDA_ERROR_NOT_FOUND);
    EXPECT_EQ(q, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
    EXPECT_EQ(p, nullptr);
    int v = 0;
    CU_OK(cu.cuDriverGetVersion(&v));
    EXPECT_EQ(v, 13000);
    int n = 0;
    EXPECT_EQ(cu.cuDeviceGetCount(&n), CUDA_ERROR_NOT_INITIALIZED);
    CU_OK(cu.cuInit(0));
    CU_OK(cu.cuDeviceGetCount(&n));
    EXPECT_EQ(n, 1);
    char name[64];
    CU_OK(cu.cuDeviceGetName(name, sizeof(name), 0));
    EXPECT_STREQ(name, "weightd simulated GPU 0");
    int major = 0, vmm = 0;
    CU_OK(cu.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0));
    CU_OK(
        cu.cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, 0));
    EXPECT_EQ(major, 9);
    EXPECT_EQ(vmm, 1);
    size_t total = 0, free = 0;
    CU_OK(cu.cuDeviceTotalMem(&total, 0));
    EXPECT_EQ(total, size_t{8} << 30);
    EXPECT_EQ(cu.cuMemGetInfo(&free, &total), CUDA_ERROR_INVALID_CONTEXT);
    const char* s = nullptr;
    CU_OK(cu.cuGetErrorName(CUDA_ERROR_INVALID_CONTEXT, &s));
    EXPECT_STREQ(s, "CUDA_ERROR_INVALID_CONTEXT");
    CU_OK(cu.cuGetErrorString(CUDA_ERROR_INVALID_VALUE, &s));
    EXPECT_STREQ(s, "invalid argument");
    const SimStats* st = MapStats(StatsPath(dir));
    ASSERT_NE(st, nullptr);
    EXPECT_EQ(Load(st->misuse), 1u);
    InitCtx(cu);
    CU_OK(cu.cuMemGetInfo(&free, &total));
    EXPECT_EQ(free, total);
  });
  EXPECT_CHILD_OK(r);
  EXPECT_NE(r.err.find("wdsim: misuse in cuMemGetInfo: no current context"), std::string::npos)
      << r.err;
}

TEST(SimCuda, VmmRoundTripAndAccessRules) {
  ChildResult r = InChild({}, [] {
    const Cu& cu = LoadCu();
    InitCtx(cu);
    const CUmemAllocationProp prop = DeviceProp(0, false);
    size_t gran = 0;
    CU_OK(cu.cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    EXPECT_EQ(gran, 2 * kMiB);
    CUmemGenericAllocationHandle h = 0;
    EXPECT_EQ(cu.cuMemCreate(&h, 3 * kMiB, &prop, 0), CUDA_ERROR_INVALID_VALUE);
    CU_OK(cu.cuMemCreate(&h, 4 * kMiB, &prop, 0));
    CUdeviceptr ptr = 0;
    CU_OK(cu.cuMemAddressReserve(&ptr, 4 * kMiB, 0, 0, 0));
    CU_OK(cu.cuMemMap(ptr, 4 * kMiB, 0, h, 0));
    std::vector<uint8_t> in(4 * kMiB), out(4 * kMiB);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>(i * 7 + 3);
    // Mapped without cuMemSetAccess: not accessible.
    EXPECT_EQ(cu.cuMemcpyHtoD(ptr, in.data(), in.size()), CUDA_ERROR_INVALID_VALUE);
    CUmemAccessDesc d{};
    d.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    d.location.id = 0;
    d.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CU_OK(cu.cuMemSetAccess(ptr, 4 * kMiB, &d, 1));
    CU_OK(cu.cuMemcpyHtoD(ptr, in.data(), in.size()));
    CU_OK(cu.cuMemcpyDtoH(out.data(), ptr, out.size()));
    EXPECT_EQ(in, out);
    CU_OK(cu.cuMemsetD8(ptr + 100, 0xEE, 10));
    CU_OK(cu.cuMemcpyDtoD(ptr + 2 * kMiB, ptr, 2 * kMiB));
    CU_OK(cu.cuMemcpyDtoH(out.data(), ptr + 2 * kMiB, 2 * kMiB));
    EXPECT_EQ(out[99], in[99]);
    EXPECT_EQ(out[100], 0xEE);
    EXPECT_EQ(out[110], in[110]);
    // Past the end of the mapping, and a host pointer used as a device pointer.
    EXPECT_EQ(cu.cuMemcpyDtoH(out.data(), ptr + 4 * kMiB - 8, 16), CUDA_ERROR_INVALID_VALUE);
    EXPECT_EQ(cu.cuMemcpyDtoH(out.data(), reinterpret_cast<CUdeviceptr>(in.data()), 16),
              CUDA_ERROR_INVALID_VALUE);
    // The address range cannot go while mapped; release before unmap is allowed.
    EXPECT_EQ(cu.cuMemAddressFree(ptr, 4 * kMiB), CUDA_ERROR_INVALID_VALUE);
    CU_OK(cu.cuMemRelease(h));
    CU_OK(cu.cuMemcpyDtoH(out.data(), ptr, 16));
    EXPECT_EQ(std::memcmp(out.data(), in.data(), 16), 0);
    CU_OK(cu.cuMemUnmap(ptr, 4 * kMiB));
    CU_OK(cu.cuMemAddressFree(ptr, 4 * kMiB));
    EXPECT_EQ(cu.cuMemRelease(h), CUDA_ERROR_INVALID_VALUE);
    // cuMemAlloc memory uses the same machinery.
    CUdeviceptr a = 0;
    CU_OK(cu.cuMemAlloc(&a, 1000));
    CU_OK(cu.cuMemcpyHtoD(a, in.data(), 1000));
    CU_OK(cu.cuMemcpyDtoH(out.data(), a, 1000));
    EXPECT_EQ(std::memcmp(out.data(), in.data(), 1000), 0);
    CU_OK(cu.cuMemFree(a));
    EXPECT_EQ(cu.cuMemFree(a), CUDA_ERROR_INVALID_VALUE);
  });
  EXPECT_CHILD_OK(r);
  EXPECT_NE(r.err.find("not accessible from device 0 (no cuMemSetAccess)"), std::string::npos);
}

TEST(SimCuda, OutOfMemoryAndCountersReturnToZero) {
  const TempDir tmp;
  const std::string& dir = tmp.path;
  ChildResult r = InChild({{"WDSIM_DEVICES", "64MiB,32MiB"}, {"WDSIM_STATS_DIR", dir}}, [&] {
    const Cu& cu = LoadCu();
    InitCtx(cu, 1);
    const CUmemAllocationProp prop = DeviceProp(1, false);
    CUmemGenericAllocationHandle a = 0, b = 0;
    CU_OK(cu.cuMemCreate(&a, 32 * kMiB, &prop, 0));
    EXPECT_EQ(cu.cuMemCreate(&b, 2 * kMiB, &prop, 0), CUDA_ERROR_OUT_OF_MEMORY);
    size_t free = 1, total = 0;
    CU_OK(cu.cuMemGetInfo(&free, &total));
    EXPECT_EQ(free, 0u);
    EXPECT_EQ(total, 32 * kMiB);
    const SimStats* st = MapStats(StatsPath(dir));
    ASSERT_NE(st, nullptr);
    EXPECT_EQ(Load(st->device[1].allocated_bytes), 32 * kMiB);
    CU_OK(cu.cuMemRelease(a));
    CU_OK(cu.cuMemGetInfo(&free, &total));
    EXPECT_EQ(free, 32 * kMiB);
    CU_OK(cu.cuMemCreate(&b, 32 * kMiB, &prop, 0));
    CU_OK(cu.cuMemRelease(b));
    ExpectDeviceClean(st->device[1]);
    EXPECT_EQ(Load(st->device_count), 2u);
  });
  EXPECT_CHILD_OK(r);
}

// Sends `fd` over a unix socket, as weightd hands device arenas to clients.
void SendFd(int sock, int fd) {
  char byte = 0;
  iovec iov{&byte, 1};
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = ctl;
  msg.msg_controllen = sizeof(ctl);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  ASSERT_EQ(::sendmsg(sock, &msg, 0), 1);
}

int RecvFd(int sock) {
  char byte = 0;
  iovec iov{&byte, 1};
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = ctl;
  msg.msg_controllen = sizeof(ctl);
  if (::recvmsg(sock, &msg, 0) != 1) return -1;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  if (c == nullptr || c->cmsg_type != SCM_RIGHTS) return -1;
  int fd = -1;
  std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
  return fd;
}

TEST(SimCuda, ExportToForkedChildWhichMapsReadOnly) {
  const TempDir tmp;
  const std::string& dir = tmp.path;
  ChildResult r = InChild({{"WDSIM_STATS_DIR", dir}}, [&] {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    // The importer is forked before this process loads the library: a fresh driver instance.
    const pid_t importer = ::fork();
    if (importer == 0) {
      const int fd = RecvFd(sv[1]);
      const Cu& cu = LoadCu();
      InitCtx(cu);
      CUmemGenericAllocationHandle h = 0;
      EXPECT_EQ(cu.cuMemImportFromShareableHandle(&h, reinterpret_cast<void*>(intptr_t{0}),
                                                  CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                CUDA_ERROR_INVALID_VALUE);  // stdin is no simulated allocation
      CU_OK(cu.cuMemImportFromShareableHandle(&h, reinterpret_cast<void*>(intptr_t{fd}),
                                              CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
      EXPECT_GE(::fcntl(fd, F_GETFD), 0) << "import must not consume the fd";
      ::close(fd);
      VmmRange range;
      MapRange(cu, h, 2 * kMiB, CU_MEM_ACCESS_FLAGS_PROT_READ, 0, &range);
      std::vector<uint8_t> got(2 * kMiB);
      CU_OK(cu.cuMemcpyDtoH(got.data(), range.ptr, got.size()));
      for (size_t i = 0; i < got.size(); i += 4099) {
        ASSERT_EQ(got[i], static_cast<uint8_t>(i % 251)) << i;
      }
      EXPECT_EQ(cu.cuMemsetD8(range.ptr, 0, 64), CUDA_ERROR_INVALID_VALUE);
      EXPECT_EQ(cu.cuMemcpyHtoD(range.ptr, got.data(), 64), CUDA_ERROR_INVALID_VALUE);
      std::vector<uint8_t> again(64);
      CU_OK(cu.cuMemcpyDtoH(again.data(), range.ptr, 64));
      EXPECT_EQ(std::memcmp(again.data(), got.data(), 64), 0);
      const SimStats* st = MapStats(StatsPath(dir));
      EXPECT_EQ(Load(st->device[0].allocations), 1u);
      EXPECT_EQ(Load(st->device[0].allocated_bytes), 0u) << "imports are not counted";
      EXPECT_EQ(Load(st->misuse), 3u);
      UnmapRange(cu, range);
      ExpectDeviceClean(st->device[0]);
      std::fflush(stdout);
      std::_Exit(::testing::Test::HasFailure() ? 1 : 0);
    }
    const Cu& cu = LoadCu();
    InitCtx(cu);
    CUmemGenericAllocationHandle h = 0;
    const CUmemAllocationProp plain = DeviceProp(0, false);
    CU_OK(cu.cuMemCreate(&h, 2 * kMiB, &plain, 0));
    int fd = -1;
    EXPECT_EQ(cu.cuMemExportToShareableHandle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
              CUDA_ERROR_INVALID_VALUE);
    CU_OK(cu.cuMemRelease(h));
    const CUmemAllocationProp prop = DeviceProp(0, true);
    CU_OK(cu.cuMemCreate(&h, 2 * kMiB, &prop, 0));
    VmmRange range;
    MapRange(cu, h, 2 * kMiB, CU_MEM_ACCESS_FLAGS_PROT_READWRITE, 0, &range);
    std::vector<uint8_t> data(2 * kMiB);
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i % 251);
    CU_OK(cu.cuMemcpyHtoD(range.ptr, data.data(), data.size()));
    CU_OK(cu.cuMemExportToShareableHandle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
    SendFd(sv[0], fd);
    ::close(fd);
    int status = 0;
    ASSERT_EQ(::waitpid(importer, &status, 0), importer);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "importer status " << status;
    std::vector<uint8_t> after(2 * kMiB);
    CU_OK(cu.cuMemcpyDtoH(after.data(), range.ptr, after.size()));
    EXPECT_EQ(after, data);
    UnmapRange(cu, range);
  });
  EXPECT_CHILD_OK(r);
  EXPECT_NE(r.err.find("is read-only for device 0: write refused"), std::string::npos) << r.err;
}

TEST(SimCudaDeathTest, HostDereferenceOfDevicePointerCrashes) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        const Cu& cu = LoadCu();
        InitCtx(cu);
        CUdeviceptr p = 0;
        if (cu.cuMemAlloc(&p, 4096) != CUDA_SUCCESS) std::_Exit(3);
        *reinterpret_cast<volatile char*>(p) = 1;
        std::_Exit(0);
      },
      ::testing::KilledBySignal(SIGSEGV), "");
}

TEST(SimCuda, StreamsRunInOrderAndWaitForEvents) {
  ChildResult r = InChild({{"WDSIM_OP_DELAY_US", "2000"}}, [] {
    const Cu& cu = LoadCu();
    InitCtx(cu);
    CUdeviceptr buf = 0;
    CU_OK(cu.cuMemAlloc(&buf, 4096));
    CUstream s1 = nullptr, s2 = nullptr;
    CU_OK(cu.cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING));
    CU_OK(cu.cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING));
    CUevent e = nullptr, never = nullptr;
    CU_OK(cu.cuEventCreate(&e, 0));
    CU_OK(cu.cuEventCreate(&never, 0));
    EXPECT_EQ(cu.cuEventQuery(never), CUDA_SUCCESS) << "a never-recorded event is complete";
    std::vector<uint8_t> src(4096, 1), out1(4096, 0), out2(4096, 0);
    CU_OK(cu.cuMemcpyHtoDAsync(buf, src.data(), 4096, s1));
    for (int v = 2; v <= 9; ++v) CU_OK(cu.cuMemsetD8Async(buf, static_cast<uint8_t>(v), 4096, s1));
    CU_OK(cu.cuMemcpyDtoHAsync(out1.data(), buf, 4096, s1));
    CU_OK(cu.cuEventRecord(e, s1));
    EXPECT_EQ(cu.cuEventQuery(e), CUDA_ERROR_NOT_READY);
    CU_OK(cu.cuStreamWaitEvent(s2, e, 0));
    CU_OK(cu.cuMemcpyDtoHAsync(out2.data(), buf, 4096, s2));
    // Re-recorded on an idle stream after the wait was enqueued: s2 still waits for s1's work.
    CUstream idle = nullptr;
    CU_OK(cu.cuStreamCreate(&idle, CU_STREAM_NON_BLOCKING));
    CU_OK(cu.cuEventRecord(e, idle));
    CU_OK(cu.cuStreamSynchronize(s2));
    EXPECT_EQ(out2[0], 9);
    EXPECT_EQ(out2[4095], 9);
    CU_OK(cu.cuStreamSynchronize(s1));
    EXPECT_EQ(out1[0], 9);
    CU_OK(cu.cuEventSynchronize(e));
    EXPECT_EQ(cu.cuEventQuery(e), CUDA_SUCCESS);
    CU_OK(cu.cuStreamDestroy(idle));
    // The legacy stream waits for blocking streams only; s3 is one.
    CUstream s3 = nullptr;
    CU_OK(cu.cuStreamCreate(&s3, 0));
    CU_OK(cu.cuMemsetD8Async(buf, 77, 4096, s3));
    uint8_t b = 0;
    CU_OK(cu.cuMemcpyDtoH(&b, buf + 5, 1));
    EXPECT_EQ(b, 77);
    CU_OK(cu.cuMemsetD8Async(buf, 78, 4096, s3));
    CU_OK(cu.cuStreamDestroy(s3));  // finishes its work first
    CU_OK(cu.cuMemcpyDtoH(&b, buf + 5, 1));
    EXPECT_EQ(b, 78);
    EXPECT_EQ(cu.cuStreamSynchronize(s3), CUDA_ERROR_INVALID_HANDLE);
    CU_OK(cu.cuEventDestroy(e));
    CU_OK(cu.cuEventDestroy(never));
    CU_OK(cu.cuStreamDestroy(s1));
    CU_OK(cu.cuStreamDestroy(s2));
    CU_OK(cu.cuMemFree(buf));
  });
  EXPECT_CHILD_OK(r);
}

// Uploads a pinned buffer on a stream and, unless `wait_first`, overwrites it right away.
void UploadThenOverwrite(bool wait_first) {
  const Cu& cu = LoadCu();
  InitCtx(cu);
  CUdeviceptr buf = 0;
  CU_OK(cu.cuMemAlloc(&buf, 1 * kMiB));
  void* host = nullptr;
  CU_OK(cu.cuMemHostAlloc(&host, 1 * kMiB, 0));
  std::memset(host, 1, 1 * kMiB);
  CUstream s = nullptr;
  CUevent e = nullptr;
  CU_OK(cu.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
  CU_OK(cu.cuEventCreate(&e, 0));
  CU_OK(cu.cuMemcpyHtoDAsync(buf, host, 1 * kMiB, s));
  CU_OK(cu.cuEventRecord(e, s));
  if (wait_first) {
    CU_OK(cu.cuEventSynchronize(e));
  }
  std::memset(host, 2, 1 * kMiB);  // the staging slot reused
  CU_OK(cu.cuStreamSynchronize(s));
  CU_OK(cu.cuEventDestroy(e));
  CU_OK(cu.cuStreamDestroy(s));
  CU_OK(cu.cuMemFreeHost(host));
  CU_OK(cu.cuMemFree(buf));
}

TEST(SimCuda, RaceDetectorFiresWhenHostBufferChangesBeforeExecution) {
  const TempDir tmp;
  const std::string& dir = tmp.path;
  ChildResult r = InChild({{"WDSIM_OP_DELAY_US", "50000"}, {"WDSIM_STATS_DIR", dir}}, [&] {
    UploadThenOverwrite(false);
    EXPECT_EQ(Load(MapStats(StatsPath(dir))->races), 1u);
  });
  EXPECT_CHILD_OK(r);
  EXPECT_NE(r.err.find("wdsim: RACE: host buffer 0x"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("(1048576 bytes) changed between cuMemcpyHtoDAsync enqueue and execution"),
            std::string::npos)
      << r.err;

  r = InChild({{"WDSIM_OP_DELAY_US", "50000"}, {"WDSIM_STATS_DIR", dir}}, [&] {
    UploadThenOverwrite(true);
    EXPECT_EQ(Load(MapStats(StatsPath(dir))->races), 0u);
  });
  EXPECT_CHILD_OK(r);
  EXPECT_EQ(r.err.find("RACE"), std::string::npos) << r.err;

  r = InChild({{"WDSIM_OP_DELAY_US", "50000"}, {"WDSIM_RACE_ABORT", "1"}},
              [] { UploadThenOverwrite(false); });
  EXPECT_TRUE(WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGABRT) << r.status << r.err;
}

TEST(SimCuda, Convert2DKernelMatchesTheCpuReference) {
  const TempDir tmp;
  const std::string& dir = tmp.path;
  ChildResult r = InChild({{"WDSIM_STATS_DIR", dir}}, [&] {
    const Cu& cu = LoadCu();
    InitCtx(cu);
    CUmodule m = nullptr;
    EXPECT_EQ(cu.cuModuleLoadData(&m, nullptr), CUDA_ERROR_INVALID_IMAGE);
    const uint32_t image[4] = {0xBA55ED50u, 0x00100001u, 0, 0};
    CU_OK(cu.cuModuleLoadData(&m, image));
    CUfunction f = nullptr;
    EXPECT_EQ(cu.cuModuleGetFunction(&f, m, "wd_no_such_kernel"), CUDA_ERROR_NOT_FOUND);
    CU_OK(cu.cuModuleGetFunction(&f, m, weightd::kernels::kConvert2DKernel));
    constexpr int64_t kW = 1000, kH = 7, kSrcPitch = 4096, kDstPitch = 2304;
    std::vector<float> src(kSrcPitch / 4 * kH);
    for (size_t i = 0; i < src.size(); ++i) src[i] = std::sin(static_cast<float>(i)) * 1e3f;
    src[5] = NAN;
    src[6] = -INFINITY;
    src[7] = 1e-40f;
    CUdeviceptr ds = 0, dd = 0;
    CU_OK(cu.cuMemAlloc(&ds, kSrcPitch * kH));
    CU_OK(cu.cuMemAlloc(&dd, kDstPitch * kH));
    CU_OK(cu.cuMemcpyHtoD(ds, src.data(), kSrcPitch * kH));
    CU_OK(cu.cuMemsetD8(dd, 0xAB, kDstPitch * kH));
    weightd::kernels::Convert2DArgs a{};
    a.src = reinterpret_cast<const void*>(ds);
    a.dst = reinterpret_cast<void*>(dd);
    a.src_pitch = kSrcPitch;
    a.dst_pitch = kDstPitch;
    a.width = kW;
    a.height = kH;
    a.from = static_cast<int32_t>(DType::kF32);
    a.to = static_cast<int32_t>(DType::kBF16);
    void* params[] = {&a};
    CUstream s = nullptr;
    CU_OK(cu.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CU_OK(cu.cuLaunchKernel(f, (kW + 255) / 256, kH, 1, 256, 1, 1, 0, s, params, nullptr));
    CU_OK(cu.cuStreamSynchronize(s));
    std::vector<uint8_t> got(kDstPitch * kH);
    CU_OK(cu.cuMemcpyDtoH(got.data(), dd, got.size()));
    for (int64_t row = 0; row < kH; ++row) {
      std::vector<uint16_t> want(kW);
      weightd::kernels::ConvertHost(DType::kF32, &src[row * kSrcPitch / 4], DType::kBF16,
                                    want.data(), kW);
      EXPECT_EQ(std::memcmp(&got[row * kDstPitch], want.data(), kW * 2), 0) << "row " << row;
      EXPECT_EQ(got[row * kDstPitch + kW * 2], 0xAB) << "row padding must stay untouched";
    }
    // An unmapped destination fails at launch.
    a.dst = reinterpret_cast<void*>(dd + 64 * kMiB);
    EXPECT_EQ(cu.cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, s, params, nullptr),
              CUDA_ERROR_INVALID_VALUE);
    EXPECT_EQ(Load(MapStats(StatsPath(dir))->kernel_launches), 1u);
    CU_OK(cu.cuModuleUnload(m));
    EXPECT_EQ(cu.cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, s, params, nullptr),
              CUDA_ERROR_INVALID_HANDLE);
    CU_OK(cu.cuStreamDestroy(s));
    CU_OK(cu.cuMemFree(ds));
    CU_OK(cu.cuMemFree(dd));
    ExpectDeviceClean(MapStats(StatsPath(dir))->device[0]);
  });
  EXPECT_CHILD_OK(r);
}

TEST(SimCuda, InjectsAFailureIntoTheSecondAsyncUpload) {
  const TempDir tmp;
  const std::string& dir = tmp.path;
  ChildResult r = InChild(
      {{"WDSIM_FAIL", "cuMemcpyHtoDAsync:2:CUDA_ERROR_INVALID_VALUE,cuStreamCreate:3:700"},
       {"WDSIM_STATS_DIR", dir}},
      [&] {
        const Cu& cu = LoadCu();
        InitCtx(cu);
        CUdeviceptr buf = 0;
        CU_OK(cu.cuMemAlloc(&buf, 4096));
        CU_OK(cu.cuMemsetD8(buf, 0, 4096));
        CUstream s = nullptr;
        CU_OK(cu.cuStreamCreate(&s, 0));
        const std::vector<uint8_t> one(16, 1), two(16, 2), three(16, 3);
        CU_OK(cu.cuMemcpyHtoDAsync(buf, one.data(), 16, s));
        EXPECT_EQ(cu.cuMemcpyHtoDAsync(buf + 16, two.data(), 16, s), CUDA_ERROR_INVALID_VALUE);
        CU_OK(cu.cuMemcpyHtoDAsync(buf + 32, three.data(), 16, s));
        CU_OK(cu.cuStreamSynchronize(s));
        std::vector<uint8_t> got(48);
        CU_OK(cu.cuMemcpyDtoH(got.data(), buf, 48));
        EXPECT_EQ(got[0], 1);
        EXPECT_EQ(got[16], 0) << "an injected failure does nothing";
        EXPECT_EQ(got[32], 3);
        CUstream t = nullptr;
        CU_OK(cu.cuStreamCreate(&t, 0));
        EXPECT_EQ(cu.cuStreamCreate(&t, 0), CUDA_ERROR_ILLEGAL_ADDRESS);
        CU_OK(cu.cuStreamDestroy(t));
        CU_OK(cu.cuStreamDestroy(s));
        CU_OK(cu.cuMemFree(buf));
        EXPECT_EQ(Load(MapStats(StatsPath(dir))->injected), 2u);
      });
  EXPECT_CHILD_OK(r);
  EXPECT_NE(r.err.find("wdsim: injected CUDA_ERROR_INVALID_VALUE into call 2 of cuMemcpyHtoDAsync"),
            std::string::npos)
      << r.err;
}

TEST(SimCuda, LostDeviceFailsCallsButReleasesStillWork) {
  const TempDir tmp;
  const std::string& dir = tmp.path;
  ChildResult r = InChild({{"WDSIM_LOSE_DEVICE", "0:20"}, {"WDSIM_STATS_DIR", dir}}, [&] {
    const Cu& cu = LoadCu();
    InitCtx(cu);
    const CUmemAllocationProp prop = DeviceProp(0, true);
    CUmemGenericAllocationHandle h = 0;
    CU_OK(cu.cuMemCreate(&h, 2 * kMiB, &prop, 0));
    VmmRange range;
    MapRange(cu, h, 2 * kMiB, CU_MEM_ACCESS_FLAGS_PROT_READWRITE, 0, &range);
    CUstream s = nullptr;
    CUevent e = nullptr;
    void* host = nullptr;
    CU_OK(cu.cuStreamCreate(&s, 0));
    CU_OK(cu.cuEventCreate(&e, 0));
    CU_OK(cu.cuMemHostAlloc(&host, 4096, 0));
    CU_OK(cu.cuMemHostRegister(&range, sizeof(range), 0));
    CUresult last = CUDA_SUCCESS;
    int calls = 0;
    while (last == CUDA_SUCCESS && calls < 40) {
      last = cu.cuMemcpyHtoDAsync(range.ptr, host, 4096, s);
      ++calls;
    }
    EXPECT_EQ(last, CUDA_ERROR_DEVICE_UNAVAILABLE) << "after " << calls << " calls";
    const SimStats* st = MapStats(StatsPath(dir));
    EXPECT_EQ(Load(st->device[0].lost), 1u);
    EXPECT_EQ(cu.cuStreamSynchronize(s), CUDA_ERROR_DEVICE_UNAVAILABLE);
    EXPECT_EQ(cu.cuMemsetD8(range.ptr, 0, 16), CUDA_ERROR_DEVICE_UNAVAILABLE);
    CUmemGenericAllocationHandle h2 = 0;
    EXPECT_EQ(cu.cuMemCreate(&h2, 2 * kMiB, &prop, 0), CUDA_ERROR_DEVICE_UNAVAILABLE);
    CUcontext ctx = nullptr;
    EXPECT_EQ(cu.cuDevicePrimaryCtxRetain(&ctx, 0), CUDA_ERROR_DEVICE_UNAVAILABLE);
    CU_OK(cu.cuStreamDestroy(s));  // before the host buffer its queued copies read goes
    CU_OK(cu.cuEventDestroy(e));
    CU_OK(cu.cuMemHostUnregister(&range));
    CU_OK(cu.cuMemFreeHost(host));
    UnmapRange(cu, range);
    CU_OK(cu.cuDevicePrimaryCtxRelease(0));
    ExpectDeviceClean(st->device[0]);
    EXPECT_EQ(Load(st->device[0].primary_ctx_refs), 0u);
    EXPECT_EQ(Load(st->pinned_bytes), 0u);
  });
  EXPECT_CHILD_OK(r);
  EXPECT_NE(r.err.find("wdsim: device 0 lost after 20 calls"), std::string::npos) << r.err;
}

TEST(SimCuda, StatsFileMatchesAndPythonReadsIt) {
  const TempDir tmp;
  const std::string& dir = tmp.path;
  ChildResult r = InChild({{"WDSIM_DEVICES", "2x1GiB"}, {"WDSIM_STATS_DIR", dir}}, [&] {
    const Cu& cu = LoadCu();
    InitCtx(cu, 1);
    void* host = nullptr;
    std::vector<char> reg(64 * 1024);
    CU_OK(cu.cuMemHostAlloc(&host, 1 * kMiB, 0));
    CU_OK(cu.cuMemHostRegister(reg.data(), reg.size(), 0));
    const CUmemAllocationProp prop = DeviceProp(1, false);
    CUmemGenericAllocationHandle h = 0;
    CU_OK(cu.cuMemCreate(&h, 2 * kMiB, &prop, 0));
    VmmRange range;
    MapRange(cu, h, 2 * kMiB, CU_MEM_ACCESS_FLAGS_PROT_READWRITE, 1, &range);
    CUstream s = nullptr;
    CUevent e = nullptr;
    CU_OK(cu.cuStreamCreate(&s, 0));
    CU_OK(cu.cuEventCreate(&e, 0));
    const SimStats* st = MapStats(StatsPath(dir));
    ASSERT_NE(st, nullptr);
    EXPECT_EQ(Load(st->version), kSimStatsVersion);
    EXPECT_EQ(Load(st->pid), static_cast<uint64_t>(::getpid()));
    EXPECT_EQ(Load(st->device_count), 2u);
    EXPECT_EQ(Load(st->pinned_bytes), 1 * kMiB + 64 * 1024);
    const SimDeviceStats& d = st->device[1];
    EXPECT_EQ(Load(d.allocated_bytes), 2 * kMiB);
    EXPECT_EQ(Load(d.allocations), 1u);
    EXPECT_EQ(Load(d.mappings), 1u);
    EXPECT_EQ(Load(d.reserved_ranges), 1u);
    EXPECT_EQ(Load(d.primary_ctx_refs), 1u);
    EXPECT_EQ(Load(d.streams), 1u);
    EXPECT_EQ(Load(d.events), 1u);
    EXPECT_EQ(Load(st->device[0].primary_ctx_refs), 0u);
    EXPECT_GT(Load(st->calls), 10u);
    const std::string py = "python3 -c \"import sys; sys.path.insert(0, '" WDSIM_SOURCE_DIR
                           "'); from sim_stats import read_stats; s = read_stats('" +
                           StatsPath(dir) +
                           "'); sys.exit(0 if s['pinned_bytes'] == 1114112 and "
                           "s['device'][1]['streams'] == 1 and s['device_count'] == 2 else 1)\"";
    EXPECT_EQ(std::system(py.c_str()), 0) << py;
    CU_OK(cu.cuEventDestroy(e));
    CU_OK(cu.cuStreamDestroy(s));
    UnmapRange(cu, range);
    CU_OK(cu.cuMemHostUnregister(reg.data()));
    CU_OK(cu.cuMemFreeHost(host));
    ExpectDeviceClean(d);
    EXPECT_EQ(Load(st->pinned_bytes), 0u);
    EXPECT_EQ(Load(st->pinned_peak), 1 * kMiB + 64 * 1024);
  });
  EXPECT_CHILD_OK(r);
}

// UUIDs are deterministic per index and salt, distinct across devices and salts.
TEST(SimCuda, UuidsDependOnIndexAndSalt) {
  auto uuids = [](const std::string& salt) {
    const TempDir tmp;
    const std::string& dir = tmp.path;
    const std::string out = dir + "/uuids";
    ChildResult r = InChild({{"WDSIM_DEVICES", "2x1GiB"}, {"WDSIM_UUID_SALT", salt}}, [&] {
      const Cu& cu = LoadCu();
      CU_OK(cu.cuInit(0));
      CUuuid a{}, b{};
      CU_OK(cu.cuDeviceGetUuid(&a, 0));
      CU_OK(cu.cuDeviceGetUuid(&b, 1));
      std::ofstream(out) << std::string(a.bytes, 16) << std::string(b.bytes, 16);
    });
    EXPECT_CHILD_OK(r);
    return ReadAll(out);
  };
  const std::string plain = uuids(""), again = uuids(""), salted = uuids("other-host");
  ASSERT_EQ(plain.size(), 32u);
  EXPECT_EQ(plain, again);
  EXPECT_NE(plain.substr(0, 16), plain.substr(16));
  EXPECT_NE(plain.substr(0, 16), salted.substr(0, 16));
}

}  // namespace
}  // namespace weightd::sim
