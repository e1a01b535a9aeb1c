//! Runs the C test program `c/collect.c` (see its header comment).

multiprobe_test_targets::c_program!(mp_collect_main);
