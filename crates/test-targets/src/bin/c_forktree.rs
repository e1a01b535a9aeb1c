//! Runs the C test program `c/forktree.c` (see its header comment).

multiprobe_test_targets::c_program!(mp_forktree_main);
