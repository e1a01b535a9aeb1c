/* A tree of processes, each counting its own calls of mp_tree_work: the root calls it
 * N times (argv[1], default 10), then forks W children (argv[2], default 2); child i
 * calls it N + 1 + i times and forks one grandchild that calls it 7 times. Every process
 * waits for its children, then prints "pid=PID parent=PPID calls=C" (the root last), so
 * a test can compare per-process probe counts with what each process did.
 *
 * With argv[3] "raw", every fork is the fork system call made by mp_fork_insn (a
 * function that is just `syscall; ret`: probed, a tracer single-steps or relocates the
 * very instruction that forks), and the process first installs a seccomp filter that
 * kills it on mmap, so a tracer cannot map an out-of-line page: its hits of
 * mp_fork_insn are single-stepped in place, and the fork happens during the step.
 * With "raw-slot", the same forks without the filter: a probed mp_fork_insn then forks
 * from the tracer's out-of-line copy of the syscall, and the child starts there too. */
#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nommap.h"

/* fork(2) itself: eax is set by the caller, the first instruction is the syscall. */
__asm__(".globl mp_fork_insn\n"
        ".type mp_fork_insn, @function\n"
        "mp_fork_insn:\n"
        "  syscall\n"
        "  ret\n"
        ".size mp_fork_insn, . - mp_fork_insn\n"
        ".globl mp_raw_fork\n"
        ".type mp_raw_fork, @function\n"
        "mp_raw_fork:\n"
        "  mov $57, %eax\n"
        "  jmp mp_fork_insn\n"
        ".size mp_raw_fork, . - mp_raw_fork\n");
long mp_raw_fork(void);

static int raw;

static pid_t do_fork(void) {
    return raw ? (pid_t)mp_raw_fork() : fork();
}

static void no_mmap(void) {
    if (mp_forbid_mmap() != 0)
        _exit(3);
}

static volatile long sink;

__attribute__((noinline)) void mp_tree_work(long i) {
    sink += i;
    __asm__ volatile("" ::: "memory");
}

static void report(long calls) {
    printf("pid=%d parent=%d calls=%ld\n", getpid(), getppid(), calls);
    fflush(stdout);
}

static void wait_all(void) {
    while (wait(NULL) > 0) {
    }
}

int mp_forktree_main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10;
    long w = argc > 2 ? atol(argv[2]) : 2;
    raw = argc > 3 && strncmp(argv[3], "raw", 3) == 0;
    int filter = argc > 3 && strcmp(argv[3], "raw") == 0;
    /* stdio's buffer is allocated before the filter (it would mmap). */
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("%s", "");
    if (filter)
        no_mmap();
    for (long i = 0; i < n; i++)
        mp_tree_work(i);
    for (long c = 0; c < w; c++) {
        pid_t pid = do_fork();
        if (pid < 0)
            return 1;
        if (pid == 0) {
            long mine = n + 1 + c;
            for (long i = 0; i < mine; i++)
                mp_tree_work(i);
            pid_t g = do_fork();
            if (g == 0) {
                for (long i = 0; i < 7; i++)
                    mp_tree_work(i);
                report(7);
                _exit(0);
            }
            wait_all();
            report(mine);
            _exit(0);
        }
    }
    wait_all();
    report(n);
    return 0;
}
