/* Two threads: the main thread forks over and over (each child exits at once) while the
 * other thread, after a short delay, calls mp_race_load: probed, its first hit maps the
 * tracer's out-of-line page in the middle of the forks, so some child is copied from a
 * parent that does not have the page yet. Prints how many forks and loads it did. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* A load through a pointer: run out of line when probed. */
__asm__(".globl mp_race_load\n"
        ".type mp_race_load, @function\n"
        "mp_race_load:\n"
        "  mov (%rdi), %rax\n"
        "  ret\n"
        ".size mp_race_load, . - mp_race_load\n");
unsigned long mp_race_load(const unsigned long *p);

static atomic_int done;

static void *worker(void *arg) {
    long loads = (long)arg;
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
    unsigned long sum = 0;
    for (long i = 0; i < loads; i++) {
        unsigned long v = (unsigned long)i;
        sum += mp_race_load(&v);
    }
    atomic_store(&done, 1);
    return (void *)sum;
}

int mp_forkrace_main(int argc, char **argv) {
    long loads = argc > 1 ? atol(argv[1]) : 50;
    pthread_t t;
    if (pthread_create(&t, NULL, worker, (void *)loads) != 0)
        return 2;
    long forks = 0;
    while (!atomic_load(&done) || forks < 20) {
        pid_t c = fork();
        if (c < 0)
            return 3;
        if (c == 0)
            _exit(7);
        int st;
        if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 7)
            return 4;
        forks++;
    }
    void *sum;
    pthread_join(t, &sum);
    printf("loads=%ld sum=%lu forks_ok=%d\n", loads, (unsigned long)sum, forks >= 20);
    return 0;
}
