/* Calls mp_ux_load (a load: run out of line when probed) argv[1] times, then unmaps
 * every anonymous executable mapping it has (as a sandbox or a JIT cleaning up might:
 * a tracer's out-of-line page is one), then calls it argv[1] times more. Prints the
 * sums; the number of mappings it removed goes to stderr (it differs when probed). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

__asm__(".globl mp_ux_load\n"
        ".type mp_ux_load, @function\n"
        "mp_ux_load:\n"
        "  mov (%rdi), %rax\n"
        "  ret\n"
        ".size mp_ux_load, . - mp_ux_load\n");
unsigned long mp_ux_load(const unsigned long *p);

static unsigned long round_of(long n) {
    unsigned long s = 0;
    for (long i = 0; i < n; i++) {
        unsigned long v = (unsigned long)i;
        s += mp_ux_load(&v);
    }
    return s;
}

int mp_unmapxol_main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10;
    unsigned long a = round_of(n);
    FILE *m = fopen("/proc/self/maps", "r");
    if (!m)
        return 2;
    unsigned long starts[64], ends[64];
    int k = 0;
    char line[512];
    while (k < 64 && fgets(line, sizeof line, m)) {
        unsigned long s, e, off, ino;
        char perms[8], dev[16], path[256] = "";
        int got = sscanf(line, "%lx-%lx %7s %lx %15s %lu %255s", &s, &e, perms, &off, dev,
                         &ino, path);
        if (got >= 6 && perms[2] == 'x' && ino == 0 && path[0] == '\0') {
            starts[k] = s;
            ends[k] = e;
            k++;
        }
    }
    fclose(m);
    for (int i = 0; i < k; i++)
        munmap((void *)starts[i], ends[i] - starts[i]);
    unsigned long b = round_of(n);
    fprintf(stderr, "unmapped=%d\n", k);
    printf("first=%lu second=%lu\n", a, b);
    return 0;
}
