//! Runs the C test program `c/trapmask.c` (see its header comment).

multiprobe_test_targets::c_program!(mp_trapmask_main);
