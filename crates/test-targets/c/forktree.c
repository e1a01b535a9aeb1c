/* A tree of processes, each counting its own calls of mp_tree_work: the root calls it
 * N times (argv[1], default 10), then forks W children (argv[2], default 2); child i
 * calls it N + 1 + i times and forks one grandchild that calls it 7 times. Every process
 * waits for its children, then prints "pid=PID parent=PPID calls=C" (the root last), so
 * a test can compare per-process probe counts with what each process did. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

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
    for (long i = 0; i < n; i++)
        mp_tree_work(i);
    for (long c = 0; c < w; c++) {
        pid_t pid = fork();
        if (pid < 0)
            return 1;
        if (pid == 0) {
            long mine = n + 1 + c;
            for (long i = 0; i < mine; i++)
                mp_tree_work(i);
            pid_t g = fork();
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
