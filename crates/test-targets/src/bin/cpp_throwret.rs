//! Runs the C++ test program `c/throwret.cpp` (see its header comment).

multiprobe_test_targets::c_program!(mp_cpp_rets_main);
