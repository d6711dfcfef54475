//! Pending ports and the event loop around `wait`.

use core::ops::ControlFlow;

use abi::hypercall::{Error, NR_PORTS, PORT_WORDS};

use crate::hypercall;

/// A set of ports, as `wait` writes it: bit `p % 64` of word `p / 64`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending(pub [u64; PORT_WORDS]);

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    pub fn contains(&self, port: u16) -> bool {
        let p = usize::from(port);
        p < NR_PORTS && self.0[p / 64] & (1 << (p % 64)) != 0
    }

    /// Adds `port`; ports at or over `NR_PORTS` are ignored.
    pub fn insert(&mut self, port: u16) {
        let p = usize::from(port);
        if p < NR_PORTS {
            self.0[p / 64] |= 1 << (p % 64);
        }
    }

    /// Removes and returns the lowest port in the set.
    pub fn pop(&mut self) -> Option<u16> {
        let (i, w) = self.0.iter_mut().enumerate().find(|(_, w)| **w != 0)?;
        let bit = w.trailing_zeros();
        *w &= *w - 1;
        Some((i * 64) as u16 + bit as u16)
    }

    /// The ports, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = u16> {
        let mut s = *self;
        core::iter::from_fn(move || s.pop())
    }
}

/// Hands out pending ports one at a time, blocking in `wait` when none is
/// left from the last one. Ports delivered together are handed out lowest
/// first; none is lost when the caller stops in the middle of a batch.
#[derive(Clone, Debug, Default)]
pub struct EventLoop {
    pending: Pending,
}

impl EventLoop {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next pending port (blocking until there is one).
    pub fn next_port(&mut self) -> Result<u16, Error> {
        loop {
            if let Some(p) = self.pending.pop() {
                return Ok(p);
            }
            let mut words = [0u64; PORT_WORDS];
            hypercall::wait(&mut words, 0)?;
            self.pending = Pending(words);
        }
    }

    /// Ports pending right now (without blocking) join the ones kept.
    pub fn poll(&mut self) -> Result<(), Error> {
        let mut words = [0u64; PORT_WORDS];
        hypercall::wait(&mut words, abi::hypercall::WAIT_NONBLOCK)?;
        for (mine, new) in self.pending.0.iter_mut().zip(words) {
            *mine |= new;
        }
        Ok(())
    }

    /// Calls `f` for each pending port as it comes until `f` breaks.
    pub fn run<T>(&mut self, mut f: impl FnMut(u16) -> ControlFlow<T>) -> Result<T, Error> {
        loop {
            if let ControlFlow::Break(t) = f(self.next_port()?) {
                return Ok(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn sets_and_pops_lowest_first() {
        let mut p = Pending::default();
        assert!(p.is_empty());
        for port in [200, 1, 64, 63, 255, 256, 1000] {
            p.insert(port);
        }
        assert!(p.contains(63) && p.contains(64) && !p.contains(2) && !p.contains(256));
        assert_eq!(p.iter().collect::<Vec<_>>(), [1, 63, 64, 200, 255]);
        assert_eq!(p.pop(), Some(1));
        assert_eq!(p.pop(), Some(63));
        assert_eq!(p.iter().count(), 3);
        let mut q = Pending([0, 0, 0, 1 << 63]);
        assert_eq!(q.pop(), Some(255));
        assert_eq!(q.pop(), None);
        assert!(q.is_empty());
    }
}
