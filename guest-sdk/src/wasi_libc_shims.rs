//! Symbols Debian's wasi-libc (WASI preview 1, 2022) lacks but Rust's std
//! refers to as soon as `std::thread::spawn` is reachable (rayon, for one).
//! With these, `thread::spawn` returns `Unsupported` and single-threaded
//! fallbacks run; without them the job fails to link. Jobs never get threads.

use core::ffi::c_int;

const ENOTSUP: c_int = 58;

#[unsafe(no_mangle)]
extern "C" fn pthread_attr_init(_attr: *mut u8) -> c_int {
    0
}
#[unsafe(no_mangle)]
extern "C" fn pthread_attr_destroy(_attr: *mut u8) -> c_int {
    0
}
#[unsafe(no_mangle)]
extern "C" fn pthread_attr_setstacksize(_attr: *mut u8, _size: usize) -> c_int {
    0
}
#[unsafe(no_mangle)]
extern "C" fn pthread_create(_t: *mut u8, _attr: *const u8, _f: *const u8, _arg: *mut u8) -> c_int {
    ENOTSUP
}
#[unsafe(no_mangle)]
extern "C" fn pthread_detach(_t: usize) -> c_int {
    ENOTSUP
}
#[unsafe(no_mangle)]
extern "C" fn pthread_join(_t: usize, _ret: *mut u8) -> c_int {
    ENOTSUP
}
