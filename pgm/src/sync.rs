//! The atomics the lock-free fault path shares with the lock holder: `core`'s, or `loom`'s when
//! built with `--cfg loom` so that the models (`loom_model_tests`, and `manager::lock_free`'s
//! own) explore their interleavings. Simulated host memory keeps `core` atomics even then: it stands for the
//! machine's memory, whose word accesses are atomic, and keeping its thousands of words out of
//! the model keeps the model small.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Plain access to an atomic through `&mut` (no other thread can reach it), under both models.
pub(crate) trait Exclusive<T> {
    /// The value.
    fn get(&mut self) -> T;
    /// Replaces the value.
    fn set(&mut self, value: T);
}

macro_rules! exclusive {
    ($($atomic:ty, $value:ty;)*) => {$(
        impl Exclusive<$value> for $atomic {
            #[cfg(not(loom))]
            #[inline]
            fn get(&mut self) -> $value {
                *self.get_mut()
            }

            #[cfg(not(loom))]
            #[inline]
            fn set(&mut self, value: $value) {
                *self.get_mut() = value;
            }

            // Loom has no plain access for every type; under `&mut` an atomic access is as good
            // (the lock ordered every earlier access before it).
            #[cfg(loom)]
            fn get(&mut self) -> $value {
                self.load(Ordering::Relaxed)
            }

            #[cfg(loom)]
            fn set(&mut self, value: $value) {
                self.store(value, Ordering::Relaxed);
            }
        }
    )*};
}

exclusive! {
    AtomicU64, u64;
    AtomicUsize, usize;
    AtomicBool, bool;
}
