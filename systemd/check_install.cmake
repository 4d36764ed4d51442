# Runs `cmake --install BUILD_DIR --prefix <scratch>` and checks that every file lands where a
# distribution expects it. Invoked by the install_tree test with -DBUILD_DIR= -DSOURCE_DIR=.
set(prefix "${BUILD_DIR}/install-tree-test")
file(REMOVE_RECURSE "${prefix}")
execute_process(COMMAND ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${rc}):\n${out}\n${err}")
endif()
set(expected
    bin/weightd
    bin/weightctl
    lib/systemd/system/weightd.service
    lib/systemd/system/weightd.socket
    lib/tmpfiles.d/weightd.conf
    lib/sysusers.d/weightd.conf
    share/doc/weightd/weightd.json.example
    share/doc/weightd/README.md
    share/doc/weightd/OPERATIONS.md
    share/doc/weightd/CONFIG.md
    share/doc/weightd/PROTOCOL.md)
if(EXISTS "${SOURCE_DIR}/client/python")
  list(APPEND expected share/weightd/python)
endif()
foreach(f IN LISTS expected)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "cmake --install did not install ${f} under ${prefix}")
  endif()
endforeach()
# The installed unit runs the binary at the configured prefix (distributions configure with
# their prefix and install with DESTDIR, so that is where the binary will be).
file(READ "${prefix}/lib/systemd/system/weightd.service" unit)
string(FIND "${unit}" "ExecStart=${EXPECTED_BIN} --config /etc/weightd/weightd.json" at)
if(at LESS 0)
  message(FATAL_ERROR "weightd.service does not start ${EXPECTED_BIN}:\n${unit}")
endif()
foreach(key Type=notify NotifyAccess=main WatchdogSec= FileDescriptorStoreMax= DevicePolicy=closed
            ProtectSystem=strict NoNewPrivileges=yes LimitNOFILE=)
  if(NOT unit MATCHES "${key}")
    message(FATAL_ERROR "weightd.service lacks ${key}")
  endif()
endforeach()
file(REMOVE_RECURSE "${prefix}")
message(STATUS "install tree complete: ${expected}")
