/* Installs a seccomp filter that kills the process on mmap, then calls mp_sc_load (a
 * load: run out of line when probed) argv[1] times and reports through write(2) only.
 * A tracer that injects an mmap into it kills it. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "nommap.h"

__asm__(".globl mp_sc_load\n"
        ".type mp_sc_load, @function\n"
        "mp_sc_load:\n"
        "  mov (%rdi), %rax\n"
        "  ret\n"
        ".size mp_sc_load, . - mp_sc_load\n");
unsigned long mp_sc_load(const unsigned long *p);

int mp_seccomp_main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10;
    if (mp_forbid_mmap() != 0)
        return 2;
    unsigned long s = 0;
    for (long i = 0; i < n; i++) {
        unsigned long v = (unsigned long)i;
        s += mp_sc_load(&v);
    }
    char buf[64];
    int len = snprintf(buf, sizeof buf, "loads=%ld sum=%lu\n", n, s);
    if (write(1, buf, (size_t)len) != len)
        return 3;
    return 0;
}
