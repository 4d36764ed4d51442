// The DLPack ABI (unversioned, DLPack 0.5-0.8) as weightd exports it, at global scope with
// DLPack's own names, so that a consumer built against dlpack.h and weightd's deleter agree on
// the deleter's function type (UBSan's -fsanitize=function checks exactly that).
// Shared by the C ABI and its tests; not a public header.
#ifndef WEIGHTD_CLIENT_DETAIL_DLPACK_H_
#define WEIGHTD_CLIENT_DETAIL_DLPACK_H_

#include <cstdint>

extern "C" {

struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

}  // extern "C"

namespace weightd::dlpack {
inline constexpr int32_t kDLCPU = 1;
inline constexpr int32_t kDLCUDA = 2;
inline constexpr uint8_t kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6;
}  // namespace weightd::dlpack

#endif  // WEIGHTD_CLIENT_DETAIL_DLPACK_H_
