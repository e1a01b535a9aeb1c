//! Runs the C test program `c/unmapxol.c` (see its header comment).

multiprobe_test_targets::c_program!(mp_unmapxol_main);
