//! Runs the C test program `c/rets.c` (see its header comment).

multiprobe_test_targets::c_program!(mp_rets_main);
