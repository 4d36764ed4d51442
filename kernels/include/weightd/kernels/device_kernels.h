// The device kernels of weightd's embedded fatbin: their names and argument blocks.
//
//   kernels::Convert2DArgs a{.src = src_dev, .dst = dst_dev, .src_pitch = 4096, ...};
//   void* params[] = {&a};
//   cuLaunchKernel(fn /* cuModuleGetFunction(module, kConvert2DKernel) */, ..., params, nullptr);
//
// Each kernel takes exactly one parameter, a trivially copyable struct passed by value, so the
// launcher (kernels/src/launch.cc) and the simulated driver of the test suite
// (tests/sim_cuda/, which runs the CPU reference under the same name) agree on one layout.
// Semantics are those of convert.h. This header is included by nvcc (C++17) and by host C++20
// code: keep it free of anything but fixed-width types.
#ifndef WEIGHTD_KERNELS_DEVICE_KERNELS_H_
#define WEIGHTD_KERNELS_DEVICE_KERNELS_H_

#include <cstdint>

namespace weightd::kernels {

// extern "C" symbol of the 2-D conversion kernel in the fatbin.
inline constexpr char kConvert2DKernel[] = "wd_convert_2d";

// `height` rows of `width` elements: row r of the source at src + r * src_pitch bytes, of the
// destination at dst + r * dst_pitch bytes. `from` / `to` are weightd::DType values (uint8_t
// enum, widened); the pair is one of convert.h's IsConvertible pairs with from != to.
struct Convert2DArgs {
  const void* src;    // device pointer
  void* dst;          // device pointer
  int64_t src_pitch;  // bytes
  int64_t dst_pitch;  // bytes
  int64_t width;      // elements per row
  int64_t height;     // rows
  int32_t from;       // weightd::DType of the source
  int32_t to;         // weightd::DType of the destination
};

}  // namespace weightd::kernels

#endif  // WEIGHTD_KERNELS_DEVICE_KERNELS_H_
