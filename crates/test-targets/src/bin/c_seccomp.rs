//! Runs the C test program `c/seccomp.c` (see its header comment).

multiprobe_test_targets::c_program!(mp_seccomp_main);
