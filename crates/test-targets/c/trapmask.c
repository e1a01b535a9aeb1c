/* A program that blocks or ignores SIGTRAP (argv[1]: "block" or "ignore"; "keep" leaves
 * what it inherited through exec) before it starts a worker thread (which inherits the
 * mask). The worker calls mp_tm_work
 * argv[2] times, then raises SIGTRAP itself: blocked, it stays pending; ignored, it is
 * dropped — either way the program lives on. It then reports what it sees of SIGTRAP's
 * disposition and mask, which a probed run must report the same. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noinline)) unsigned long mp_tm_work(unsigned long x) {
    __asm__ volatile("" : "+r"(x));
    return x * 3 + 1;
}

static long calls;

static void describe(const char *who) {
    struct sigaction sa;
    sigaction(SIGTRAP, NULL, &sa);
    sigset_t cur, pend;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    sigpending(&pend);
    printf("%s ignored=%d blocked=%d pending=%d\n", who, sa.sa_handler == SIG_IGN,
           sigismember(&cur, SIGTRAP), sigismember(&pend, SIGTRAP));
}

static void *worker(void *arg) {
    (void)arg;
    unsigned long s = 0;
    for (long i = 0; i < calls; i++)
        s += mp_tm_work((unsigned long)i);
    describe("worker-before-raise");
    raise(SIGTRAP);
    describe("worker-after-raise");
    printf("worker sum=%lu\n", s);
    return NULL;
}

int mp_trapmask_main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "block";
    calls = argc > 2 ? atol(argv[2]) : 10;
    if (strcmp(mode, "keep") == 0) {
        /* as inherited */
    } else if (strcmp(mode, "ignore") == 0) {
        signal(SIGTRAP, SIG_IGN);
    } else {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGTRAP);
        pthread_sigmask(SIG_BLOCK, &s, NULL);
    }
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0)
        return 2;
    pthread_join(t, NULL);
    unsigned long s = 0;
    for (long i = 0; i < calls; i++)
        s += mp_tm_work((unsigned long)i);
    describe("main");
    raise(SIGTRAP);
    describe("main-after-raise");
    printf("main sum=%lu\n", s);
    return 0;
}
