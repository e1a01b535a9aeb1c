// A C++ exception thrown through return-probed functions and caught (the in-process
// backend's tests): mp_rp_thrower throws for odd x; mp_rp_through has a destructor to
// run on the way (a cleanup landing pad and _Unwind_Resume); mp_rp_catch catches.
#include <stdexcept>
#include <string>

extern "C" __attribute__((noinline)) long mp_rp_thrower(long x) {
    if (x & 1)
        throw std::runtime_error("odd");
    return x * 2;
}

extern "C" __attribute__((noinline)) long mp_rp_through(long x) {
    std::string s(static_cast<size_t>(x % 3 + 20), 'k');
    long r = mp_rp_thrower(x);
    return r + static_cast<long>(s.size());
}

// x * 2 + 20 + x % 3 for even x, -1000 - x for odd x (caught here).
extern "C" __attribute__((noinline)) long mp_rp_catch(long x) {
    try {
        return mp_rp_through(x);
    } catch (const std::runtime_error &) {
        return -1000 - x;
    }
}
