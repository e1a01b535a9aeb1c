/* Functions the in-process backend's tests return-probe and call directly (linked into
 * the test executables through multiprobe-test-targets' `inproc` module): a longjmp out
 * of two calls, backtrace(3) from inside two, and coroutines that switch stacks inside
 * calls (coro.h). Built without sibling calls, so every
 * call here is a real call with a return. */
#include <execinfo.h>
#include <setjmp.h>

static __thread jmp_buf mp_rp_env;

__attribute__((noinline)) long mp_rp_jumper(long x) {
    if (x >= 0)
        longjmp(mp_rp_env, (int)(x + 1));
    return -1;
}

__attribute__((noinline)) long mp_rp_jump_via(long x) {
    long r = mp_rp_jumper(x);
    return r + 1; /* not reached for x >= 0 */
}

/* 1000 + x + 1 after the longjmp out of mp_rp_jumper (through mp_rp_jump_via). */
__attribute__((noinline)) long mp_rp_setjmp_run(long x) {
    int r = setjmp(mp_rp_env);
    if (r)
        return 1000 + r;
    return mp_rp_jump_via(x);
}

__attribute__((noinline)) int mp_rp_bt_inner(void **buf, int n) {
    int k = backtrace(buf, n);
    return k;
}

__attribute__((noinline)) int mp_rp_bt_outer(void **buf, int n) {
    int k = mp_rp_bt_inner(buf, n);
    return k;
}

#define CORO_RESUME mp_rp_co_resume
#define CORO_YIELD mp_rp_co_yield
#define CORO_RUN mp_rp_co_run
#include "coro.h"
