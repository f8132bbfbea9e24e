// sdcpp-py's native shim, compiled into libstable-diffusion.
//
// Upstream's stable-diffusion.cpp is included here as part of this translation
// unit (CMake marks the original as header-only), so the shim can reach the
// file's static helpers without editing upstream.
#include "stable-diffusion.cpp"

#define SHIM_API extern "C" __attribute__((visibility("default")))

#ifndef SDCPP_PY_VERSION
#define SDCPP_PY_VERSION "0+unknown"
#endif

extern "C" {
#include "sdcpp_shim.h"
}

SHIM_API const char* sdcpp_shim_version(void) {
    return SDCPP_PY_VERSION;
}
