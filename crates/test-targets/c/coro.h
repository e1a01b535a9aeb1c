/* Two coroutines (ucontext) that switch stacks inside return-probed calls, for the
 * return-probe tests of every backend. Include it after defining CORO_RESUME,
 * CORO_YIELD and CORO_RUN, the names of the three functions it defines.
 *
 * CORO_RUN(n, a_above) runs coroutine A, which calls CORO_RESUME(i) for i = 0..=n;
 * each CORO_RESUME switches to coroutine B inside the call. B calls CORO_YIELD(i) for
 * i = 0..n-1; each CORO_YIELD switches back to A inside the call. So every return of
 * CORO_RESUME happens while a call of CORO_YIELD is in flight on the other stack, and
 * each CORO_YIELD returns after a CORO_RESUME returned and another one entered. The
 * two stacks are neighbours in one array; a_above puts A's above B's. Returns
 * n(n-1) + 3n(n-1)/2 + n (the same probed or not). Not reentrant. */
#include <ucontext.h>

#define CORO_STACK (64 * 1024)
static char coro_stacks[2][CORO_STACK] __attribute__((aligned(64)));
static ucontext_t coro_caller, coro_a, coro_b;
static long coro_n, coro_value, coro_sum;

__attribute__((noinline)) long CORO_YIELD(long x) {
    coro_value = x;
    swapcontext(&coro_b, &coro_a);
    return x * 3;
}

static void coro_on_b(void) {
    long s = 0;
    for (long i = 0; i < coro_n; i++)
        s += CORO_YIELD(i);
    coro_value = s; /* then on to A, by uc_link */
}

__attribute__((noinline)) long CORO_RESUME(long x) {
    swapcontext(&coro_a, &coro_b);
    return coro_value + x;
}

static void coro_on_a(void) {
    long t = 0;
    for (long i = 0; i <= coro_n; i++)
        t += CORO_RESUME(i);
    coro_sum = t; /* then back to CORO_RUN's caller, by uc_link */
}

long CORO_RUN(long n, int a_above) {
    coro_n = n;
    coro_sum = -1;
    getcontext(&coro_a);
    coro_a.uc_stack.ss_sp = coro_stacks[a_above ? 1 : 0];
    coro_a.uc_stack.ss_size = CORO_STACK;
    coro_a.uc_link = &coro_caller;
    makecontext(&coro_a, coro_on_a, 0);
    getcontext(&coro_b);
    coro_b.uc_stack.ss_sp = coro_stacks[a_above ? 0 : 1];
    coro_b.uc_stack.ss_size = CORO_STACK;
    coro_b.uc_link = &coro_a;
    makecontext(&coro_b, coro_on_b, 0);
    swapcontext(&coro_caller, &coro_a);
    return coro_sum;
}
