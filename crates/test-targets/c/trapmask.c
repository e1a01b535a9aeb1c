/* A program that sets SIGTRAP up (argv[1]: "block" blocks it, "ignore" ignores it,
 * "handle" installs a handler and keeps the mask it inherited, "handle-calls" installs
 * one that calls mp_tm_work, "keep" keeps what it inherited through exec) before it
 * starts argv[3] worker threads (default 1), one
 * after the other, or all at once if argv[4] has "together" (each inherits the mask).
 * If argv[4] has "wait", it first prints "ready" and waits for a byte on stdin (for a
 * tracer to attach). Each worker calls mp_tm_work argv[2] times,
 * then raises SIGTRAP itself: blocked, it stays pending; ignored, it is dropped —
 * either way the program lives on. With a handler, the thread then unblocks SIGTRAP,
 * so the pending one reaches the handler; with "handle-calls" it raises SIGTRAP twice
 * more, each running the handler, which calls mp_tm_work once (with SIGTRAP blocked,
 * as in any handler without SA_NODEFER). Then the main thread does the same. Each
 * reports what it sees of SIGTRAP's disposition and mask and how many SIGTRAPs the
 * handler took, which a probed run must report the same. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline)) unsigned long mp_tm_work(unsigned long x) {
    __asm__ volatile("" : "+r"(x));
    return x * 3 + 1;
}

static long calls;
static int handling;
static volatile sig_atomic_t handled;

static void on_trap(int sig) {
    (void)sig;
    handled++;
    if (handling == 2)
        mp_tm_work((unsigned long)handled);
}

static void describe(const char *who) {
    struct sigaction sa;
    sigaction(SIGTRAP, NULL, &sa);
    sigset_t cur, pend;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    sigpending(&pend);
    printf("%s ignored=%d caught=%d blocked=%d pending=%d handled=%d\n", who,
           sa.sa_handler == SIG_IGN, sa.sa_handler == on_trap, sigismember(&cur, SIGTRAP),
           sigismember(&pend, SIGTRAP), (int)handled);
}

/* Raise SIGTRAP at this thread; with a handler, let it through, then block it again. */
static void raise_own(const char *who) {
    char name[64];
    snprintf(name, sizeof name, "%s-before-raise", who);
    describe(name);
    raise(SIGTRAP);
    snprintf(name, sizeof name, "%s-after-raise", who);
    describe(name);
    if (handling) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGTRAP);
        pthread_sigmask(SIG_UNBLOCK, &s, NULL);
        pthread_sigmask(SIG_BLOCK, &s, NULL);
        snprintf(name, sizeof name, "%s-after-unblock", who);
        describe(name);
    }
    for (int i = 0; handling == 2 && i < 2; i++) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGTRAP);
        pthread_sigmask(SIG_UNBLOCK, &s, NULL);
        raise(SIGTRAP);
        pthread_sigmask(SIG_BLOCK, &s, NULL);
        snprintf(name, sizeof name, "%s-after-handler-%d", who, i);
        describe(name);
    }
}

static void *worker(void *arg) {
    (void)arg;
    unsigned long s = 0;
    for (long i = 0; i < calls; i++)
        s += mp_tm_work((unsigned long)i);
    raise_own("worker");
    printf("worker sum=%lu\n", s);
    return NULL;
}

int mp_trapmask_main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "block";
    calls = argc > 2 ? atol(argv[2]) : 10;
    long workers = argc > 3 ? atol(argv[3]) : 1;
    if (strcmp(mode, "keep") == 0) {
        /* as inherited */
    } else if (strcmp(mode, "ignore") == 0) {
        signal(SIGTRAP, SIG_IGN);
    } else if (strncmp(mode, "handle", 6) == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_trap;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGTRAP, &sa, NULL);
        handling = strcmp(mode, "handle-calls") == 0 ? 2 : 1;
    } else {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGTRAP);
        pthread_sigmask(SIG_BLOCK, &s, NULL);
    }
    const char *how = argc > 4 ? argv[4] : "";
    if (strstr(how, "wait")) {
        char go;
        printf("ready\n");
        fflush(stdout);
        if (read(0, &go, 1) != 1)
            return 3;
    }
    int together = strstr(how, "together") != NULL;
    pthread_t *t = calloc((size_t)workers + 1, sizeof *t);
    for (long w = 0; w < workers; w++) {
        if (pthread_create(&t[w], NULL, worker, NULL) != 0)
            return 2;
        if (!together)
            pthread_join(t[w], NULL);
    }
    for (long w = 0; together && w < workers; w++)
        pthread_join(t[w], NULL);
    free(t);
    unsigned long s = 0;
    for (long i = 0; i < calls; i++)
        s += mp_tm_work((unsigned long)i);
    raise_own("main");
    printf("main sum=%lu\n", s);
    return 0;
}
