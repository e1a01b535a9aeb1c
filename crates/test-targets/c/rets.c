/* Return-probe targets: functions whose return values and call counts the program
 * prints, so a test can compare what return probes saw with what the program did.
 * Built without sibling calls (every call returns through its caller).
 *
 *   add N          N calls of mp_ret_add(i, 2i); prints "sum=S calls=N"
 *   depth D        mp_ret_depth recursing D deep; prints "depth=D"
 *   threads T N    T threads, each N calls of mp_ret_add; "thread K sum=S" in order
 *   longjmp N      N times: mp_ret_around -> mp_ret_jump, which longjmps out of both;
 *                  then one mp_ret_add; prints "jumped=N"
 *   nap MS...      mp_ret_nap(MS) for each argument; prints "nap MS=R" for each
 *   slow T N MS    T threads, each N calls of mp_ret_nap(MS), printing "ret=R" after
 *                  each (a thread spends most of its time inside a call)
 *   fork           mp_ret_forker(40) forks inside the call; the child returns from it
 *                  (41) and exits 7, the parent waits and returns 42 + the child's exit
 *                  status; prints "child r=41" and "parent r=49"
 *   bt             mp_ret_bt_outer -> mp_ret_bt, which calls backtrace(3); prints the
 *                  frame count (the same probed or not, if unwinding gets through)
 *   exit N         N calls of mp_ret_add, then mp_ret_exiter(5), which calls exit(5)
 *                  and never returns; prints "exiting"
 *   waves W T N    W waves of T threads (created, then joined), each N calls of
 *                  mp_ret_add; every thread has a stack of its own, never reused, so
 *                  W * T threads have W * T fs bases; prints "waves=W sum=S"
 *   tail N         N calls of mp_ret_tail(i, i), which tail-calls (jmp) mp_ret_add(i, 2i);
 *                  prints "sum=S calls=N"
 *   coro N A       coroutines switching stacks inside return-probed calls (coro.h):
 *                  mp_ret_co_run(N, A); prints "coro=T"
 *   quit MS        mp_ret_quitter(0) returns; after a byte on stdin a thread calls
 *                  mp_ret_quitter(1),
 *                  which ends the thread (pthread_exit) inside the call; after the
 *                  join, mp_ret_nap(MS); prints "joined" and "napped" */
#define _GNU_SOURCE
#include <execinfo.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

/* Long enough for a jump at its entry (a promoted site): the volatile keeps the
 * compiler from folding it into a 4-byte lea and ret. */
int mp_ret_add(int a, int b) {
    volatile int s = a;
    return s + b;
}

/* mp_ret_tail(a, b) = mp_ret_add(a, 2 * b), by a tail call: a `jmp`, so both calls
 * share one return slot. In assembly, as this file is built without sibling calls;
 * 6 bytes before the jump (a promoted site). */
int mp_ret_tail(int a, int b);
__asm__(".globl mp_ret_tail\n"
        ".type mp_ret_tail, @function\n"
        "mp_ret_tail:\n"
        "    imull $2, %esi, %esi\n"
        "    addl $0, %edi\n"
        "    jmp mp_ret_add\n"
        ".size mp_ret_tail, . - mp_ret_tail\n");

int mp_ret_depth(int n) { return n == 0 ? 0 : 1 + mp_ret_depth(n - 1); }

long mp_ret_nap(int ms) {
    usleep((useconds_t)ms * 1000);
    return ms * 3;
}

static jmp_buf env;

#define CORO_RESUME mp_ret_co_resume
#define CORO_YIELD mp_ret_co_yield
#define CORO_RUN mp_ret_co_run
#include "coro.h"

void mp_ret_jump(int i) { longjmp(env, i + 1); }

int mp_ret_around(int i) {
    mp_ret_jump(i);
    return -1; /* never */
}

int mp_ret_forker(int x) {
    pid_t p = fork();
    if (p == 0) return x + 1; /* the child returns through the probed call too */
    int st = 0;
    waitpid(p, &st, 0);
    return x + 2 + (WIFEXITED(st) ? WEXITSTATUS(st) : 100);
}

int mp_ret_bt(void) {
    void *frames[64];
    int n = backtrace(frames, 64);
    printf("frames=%d\n", n);
    return n;
}

int mp_ret_bt_outer(void) { return mp_ret_bt() + 1; }

void mp_ret_exiter(int code) {
    printf("exiting\n");
    fflush(stdout);
    exit(code);
}

/* The volatile gives its entry 5 bytes before the branch (a promoted site). */
void mp_ret_quitter(int x) {
    volatile int v = x;
    if (v) pthread_exit(NULL);
}

static void *quitter(void *p) {
    (void)p;
    mp_ret_quitter(1);
    return NULL;
}

struct job {
    int k, n, ms;
    long sum;
};

static void *adder(void *p) {
    struct job *j = p;
    for (int i = 0; i < j->n; i++) j->sum += mp_ret_add(i, j->k);
    return NULL;
}

static void *sleeper(void *p) {
    struct job *j = p;
    for (int i = 0; i < j->n; i++) {
        long r = mp_ret_nap(j->ms);
        printf("ret=%ld\n", r);
        fflush(stdout);
    }
    return NULL;
}

static int run_threads(void *(*f)(void *), int t, int n, int ms) {
    struct job jobs[16];
    pthread_t th[16];
    if (t > 16) t = 16;
    for (int k = 0; k < t; k++) {
        jobs[k] = (struct job){k, n, ms, 0};
        pthread_create(&th[k], NULL, f, &jobs[k]);
    }
    for (int k = 0; k < t; k++) pthread_join(th[k], NULL);
    if (f == adder)
        for (int k = 0; k < t; k++) printf("thread %d sum=%ld\n", k, jobs[k].sum);
    return 0;
}

static int run_waves(int w, int t, int n) {
    struct job jobs[16];
    pthread_t th[16];
    long sum = 0;
    if (t > 16) t = 16;
    for (int wave = 0; wave < w; wave++) {
        for (int k = 0; k < t; k++) {
            /* A fresh stack per thread (never unmapped): glibc puts the TLS, and so
             * the fs base, in it. */
            size_t len = 256 * 1024;
            void *stack = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            pthread_attr_t attr;
            if (stack == MAP_FAILED || pthread_attr_init(&attr) || pthread_attr_setstack(&attr, stack, len))
                return 3;
            jobs[k] = (struct job){k, n, 0, 0};
            if (pthread_create(&th[k], &attr, adder, &jobs[k])) return 4;
            pthread_attr_destroy(&attr);
        }
        for (int k = 0; k < t; k++) {
            pthread_join(th[k], NULL);
            sum += jobs[k].sum;
        }
    }
    printf("waves=%d sum=%ld\n", w, sum);
    return 0;
}

int mp_rets_main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "add";
    int a = argc > 2 ? atoi(argv[2]) : 10;
    int b = argc > 3 ? atoi(argv[3]) : 10;
    int c = argc > 4 ? atoi(argv[4]) : 10;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(mode, "add")) {
        long long s = 0;
        for (int i = 0; i < a; i++) s += mp_ret_add(i, 2 * i);
        printf("sum=%lld calls=%d\n", s, a);
    } else if (!strcmp(mode, "exit")) {
        for (int i = 0; i < a; i++) mp_ret_add(i, i);
        mp_ret_exiter(5);
    } else if (!strcmp(mode, "depth")) {
        printf("depth=%d\n", mp_ret_depth(a));
    } else if (!strcmp(mode, "threads")) {
        return run_threads(adder, a, b, 0);
    } else if (!strcmp(mode, "tail")) {
        long long s = 0;
        for (int i = 0; i < a; i++) s += mp_ret_tail(i, i);
        printf("sum=%lld calls=%d\n", s, a);
    } else if (!strcmp(mode, "quit")) {
        pthread_t th;
        mp_ret_quitter(0);
        getchar(); /* a tracer's test says when (once the site is promoted) */
        if (pthread_create(&th, NULL, quitter, NULL)) return 4;
        pthread_join(th, NULL);
        printf("joined\n");
        mp_ret_nap(a);
        printf("napped\n");
    } else if (!strcmp(mode, "waves")) {
        return run_waves(a, b, c);
    } else if (!strcmp(mode, "longjmp")) {
        volatile int jumped = 0;
        for (volatile int i = 0; i < a; i++)
            if (setjmp(env) == 0)
                mp_ret_around(i);
            else
                jumped++;
        printf("jumped=%d add=%d\n", jumped, mp_ret_add(jumped, 0));
    } else if (!strcmp(mode, "coro")) {
        printf("coro=%ld\n", mp_ret_co_run(a, argc > 3 ? atoi(argv[3]) : 0));
    } else if (!strcmp(mode, "nap")) {
        for (int i = 2; i < argc; i++) {
            int ms = atoi(argv[i]);
            printf("nap %d=%ld\n", ms, mp_ret_nap(ms));
        }
    } else if (!strcmp(mode, "slow")) {
        return run_threads(sleeper, a, b, c);
    } else if (!strcmp(mode, "fork")) {
        int r = mp_ret_forker(40);
        if (r == 41) {
            printf("child r=%d\n", r);
            fflush(stdout);
            _exit(7);
        }
        printf("parent r=%d\n", r);
    } else if (!strcmp(mode, "bt")) {
        printf("outer=%d\n", mp_ret_bt_outer());
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    return 0;
}
