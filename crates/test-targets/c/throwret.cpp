/* A C++ exception thrown through return-probed functions: mp_cpp_through(i) holds a
 * guard whose destructor calls mp_cpp_noted, and calls mp_cpp_thrower(i), which throws
 * i when it is even. main catches; prints "caught=C sum=S cleanups=K" (same output
 * probed or not). argv[1]: calls (default 10). */
#include <cstdio>
#include <cstdlib>

// Long enough for a jump at its entry (a promoted site), unlike a 4-byte lea and ret.
extern "C" int mp_cpp_noted(int x) {
    volatile int v = x;
    return v + 1;
}

namespace {
struct Guard {
    int *n;
    ~Guard() { *n = mp_cpp_noted(*n); }
};
}  // namespace

extern "C" int mp_cpp_thrower(int i) {
    if (i % 2 == 0) throw i;
    return i;
}

extern "C" int mp_cpp_through(int i, int *cleanups) {
    Guard g{cleanups};
    return mp_cpp_thrower(i) * 2;
}

extern "C" int mp_cpp_rets_main(int argc, char **argv) {
    int n = argc > 1 ? std::atoi(argv[1]) : 10;
    int caught = 0, sum = 0, cleanups = 0;
    for (int i = 0; i < n; i++) {
        try {
            sum += mp_cpp_through(i, &cleanups);
        } catch (int v) {
            caught++;
            sum += v;
        }
    }
    std::printf("caught=%d sum=%d cleanups=%d\n", caught, sum, cleanups);
    return 0;
}
