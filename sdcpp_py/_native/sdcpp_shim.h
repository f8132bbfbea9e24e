/* sdcpp-py native shim: plain C declarations, parsed as they are by cffi
 * (no preprocessor lines) and included by sdcpp_shim.cpp. */

/* The sdcpp_py version this library was built for (the Python package checks it). */
const char* sdcpp_shim_version(void);
