//! `work=spin`, `work=bystander` and `role=idle`: CPU work and waiting.

use alloc::vec;

use abi::ev::WorkDone;
use abi::hypercall::virq;
use libdom::{
    event, evtchn_bind_virq, evtchn_close, println, set_timer, time_ns, yield_now, EventLoop,
};

/// Spin iterations between two looks at the clock.
pub const SPIN_BATCH: u64 = 100_000;

/// One step of the spin loop's busy work (xorshift64).
pub fn step(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Spins on pure CPU until `until_ms` after the hypervisor's entry, then
/// reports the iterations as `work_done {work: "spin"}`.
pub fn spin(until_ms: u64) -> i64 {
    let deadline = until_ms.saturating_mul(1_000_000);
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut iterations = 0u64;
    loop {
        for _ in 0..SPIN_BATCH {
            x = step(core::hint::black_box(x));
        }
        iterations += SPIN_BATCH;
        if time_ns() >= deadline {
            break;
        }
    }
    core::hint::black_box(x);
    let _ = event(&WorkDone {
        work: "spin",
        units: iterations,
    });
    0
}

/// How many primes are below `n`, by the sieve of Eratosthenes (on the
/// heap).
pub fn primes_below(n: usize) -> u64 {
    if n < 3 {
        return 0;
    }
    let mut composite = vec![false; n];
    let mut count = 0;
    for i in 2..n {
        if composite[i] {
            continue;
        }
        count += 1;
        let mut j = i * i;
        while j < n {
            composite[j] = true;
            j += i;
        }
    }
    count
}

/// The bystander's work: this many sieves, with a yield after each.
pub const BYSTANDER_ROUNDS: u64 = 20;
pub const BYSTANDER_LIMIT: usize = 100_000;
/// Primes below 100,000.
pub const BYSTANDER_PRIMES: u64 = 9592;

/// A fixed amount of CPU and heap work with yields between rounds, each
/// round's result checked; `work_done {work: "bystander", units: primes
/// found}`. 1 if any round came out wrong.
pub fn bystander() -> i64 {
    let mut units = 0;
    let mut wrong = 0;
    for round in 0..BYSTANDER_ROUNDS {
        let n = primes_below(BYSTANDER_LIMIT);
        if n != BYSTANDER_PRIMES {
            println!("bystander: round {round} found {n} primes, not {BYSTANDER_PRIMES}");
            wrong += 1;
        }
        units += n;
        let _ = yield_now();
    }
    let _ = event(&WorkDone {
        work: "bystander",
        units,
    });
    i64::from(wrong != 0)
}

/// Sleeps `ms` on the timer VIRQ, then exits 0. If the timer cannot be
/// had, yields until the time has passed instead.
pub fn idle(ms: u64) -> i64 {
    let deadline = time_ns().saturating_add(ms.saturating_mul(1_000_000));
    match evtchn_bind_virq(virq::TIMER) {
        Ok(port) => {
            let mut lp = EventLoop::new();
            while time_ns() < deadline {
                // (Re-)arm: the timer fires once per deadline set.
                if let Err(e) = set_timer(deadline) {
                    println!("idle: set_timer failed: {}", e.name());
                    return 1;
                }
                match lp.next_port() {
                    Ok(p) if p == port => {}
                    Ok(p) => println!("idle: notification on unexpected port {p}"),
                    Err(e) => {
                        println!("idle: wait failed: {}", e.name());
                        return 1;
                    }
                }
            }
            let _ = evtchn_close(port);
        }
        Err(e) => {
            println!("idle: no timer VIRQ ({}); yielding instead", e.name());
            while time_ns() < deadline {
                let _ = yield_now();
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bystanders_answer() {
        assert_eq!(primes_below(BYSTANDER_LIMIT), BYSTANDER_PRIMES);
        assert_eq!(primes_below(10), 4);
        assert_eq!(primes_below(2), 0);
        assert_eq!(primes_below(3), 1);
    }

    #[test]
    fn the_spin_step_never_sticks() {
        let mut x = 1;
        for _ in 0..1000 {
            x = step(x);
            assert_ne!(x, 0);
        }
    }
}
