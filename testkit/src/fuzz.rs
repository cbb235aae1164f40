//! Helpers for the fuzz targets (`proto/tests/fuzz.rs`,
//! `client/tests/fuzz.rs`): proptest strategies that damage valid
//! encodings the way a hostile peer would (bytes flipped, lengths and type
//! markers swapped for huge ones, cut short, spliced), and a global
//! allocator that remembers the largest single allocation, so a target can
//! show that no input makes a decoder allocate what a length prefix claims.
//!
//! Each target runs [`config`]'s 2048 cases in `cargo xtask test`; a long
//! run sets `PROPTEST_CASES` higher (README, Development).

use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// An allocation larger than this, while decoding inputs of a few KiB, can
/// only come from trusting a length the input claims.
pub const MAX_ALLOCATION: usize = 64 << 20;

/// The system allocator, remembering the largest allocation made.
/// Install in a fuzz target with
/// `#[global_allocator] static A: CountingAlloc = CountingAlloc;`.
#[derive(Debug)]
pub struct CountingAlloc;

/// The largest allocation since the process started, bytes.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// The largest single allocation this process has made.
pub fn largest_allocation() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

// SAFETY: every call is forwarded unchanged to `System`; the counter is a
// relaxed atomic that never allocates. (A global allocator cannot be
// written without `unsafe`; this one is only linked into fuzz targets.)
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as for `alloc`; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Panic if any allocation so far was over [`MAX_ALLOCATION`].
pub fn assert_bounded_allocations() {
    let largest = largest_allocation();
    assert!(
        largest <= MAX_ALLOCATION,
        "an input made the decoder allocate {largest} bytes at once"
    );
}

/// One way to damage an encoding.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// XOR the byte at (position mod length) with a nonzero mask.
    Flip(usize, u8),
    /// Overwrite a byte with a MessagePack/TOML-significant value.
    Set(usize, u8),
    /// Write a big-endian u32 (a length claim) at a position.
    Length(usize, u32),
    /// Cut the encoding at a position.
    Truncate(usize),
    /// Insert bytes at a position.
    Insert(usize, Vec<u8>),
    /// Copy a slice of the encoding over another place.
    Splice(usize, usize, usize),
}

/// Bytes that mean something to MessagePack: markers of maps, arrays,
/// strings and binaries with 8/16/32-bit lengths, nil, bools, ints.
const MARKERS: &[u8] = &[
    0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xcc, 0xcf,
    0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xff, b'"', b'[', b']', b'=', b'\n', b'\\',
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<usize>(), proptest::sample::select(MARKERS)).prop_map(|(i, b)| Mutation::Set(i, b)),
        (
            any::<usize>(),
            prop_oneof![
                Just(u32::MAX),
                Just(0x7fff_ffff),
                Just(0x0100_0000),
                any::<u32>()
            ]
        )
            .prop_map(|(i, n)| Mutation::Length(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), any::<usize>(), 1usize..64)
            .prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
    ]
}

/// Apply `m` to `bytes`.
pub fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    if n == 0 {
        if let Mutation::Insert(_, b) = m {
            bytes.extend_from_slice(b);
        }
        return;
    }
    match m {
        Mutation::Flip(i, mask) => bytes[i % n] ^= mask,
        Mutation::Set(i, b) => bytes[i % n] = *b,
        Mutation::Length(i, len) => {
            let at = i % n;
            for (k, b) in len.to_be_bytes().iter().enumerate() {
                if let Some(slot) = bytes.get_mut(at + k) {
                    *slot = *b;
                }
            }
        }
        Mutation::Truncate(i) => bytes.truncate(i % n),
        Mutation::Insert(i, b) => {
            let at = i % (n + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Splice(from, to, len) => {
            let from = from % n;
            let len = (*len).min(n - from);
            let piece = bytes[from..from + len].to_vec();
            let to = to % n;
            for (k, b) in piece.into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(to + k) {
                    *slot = b;
                }
            }
        }
    }
}

/// One of `seeds`, damaged by one to eight mutations — or, one time in
/// eight, arbitrary bytes.
pub fn damaged(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let seeded = (
        proptest::sample::select(seeds),
        proptest::collection::vec(mutation(), 1..8),
    )
        .prop_map(|(mut bytes, ms)| {
            for m in &ms {
                apply(&mut bytes, m);
            }
            bytes
        });
    prop_oneof![
        7 => seeded,
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

/// The targets' proptest settings: 2048 cases in `cargo xtask test` (each
/// target takes well under a second), or `PROPTEST_CASES` for a long run.
pub fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 2048;
    }
    c
}
