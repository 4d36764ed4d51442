// Host side of the device kernels: loads the embedded fatbin (detail/fatbin.h) once per CUDA
// context and launches wd_convert_2d (device_kernels.h) through the driver table. Plain C++: no
// CUDA runtime, no <<<>>>, so nothing here needs nvcc or libcudart.
#include <cuda.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "detail/fatbin.h"
#include "weightd/detail/cuda_driver.h"
#include "weightd/kernels/convert.h"
#include "weightd/kernels/convert_cuda.h"
#include "weightd/kernels/device_kernels.h"
#include "weightd/status_macros.h"

namespace weightd::kernels {
namespace {

// convert.cu cannot include dtype.h (Abseil); it hard-codes these values.
static_assert(static_cast<int>(DType::kF32) == 1 && static_cast<int>(DType::kF16) == 2 &&
                  static_cast<int>(DType::kBF16) == 3,
              "convert.cu's kDType* constants must match weightd::DType");

constexpr unsigned int kThreads = 256;

// The conversion kernel of one context and how many blocks keep all its SMs busy.
struct LoadedKernel {
  CUfunction fn = nullptr;
  int64_t max_blocks = 0;
};

// Modules per context. A context's module lives as long as the process: the daemon keeps its
// primary contexts for its lifetime, and one small module per context is not worth an unload
// protocol. Keyed by the context's unique id where the driver has cuCtxGetId, else by its
// handle (a destroyed context's handle can be reused; the daemon never destroys its own).
class KernelCache {
 public:
  absl::StatusOr<LoadedKernel> Get(const CudaDriver& cu) {
    CUcontext ctx = nullptr;
    WD_CU_RETURN_IF_ERROR(cu, cu.CtxGetCurrent(&ctx));
    if (ctx == nullptr) {
      return absl::FailedPreconditionError(
          "launching a weightd kernel needs a current CUDA context (none on this thread)");
    }
    unsigned long long key = reinterpret_cast<uintptr_t>(ctx);
    if (cu.CtxGetId != nullptr) WD_CU_RETURN_IF_ERROR(cu, cu.CtxGetId(ctx, &key));
    absl::MutexLock l(&mu_);
    if (auto it = kernels_.find(key); it != kernels_.end()) return it->second;
    // Loading under the lock: once per context, and a concurrent first launch must not load a
    // second copy.
    CUmodule module = nullptr;
    WD_CU_RETURN_IF_ERROR(cu, cu.ModuleLoadData(&module, detail::kConvertFatbin));
    LoadedKernel k;
    absl::Status s = [&]() -> absl::Status {
      WD_CU_RETURN_IF_ERROR(cu, cu.ModuleGetFunction(&k.fn, module, kConvert2DKernel));
      CUdevice dev = 0;
      WD_CU_RETURN_IF_ERROR(cu, cu.CtxGetDevice(&dev));
      int sms = 0;
      WD_CU_RETURN_IF_ERROR(
          cu, cu.DeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
      // 8 resident blocks of 256 threads per SM fill an sm_80..sm_100 SM (2048 threads); a
      // grid-stride loop covers the rest, so huge tensors need no 2^31 blocks.
      k.max_blocks = std::max(1, sms) * 8;
      return absl::OkStatus();
    }();
    if (!s.ok()) {
      (void)cu.ModuleUnload(module);
      return Annotate(
          s, absl::StrCat("the embedded kernel fatbin (", detail::kConvertFatbinSize, " bytes)"));
    }
    kernels_.emplace(key, k);
    return k;
  }

 private:
  absl::Mutex mu_;
  absl::flat_hash_map<unsigned long long, LoadedKernel> kernels_ ABSL_GUARDED_BY(mu_);
};

KernelCache& Cache() {
  static auto* cache = new KernelCache();  // never destroyed: launches may race exit
  return *cache;
}

absl::StatusOr<const CudaDriver*> Driver() {
  absl::StatusOr<const CudaDriver*> cu = CudaDriver::Get();
  if (!cu.ok()) return absl::FailedPreconditionError(cu.status().message());
  return cu;
}

}  // namespace

absl::Status LaunchConvertDevice(DType from, uint64_t src, DType to, uint64_t dst, int64_t n,
                                 void* stream) {
  if (n == 0) return absl::OkStatus();
  if (from == to) {
    WD_ASSIGN_OR_RETURN(const CudaDriver* cu, Driver());
    WD_CU_RETURN_IF_ERROR(*cu,
                          cu->MemcpyDtoDAsync(dst, src, static_cast<size_t>(n) * DTypeSize(from),
                                              static_cast<CUstream>(stream)));
    return absl::OkStatus();
  }
  return LaunchConvert2DDevice(from, src, n * DTypeSize(from), to, dst, n * DTypeSize(to), n, 1,
                               stream);
}

absl::Status LaunchConvert2DDevice(DType from, uint64_t src, int64_t src_pitch, DType to,
                                   uint64_t dst, int64_t dst_pitch, int64_t width, int64_t height,
                                   void* stream) {
  if (width == 0 || height == 0) return absl::OkStatus();
  if (!IsConvertible(from, to)) {
    return absl::InvalidArgumentError(
        absl::StrCat("no device conversion from ", DTypeName(from), " to ", DTypeName(to)));
  }
  if (width < 0 || height < 0 || src_pitch < width * DTypeSize(from) ||
      dst_pitch < width * DTypeSize(to)) {
    return absl::InvalidArgumentError(absl::StrCat("bad 2-D conversion shape: ", height,
                                                   " rows of ", width, " elements, pitches ",
                                                   src_pitch, " -> ", dst_pitch, " bytes"));
  }
  WD_ASSIGN_OR_RETURN(const CudaDriver* cu, Driver());
  const auto s = static_cast<CUstream>(stream);
  if (from == to) {
    CUDA_MEMCPY2D copy{};
    copy.srcMemoryType = CU_MEMORYTYPE_DEVICE;
    copy.srcDevice = src;
    copy.srcPitch = static_cast<size_t>(src_pitch);
    copy.dstMemoryType = CU_MEMORYTYPE_DEVICE;
    copy.dstDevice = dst;
    copy.dstPitch = static_cast<size_t>(dst_pitch);
    copy.WidthInBytes = static_cast<size_t>(width) * DTypeSize(from);
    copy.Height = static_cast<size_t>(height);
    WD_CU_RETURN_IF_ERROR(*cu, cu->Memcpy2DAsync(&copy, s));
    return absl::OkStatus();
  }
  WD_ASSIGN_OR_RETURN(const LoadedKernel k, Cache().Get(*cu));
  Convert2DArgs args{};
  args.src = reinterpret_cast<const void*>(static_cast<uintptr_t>(src));
  args.dst = reinterpret_cast<void*>(static_cast<uintptr_t>(dst));
  args.src_pitch = src_pitch;
  args.dst_pitch = dst_pitch;
  args.width = width;
  args.height = height;
  args.from = static_cast<int32_t>(from);
  args.to = static_cast<int32_t>(to);
  void* params[] = {&args};
  const int64_t want = (width * height + kThreads - 1) / kThreads;
  const auto blocks = static_cast<unsigned int>(std::min(want, k.max_blocks));
  const CUresult r = cu->LaunchKernel(k.fn, blocks, 1, 1, kThreads, 1, 1, 0, s, params, nullptr);
  if (r != CUDA_SUCCESS) {
    return cu->Error(r,
                     absl::StrCat("cuLaunchKernel(", kConvert2DKernel, ": ", DTypeName(from),
                                  " -> ", DTypeName(to), ", ", height, " rows of ", width, ")"),
                     __FILE__, __LINE__);
  }
  return absl::OkStatus();
}

}  // namespace weightd::kernels
