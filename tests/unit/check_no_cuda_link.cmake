# Script mode (cmake -P): fails when any of BINARIES (a ;-separated list) is linked against a CUDA
# library. weightd reaches CUDA only through the dlopen'ed driver table (detail/cuda_driver.h) and
# ships its kernels as an embedded fatbin, so the daemon, weightctl and the client library must
# start on machines without a GPU driver, and must never pull in libcudart (whose own version
# checks and static state would sit beside the driver table).
find_program(_ldd ldd REQUIRED)
set(_failed "")
foreach(_bin IN LISTS BINARIES)
  execute_process(COMMAND ${_ldd} ${_bin} OUTPUT_VARIABLE _out ERROR_VARIABLE _err
                  RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "ldd ${_bin} failed (${_rc}): ${_err}")
  endif()
  string(REPLACE "\n" ";" _lines "${_out}")
  foreach(_line IN LISTS _lines)
    if(_line MATCHES "libcudart|libcuda|libcublas|libnvrtc")
      string(STRIP "${_line}" _line)
      string(APPEND _failed "\n  ${_bin}: ${_line}")
    endif()
  endforeach()
  message(STATUS "${_bin}: no CUDA library linked")
endforeach()
if(_failed)
  message(FATAL_ERROR "linked against CUDA libraries (every CUDA call must go through the "
                      "dlopen'ed driver table):${_failed}")
endif()
