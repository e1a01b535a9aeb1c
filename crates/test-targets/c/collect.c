/* The collecting-probe target (backend-ptrace tests/collect.rs). Modes (argv[1]):
 *   threads T N   T threads each call mp_col_target(a..f) N times with arguments that
 *                 depend on the thread and the call; prints the call count and a
 *                 checksum of every argument passed ("calls=.. sum=.. mix=..": the
 *                 wrapping sums of a and of (a * k) ^ (a >> 7) over every argument a,
 *                 k its 1-based position).
 *   killed T N    as threads, then prints its line, flushes and kills itself (SIGKILL):
 *                 what the probes made must be read after the process is gone.
 *   rate MS [K]   for MS milliseconds, K (default 1000) calls of mp_col_target(i, 0, ..)
 *                 at the start of each millisecond (1 M calls a second), i from 0;
 *                 prints "calls=.. sum=.." (the sum of every i passed).
 *   mem N         calls mp_col_mem(p, 16) N times, p NULL on every odd call and a
 *                 16-byte buffer "mp-col-mem-data!" otherwise; prints "calls=.. ok".
 *   stoponly N    calls mp_col_loop (whose region cannot be promoted: a branch targets
 *                 its interior) from 4 threads N times each; prints "calls=..".
 *   fork N        calls mp_col_target N times, forks; the child calls it 2N times and
 *                 exits; the parent waits and calls it N more; prints per process.
 *   exec N        calls mp_col_target N times, then execs itself in "threads 1 N".
 *   vfork N       one thread calls mp_col_target in a loop while main vforks and execs
 *                 /bin/true N times; prints "vforks=.. calls=..".
 *   busy T        T threads call mp_col_target forever (sleeping 100 us every 1000
 *                 calls) until stdin is closed; prints "calls=..". T = 0: the main
 *                 thread does, alone (a single-threaded process).
 *   strlen N      calls libc's strlen (through a pointer: no builtin) N times on a
 *                 10-byte string; prints "calls=.. len=..". (A stripped libc's strlen
 *                 implementation has no symbol: only its unwind entry bounds it.)
 *   strstr N      the same with strstr (an IFUNC whose library keeps no GOT slot of
 *                 its own for it); prints "calls=.. found=..".
 *   wait ...      as the mode after it, but first waits for a line on stdin.
 * Every mode prints through stdio and flushes before it exits. */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) uint64_t mp_col_target(uint64_t a, uint64_t b, uint64_t c, uint64_t d,
                                                 uint64_t e, uint64_t f) {
    return a * 3 + b * 5 + c * 7 + d * 11 + e * 13 + f * 17;
}

__attribute__((noinline)) int mp_col_mem(const char *p, int len) {
    return p ? (int)p[0] + len : len;
}

/* xor eax,eax; then a loop whose head is in the first five bytes: not promotable. */
__asm__(".globl mp_col_loop\n"
        ".type mp_col_loop, @function\n"
        "mp_col_loop:\n"
        "  xor %eax, %eax\n"
        "1:\n"
        "  inc %eax\n"
        "  cmp $3, %eax\n"
        "  jne 1b\n"
        "  ret\n"
        ".size mp_col_loop, . - mp_col_loop\n");
int mp_col_loop(void);

static long iters;
static _Atomic uint64_t sum, xsum, calls;
static atomic_int stop;

static void *caller(void *arg) {
    uint64_t t = (uint64_t)(uintptr_t)arg;
    uint64_t s = 0, x = 0, r = 0;
    for (long i = 0; i < iters; i++) {
        uint64_t v[6];
        for (int k = 0; k < 6; k++)
            v[k] = (t << 40) ^ ((uint64_t)i << 8) ^ (uint64_t)(k + 1) * 0x9e3779b97f4a7c15ull;
        r += mp_col_target(v[0], v[1], v[2], v[3], v[4], v[5]);
        for (int k = 0; k < 6; k++) {
            s += v[k];
            x += (v[k] * (uint64_t)(k + 1)) ^ (v[k] >> 7);
        }
    }
    atomic_fetch_add(&sum, s);
    atomic_fetch_add(&xsum, x);
    atomic_fetch_add(&calls, (uint64_t)iters);
    return (void *)(uintptr_t)r;
}

static void run_threads(int n) {
    pthread_t th[64];
    for (int i = 0; i < n; i++)
        pthread_create(&th[i], NULL, caller, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
}

static void *looper(void *arg) {
    (void)arg;
    for (long i = 0; i < iters; i++)
        mp_col_loop();
    atomic_fetch_add(&calls, (uint64_t)iters);
    return NULL;
}

static void *spinner(void *arg) {
    (void)arg;
    uint64_t n = 0;
    while (!atomic_load(&stop)) {
        mp_col_target(n, 1, 2, 3, 4, 5);
        if (++n % 1000 == 0) {
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
        }
    }
    atomic_fetch_add(&calls, n);
    return NULL;
}

/* vfork + exec /bin/true n times; how many children exited 0. */
__attribute__((noinline)) static long vforks(long n) {
    volatile long ok = 0;
    for (volatile long i = 0; i < n; i++) {
        pid_t c = vfork();
        if (c == 0) {
            execl("/bin/true", "true", (char *)NULL);
            _exit(127);
        }
        int st;
        if (c > 0 && waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0)
            ok++;
    }
    return ok;
}

int mp_collect_main(int argc, char **argv) {
    int a = 1;
    if (a < argc && strcmp(argv[a], "wait") == 0) {
        char line[16];
        if (!fgets(line, sizeof line, stdin))
            return 4;
        a++;
    }
    const char *mode = a < argc ? argv[a] : "threads";
    if (strcmp(mode, "threads") == 0 || strcmp(mode, "killed") == 0) {
        int t = a + 1 < argc ? atoi(argv[a + 1]) : 4;
        iters = a + 2 < argc ? atol(argv[a + 2]) : 1000;
        run_threads(t);
        printf("calls=%llu sum=%llu mix=%llu\n", (unsigned long long)calls,
               (unsigned long long)sum, (unsigned long long)xsum);
        if (strcmp(mode, "killed") == 0) {
            fflush(stdout);
            kill(getpid(), SIGKILL);
        }
    } else if (strcmp(mode, "rate") == 0) {
        long ms = a + 1 < argc ? atol(argv[a + 1]) : 1000;
        long per_ms = a + 2 < argc ? atol(argv[a + 2]) : 1000;
        struct timespec next;
        clock_gettime(CLOCK_MONOTONIC, &next);
        uint64_t i = 0, s = 0;
        for (long m = 0; m < ms; m++) {
            for (long k = 0; k < per_ms; k++, i++) {
                mp_col_target(i, 0, 0, 0, 0, 0);
                s += i;
            }
            next.tv_nsec += 1000000;
            if (next.tv_nsec >= 1000000000) {
                next.tv_nsec -= 1000000000;
                next.tv_sec++;
            }
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        }
        printf("calls=%llu sum=%llu\n", (unsigned long long)i, (unsigned long long)s);
    } else if (strcmp(mode, "mem") == 0) {
        long n = a + 1 < argc ? atol(argv[a + 1]) : 10;
        static const char data[17] = "mp-col-mem-data!";
        long r = 0;
        for (long i = 0; i < n; i++)
            r += mp_col_mem(i % 2 ? NULL : data, 16);
        printf("calls=%ld ok r=%ld\n", n, r);
    } else if (strcmp(mode, "stoponly") == 0) {
        iters = a + 1 < argc ? atol(argv[a + 1]) : 1000;
        pthread_t th[4];
        for (int i = 0; i < 4; i++)
            pthread_create(&th[i], NULL, looper, NULL);
        for (int i = 0; i < 4; i++)
            pthread_join(th[i], NULL);
        printf("calls=%llu\n", (unsigned long long)calls);
    } else if (strcmp(mode, "fork") == 0) {
        long n = a + 1 < argc ? atol(argv[a + 1]) : 10;
        for (long i = 0; i < n; i++)
            mp_col_target((uint64_t)i, 0, 0, 0, 0, 0);
        fflush(stdout);
        pid_t c = fork();
        if (c == 0) {
            for (long i = 0; i < 2 * n; i++)
                mp_col_target((uint64_t)i, 1, 0, 0, 0, 0);
            printf("child calls=%ld\n", 2 * n);
            fflush(stdout);
            _exit(0);
        }
        int st;
        waitpid(c, &st, 0);
        for (long i = 0; i < n; i++)
            mp_col_target((uint64_t)i, 2, 0, 0, 0, 0);
        printf("parent calls=%ld child=%d\n", 2 * n, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    } else if (strcmp(mode, "exec") == 0) {
        long n = a + 1 < argc ? atol(argv[a + 1]) : 10;
        for (long i = 0; i < n; i++)
            mp_col_target((uint64_t)i, 0, 0, 0, 0, 0);
        printf("before exec calls=%ld\n", n);
        fflush(stdout);
        execl("/proc/self/exe", argv[0], "threads", "1", argv[a + 1], (char *)NULL);
        return 5;
    } else if (strcmp(mode, "vfork") == 0) {
        long n = a + 1 < argc ? atol(argv[a + 1]) : 10;
        pthread_t th;
        pthread_create(&th, NULL, spinner, NULL);
        long ok = vforks(n);
        atomic_store(&stop, 1);
        pthread_join(th, NULL);
        printf("vforks=%ld calls=%llu\n", ok, (unsigned long long)calls);
    } else if (strcmp(mode, "strlen") == 0) {
        long n = a + 1 < argc ? atol(argv[a + 1]) : 1000;
        size_t (*volatile len)(const char *) = strlen;
        static char word[16] = "multiprobe";
        size_t total = 0;
        for (long i = 0; i < n; i++)
            total += len(word);
        printf("calls=%ld len=%zu\n", n, total);
    } else if (strcmp(mode, "strstr") == 0) {
        long n = a + 1 < argc ? atol(argv[a + 1]) : 1000;
        char *(*volatile find)(const char *, const char *) = strstr;
        static char hay[32] = "multiprobe probes";
        long found = 0;
        for (long i = 0; i < n; i++)
            found += find(hay, "probes") != NULL;
        printf("calls=%ld found=%ld\n", n, found);
    } else if (strcmp(mode, "busy") == 0) {
        int t = a + 1 < argc ? atoi(argv[a + 1]) : 4;
        if (t == 0) {
            uint64_t n = 0;
            for (;;) {
                mp_col_target(n, 1, 2, 3, 4, 5);
                if (++n % 1000 == 0) {
                    struct pollfd p = {0, POLLIN, 0};
                    char buf[64];
                    if (poll(&p, 1, 0) > 0 && read(0, buf, sizeof buf) <= 0)
                        break;
                    struct timespec ts = {0, 100000};
                    nanosleep(&ts, NULL);
                }
            }
            printf("calls=%llu\n", (unsigned long long)n);
            fflush(stdout);
            return 0;
        }
        pthread_t th[64];
        for (int i = 0; i < t; i++)
            pthread_create(&th[i], NULL, spinner, NULL);
        char buf[64];
        while (read(0, buf, sizeof buf) > 0) {
        }
        atomic_store(&stop, 1);
        for (int i = 0; i < t; i++)
            pthread_join(th[i], NULL);
        printf("calls=%llu\n", (unsigned long long)calls);
    } else {
        return 2;
    }
    fflush(stdout);
    return 0;
}
