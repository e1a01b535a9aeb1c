//! Runs the C test program `c/forkrace.c` (see its header comment).

multiprobe_test_targets::c_program!(mp_forkrace_main);
