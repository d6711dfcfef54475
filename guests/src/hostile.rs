//! `role=hostile peer=NAME`: every hypercall with what it must refuse.
//!
//! [`table`] lists the cases: a call number, up to three arguments and the
//! result `abi/src/hypercall.rs` ("Which error, when") says the call must
//! return. [`run`] makes each call with `libdom::raw_hypercall`, reports
//! each mismatch as `hypercall_mismatch {case, expected, got}` and ends
//! with `hypercall_table {cases, expected_refusals, mismatches}`. Apart
//! from the table the domain makes no call that fails, so the hypervisor's
//! own count of refused calls (`hypercalls {refused}`) must equal
//! `expected_refusals`.
//!
//! The checks in "Which error, when" come in an order (number, flags,
//! lengths, pointers, event content, domains, ports); the cases marked
//! "order" give arguments that break two rules at once and expect the
//! earlier rule's error.

use alloc::vec::Vec;

use abi::domain::{StartInfo, STACK_SIZE, STACK_TOP, START_INFO_VA, USER_TOP};
use abi::ev::{HypercallMismatch, HypercallTable};
use abi::hypercall::{
    virq, Call, Error, CONSOLE_MAX, EVENT_MAX, NR_PORTS, PORT_WORDS, WAIT_NONBLOCK,
};
use libdom::{event, println, raw_hypercall};

/// What a case must return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Success with exactly this value.
    Ok(u64),
    /// Success with any value (a time, a port number).
    OkAny,
    /// This error.
    Err(Error),
}

impl Expected {
    pub fn matches(self, raw: i64) -> bool {
        match self {
            Expected::Ok(v) => raw >= 0 && raw as u64 == v,
            Expected::OkAny => raw >= 0,
            Expected::Err(e) => raw == e.to_raw(),
        }
    }

    /// The RAX value to print as "expected" (0 for any success).
    pub fn raw(self) -> i64 {
        match self {
            Expected::Ok(v) => v as i64,
            Expected::OkAny => 0,
            Expected::Err(e) => e.to_raw(),
        }
    }

    pub fn is_refusal(self) -> bool {
        matches!(self, Expected::Err(_))
    }
}

/// One argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    V(u64),
    /// The value the last case marked `save` returned (a port).
    Saved,
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    pub name: &'static str,
    pub nr: u64,
    pub args: [Arg; 3],
    pub expect: Expected,
    /// Keep the result for later cases' [`Arg::Saved`].
    pub save: bool,
}

/// What the table's arguments depend on in a running domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Env {
    /// This domain's id.
    pub me: u16,
    /// The peer's id (from the start info).
    pub peer: u16,
    /// An address in this domain's text (read-only, executable).
    pub text: u64,
    /// A writable buffer of [`PORT_WORDS`] words.
    pub buf: u64,
}

/// The hypervisor's direct map and image: mapped, but supervisor-only.
pub const KERNEL_DIRECT: u64 = 0xffff_8000_0000_0000;
pub const KERNEL_IMAGE: u64 = 0xffff_ffff_8010_0000;
/// Never mapped for a domain: the null guard and the gap below the stack.
pub const UNMAPPED_LOW: u64 = 0x1000;
pub const UNMAPPED_2M: u64 = 0x20_0000;
/// With a length of `u64::MAX`, a range from here wraps around.
pub const WRAP_PTR: u64 = 0x7fff_ffff_f000;

/// A console line to write.
pub const MSG: &[u8] = b"hostile: a valid console_write\n";
/// The one event the table prints.
pub const EV_VALID: &[u8] = br#"{"ev":"work_done","work":"hostile-valid","units":1}"#;
const EV_RING0_FAULT: &[u8] = br#"{"ev":"domain_fault","domain":"idle","vector":14,"vector_name":"page-fault","error_code":"0x4","rip":"0x400000","addr":"0x0"}"#;
const EV_RING0_SHUTDOWN: &[u8] = br#"{"ev":"shutdown","status":0,"reason":"forged by hostile"}"#;
const EV_RING0_EXIT: &[u8] =
    br#"{"ev":"domain_exit","domain":"idle","status":0,"reason":"exit","expected":true}"#;
const EV_MALFORMED: &[u8] = br#"{"ev":"work_done","work":"x","units":"#;
const EV_NOT_OBJECT: &[u8] = b"[1,2,3]";
const EV_UNKNOWN: &[u8] = br#"{"ev":"no_such_event"}"#;
const EV_NO_EV: &[u8] = br#"{"work":"x","units":7}"#;
const EV_MISSING: &[u8] = br#"{"ev":"work_done","work":"x"}"#;
const EV_WRONG_KIND: &[u8] = br#"{"ev":"work_done","work":"x","units":"7"}"#;
const EV_EXTRA: &[u8] = br#"{"ev":"work_done","work":"x","units":7,"extra":1}"#;
const EV_FROM: &[u8] = br#"{"ev":"work_done","work":"x","units":7,"from":"idle"}"#;
const EV_TWO_LINES: &[u8] =
    b"{\"ev\":\"work_done\",\"work\":\"x\",\"units\":7}\n{\"ev\":\"work_done\",\"work\":\"y\",\"units\":8}";
const EV_TRAILING: &[u8] = br#"{"ev":"work_done","work":"x","units":7} junk"#;

fn p(s: &[u8]) -> u64 {
    s.as_ptr() as u64
}

fn l(s: &[u8]) -> u64 {
    s.len() as u64
}

/// The whole table for `env`.
pub fn table(env: &Env) -> Vec<Case> {
    use Arg::{Saved, V};
    use Error::*;
    use Expected::{Err as E, Ok as K, OkAny};
    let cw = Call::ConsoleWrite as u64;
    let ev = Call::Event as u64;
    let wait = Call::Wait as u64;
    let send = Call::EvtchnSend as u64;
    let close = Call::EvtchnClose as u64;
    let bind = Call::EvtchnBindInterdomain as u64;
    let alloc = Call::EvtchnAllocUnbound as u64;
    let virq_ = Call::EvtchnBindVirq as u64;
    let cfg_r = Call::DevConfigRead as u64;
    let cfg_w = Call::DevConfigWrite as u64;
    let irq = Call::DevIrqBind as u64;
    let dmap = Call::DmaMap as u64;
    let dunmap = Call::DmaUnmap as u64;
    let dbatch = Call::DmaBatch as u64;
    let nb = WAIT_NONBLOCK;
    let words = PORT_WORDS as u64;
    let nr_ports = NR_PORTS as u64;
    let me = u64::from(env.me);
    let peer = u64::from(env.peer);
    // Mapped, then the unmapped page at STACK_TOP.
    let edge = STACK_TOP - 8;
    // The unmapped guard page below the stack, then the stack.
    let guard = STACK_TOP - STACK_SIZE - 8;
    let never_allocated = 77;
    let c = |name, nr, a: [u64; 3], expect| Case {
        name,
        nr,
        args: a.map(V),
        expect,
        save: false,
    };
    let mut t = alloc::vec![
        // Unknown numbers (the upper bits count: no truncation to 32 bits).
        c("unknown-0", 0, [0; 3], E(UnknownCall)),
        c("unknown-23", 23, [0; 3], E(UnknownCall)),
        c("unknown-999", 999, [0; 3], E(UnknownCall)),
        c("unknown-max", u64::MAX, [0; 3], E(UnknownCall)),
        c(
            "unknown-high-bits",
            (1 << 32) | cw,
            [p(MSG), l(MSG), 0],
            E(UnknownCall)
        ),
        // console_write: pointers, lengths.
        c(
            "console-kernel-direct-map",
            cw,
            [KERNEL_DIRECT, 16, 0],
            E(BadAddress)
        ),
        c(
            "console-kernel-image",
            cw,
            [KERNEL_IMAGE, 16, 0],
            E(BadAddress)
        ),
        c(
            "console-null-page",
            cw,
            [UNMAPPED_LOW, 16, 0],
            E(BadAddress)
        ),
        c(
            "console-unmapped-2m",
            cw,
            [UNMAPPED_2M, 16, 0],
            E(BadAddress)
        ),
        c(
            "console-order-length-before-pointer",
            cw,
            [WRAP_PTR, u64::MAX, 0],
            E(BadLength)
        ),
        c("console-wraps", cw, [u64::MAX - 7, 16, 0], E(BadAddress)),
        c(
            "console-crosses-user-top",
            cw,
            [USER_TOP - 8, 16, 0],
            E(BadAddress)
        ),
        c(
            "console-runs-into-unmapped",
            cw,
            [edge, 16, 0],
            E(BadAddress)
        ),
        c("console-starts-in-guard", cw, [guard, 16, 0], E(BadAddress)),
        c(
            "console-too-long",
            cw,
            [p(MSG), CONSOLE_MAX + 1, 0],
            E(BadLength)
        ),
        c(
            "console-empty-kernel-pointer",
            cw,
            [KERNEL_DIRECT, 0, 0],
            K(0)
        ),
        c("console-valid", cw, [p(MSG), l(MSG), 0], K(l(MSG))),
        // event: pointers, lengths, content.
        c(
            "event-kernel-direct-map",
            ev,
            [KERNEL_DIRECT, 16, 0],
            E(BadAddress)
        ),
        c(
            "event-kernel-image",
            ev,
            [KERNEL_IMAGE, 16, 0],
            E(BadAddress)
        ),
        c("event-null-page", ev, [UNMAPPED_LOW, 16, 0], E(BadAddress)),
        c("event-unmapped-2m", ev, [UNMAPPED_2M, 16, 0], E(BadAddress)),
        c(
            "event-order-length-before-pointer",
            ev,
            [WRAP_PTR, u64::MAX, 0],
            E(BadLength)
        ),
        c("event-wraps", ev, [u64::MAX - 7, 16, 0], E(BadAddress)),
        c(
            "event-crosses-user-top",
            ev,
            [USER_TOP - 8, 16, 0],
            E(BadAddress)
        ),
        c("event-runs-into-unmapped", ev, [edge, 16, 0], E(BadAddress)),
        c("event-empty", ev, [p(EV_VALID), 0, 0], E(BadLength)),
        c(
            "event-too-long",
            ev,
            [p(EV_VALID), EVENT_MAX + 1, 0],
            E(BadLength)
        ),
        c(
            "event-ring0-domain-fault",
            ev,
            [p(EV_RING0_FAULT), l(EV_RING0_FAULT), 0],
            E(Denied)
        ),
        c(
            "event-ring0-shutdown",
            ev,
            [p(EV_RING0_SHUTDOWN), l(EV_RING0_SHUTDOWN), 0],
            E(Denied)
        ),
        c(
            "event-ring0-domain-exit",
            ev,
            [p(EV_RING0_EXIT), l(EV_RING0_EXIT), 0],
            E(Denied)
        ),
        c(
            "event-malformed-json",
            ev,
            [p(EV_MALFORMED), l(EV_MALFORMED), 0],
            E(Invalid)
        ),
        c(
            "event-not-an-object",
            ev,
            [p(EV_NOT_OBJECT), l(EV_NOT_OBJECT), 0],
            E(Invalid)
        ),
        c(
            "event-unknown-name",
            ev,
            [p(EV_UNKNOWN), l(EV_UNKNOWN), 0],
            E(Invalid)
        ),
        c("event-no-ev", ev, [p(EV_NO_EV), l(EV_NO_EV), 0], E(Invalid)),
        c(
            "event-missing-field",
            ev,
            [p(EV_MISSING), l(EV_MISSING), 0],
            E(Invalid)
        ),
        c(
            "event-wrong-kind",
            ev,
            [p(EV_WRONG_KIND), l(EV_WRONG_KIND), 0],
            E(Invalid)
        ),
        c(
            "event-unknown-field",
            ev,
            [p(EV_EXTRA), l(EV_EXTRA), 0],
            E(Invalid)
        ),
        c(
            "event-forged-from",
            ev,
            [p(EV_FROM), l(EV_FROM), 0],
            E(Invalid)
        ),
        c(
            "event-two-lines",
            ev,
            [p(EV_TWO_LINES), l(EV_TWO_LINES), 0],
            E(Invalid)
        ),
        c(
            "event-trailing-bytes",
            ev,
            [p(EV_TRAILING), l(EV_TRAILING), 0],
            E(Invalid)
        ),
        c("event-valid", ev, [p(EV_VALID), l(EV_VALID), 0], K(0)),
        // wait: flags, lengths, output pointers.
        c(
            "wait-kernel-direct-map",
            wait,
            [KERNEL_DIRECT, words, nb],
            E(BadAddress)
        ),
        c(
            "wait-kernel-image",
            wait,
            [KERNEL_IMAGE, words, nb],
            E(BadAddress)
        ),
        c(
            "wait-null-page",
            wait,
            [UNMAPPED_LOW, words, nb],
            E(BadAddress)
        ),
        c(
            "wait-unmapped-2m",
            wait,
            [UNMAPPED_2M, words, nb],
            E(BadAddress)
        ),
        c(
            "wait-words-wrap",
            wait,
            [WRAP_PTR, u64::MAX, nb],
            E(BadAddress)
        ),
        c(
            "wait-words-times-8-overflows",
            wait,
            [env.buf, 1 << 61, nb],
            E(BadAddress)
        ),
        c(
            "wait-crosses-user-top",
            wait,
            [USER_TOP - 16, words, nb],
            E(BadAddress)
        ),
        c(
            "wait-runs-into-unmapped",
            wait,
            [STACK_TOP - 16, words, nb],
            E(BadAddress)
        ),
        c(
            "wait-into-start-info",
            wait,
            [START_INFO_VA, words, nb],
            E(BadAddress)
        ),
        c(
            "wait-into-text",
            wait,
            [env.text & !0xfff, words, nb],
            E(BadAddress)
        ),
        c(
            "wait-into-rodata",
            wait,
            [p(EV_VALID), words, nb],
            E(BadAddress)
        ),
        c(
            "wait-too-few-words",
            wait,
            [env.buf, words - 1, nb],
            E(BadLength)
        ),
        c("wait-zero-words", wait, [env.buf, 0, nb], E(BadLength)),
        c("wait-unknown-flag", wait, [env.buf, words, 2], E(Invalid)),
        c(
            "wait-all-flags",
            wait,
            [env.buf, words, u64::MAX],
            E(Invalid)
        ),
        c(
            "wait-order-flags-first",
            wait,
            [KERNEL_DIRECT, 1, 2],
            E(Invalid)
        ),
        c(
            "wait-order-length-before-pointer",
            wait,
            [KERNEL_DIRECT, 1, nb],
            E(BadLength)
        ),
        c(
            "wait-nonblock-nothing-pending",
            wait,
            [env.buf, words, nb],
            K(0)
        ),
        // Grant calls: the operation array is checked as a whole, its
        // count first (abi/src/hypercall.rs); each operation's own status is
        // `abi::grant`'s and not a refusal of the call.
        c(
            "gnt-table-no-pages",
            Call::GrantTableSet as u64,
            [env.buf & !0xfff, 0, 0],
            E(BadLength)
        ),
        c(
            "gnt-table-too-many",
            Call::GrantTableSet as u64,
            [env.buf & !0xfff, 5, 0],
            E(BadLength)
        ),
        c(
            "gnt-table-kernel",
            Call::GrantTableSet as u64,
            [KERNEL_IMAGE, 1, 0],
            E(BadAddress)
        ),
        c(
            "gnt-table-text",
            Call::GrantTableSet as u64,
            [env.text & !0xfff, 1, 0],
            E(BadAddress)
        ),
        c(
            "gnt-map-count-0",
            Call::GrantMap as u64,
            [env.buf, 0, 0],
            E(BadLength)
        ),
        c(
            "gnt-map-count-65",
            Call::GrantMap as u64,
            [env.buf, 65, 0],
            E(BadLength)
        ),
        c(
            "gnt-map-kernel",
            Call::GrantMap as u64,
            [KERNEL_IMAGE, 1, 0],
            E(BadAddress)
        ),
        c(
            "gnt-map-text",
            Call::GrantMap as u64,
            [env.text, 1, 0],
            E(BadAddress)
        ),
        c(
            "gnt-unmap-kernel",
            Call::GrantUnmap as u64,
            [KERNEL_IMAGE, 1, 0],
            E(BadAddress)
        ),
        c(
            "gnt-unmap-count-max",
            Call::GrantUnmap as u64,
            [env.buf, u64::MAX, 0],
            E(BadLength)
        ),
        c(
            "gnt-copy-unmapped",
            Call::GrantCopy as u64,
            [0x1000, 1, 0],
            E(BadAddress)
        ),
        c(
            "gnt-copy-count-0",
            Call::GrantCopy as u64,
            [env.buf, 0, 0],
            E(BadLength)
        ),
        // time, yield, set_timer.
        c("time", Call::Time as u64, [0; 3], OkAny),
        c("yield", Call::Yield as u64, [0; 3], K(0)),
        c("set-timer-cancel", Call::SetTimer as u64, [0; 3], K(0)),
        // Ports the caller does not have.
        c("send-port-0", send, [0; 3], E(BadPort)),
        c("send-port-nr-ports", send, [nr_ports, 0, 0], E(BadPort)),
        c("send-port-max", send, [u64::MAX, 0, 0], E(BadPort)),
        c(
            "send-port-never-allocated",
            send,
            [never_allocated, 0, 0],
            E(BadPort)
        ),
        c("close-port-0", close, [0; 3], E(BadPort)),
        c("close-port-nr-ports", close, [nr_ports, 0, 0], E(BadPort)),
        c(
            "close-port-never-allocated",
            close,
            [never_allocated, 0, 0],
            E(BadPort)
        ),
        // Domains that do not exist or may not be named.
        c("bind-no-such-domain", bind, [9999, 1, 0], E(BadDomain)),
        c("bind-domain-0", bind, [0, 1, 0], E(BadDomain)),
        c("bind-self", bind, [me, 1, 0], E(BadDomain)),
        c(
            "bind-order-domain-before-port",
            bind,
            [9999, 0, 0],
            E(BadDomain)
        ),
        c("bind-port-not-offered", bind, [peer, 1, 0], E(PortState)),
        c("alloc-no-such-domain", alloc, [9999, 0, 0], E(BadDomain)),
        c("alloc-self", alloc, [me, 0, 0], E(BadDomain)),
        c(
            "alloc-domid-high-bits",
            alloc,
            [(1 << 16) | peer, 0, 0],
            E(BadDomain)
        ),
        // VIRQs that do not exist.
        c("bind-virq-99", virq_, [99, 0, 0], E(Invalid)),
        c("bind-virq-count", virq_, [virq::COUNT, 0, 0], E(Invalid)),
        c("bind-virq-max", virq_, [u64::MAX, 0, 0], E(Invalid)),
        // Device calls from a domain the manifest gives no device, in the
        // static DMA mode.
        c("config-read-no-device", cfg_r, [0, 0, 4], E(BadDevice)),
        c("config-write-no-device", cfg_w, [0, 4, 2], E(BadDevice)),
        c("irq-bind-no-device", irq, [0, 0, 0], E(BadDevice)),
        c(
            "config-read-device-max",
            cfg_r,
            [u64::MAX, 0, 4],
            E(BadDevice)
        ),
        c(
            "dma-map-kernel-half",
            dmap,
            [USER_TOP, 4096, 0],
            E(BadAddress)
        ),
        c(
            "dma-unmap-static",
            dunmap,
            [START_INFO_VA, 4096, 0],
            E(Invalid)
        ),
        // dma_batch: the count, then the array, then the devices.
        c("dma-batch-none", dbatch, [p(MSG), 0, 0], E(BadLength)),
        c("dma-batch-too-many", dbatch, [p(MSG), 65, 0], E(BadLength)),
        c(
            "dma-batch-kernel-half",
            dbatch,
            [KERNEL_DIRECT, 1, 0],
            E(BadAddress)
        ),
        c(
            "dma-batch-runs-into-unmapped",
            dbatch,
            [STACK_TOP - 8, 1, 0],
            E(BadAddress)
        ),
        c("dma-batch-no-device", dbatch, [p(MSG), 1, 0], E(BadDevice)),
    ];
    // A port offered to the peer: it cannot be sent on until bound; closed,
    // it is gone.
    t.push(Case {
        save: true,
        ..c("alloc-unbound-to-peer", alloc, [peer, 0, 0], OkAny)
    });
    t.push(Case {
        args: [Saved, V(0), V(0)],
        ..c("send-on-unbound", send, [0; 3], E(PortState))
    });
    t.push(Case {
        args: [Saved, V(0), V(0)],
        ..c("close-unbound", close, [0; 3], K(0))
    });
    t.push(Case {
        args: [Saved, V(0), V(0)],
        ..c("close-again", close, [0; 3], E(BadPort))
    });
    // A VIRQ port cannot be sent on.
    t.push(Case {
        save: true,
        ..c("bind-virq-timer", virq_, [virq::TIMER, 0, 0], OkAny)
    });
    t.push(Case {
        args: [Saved, V(0), V(0)],
        ..c("send-on-virq", send, [0; 3], E(PortState))
    });
    t.push(Case {
        args: [Saved, V(0), V(0)],
        ..c("close-virq", close, [0; 3], K(0))
    });
    t
}

/// Runs the table against the hypervisor; 0 if every case came out as
/// expected.
pub fn run(si: &StartInfo<'_>, peer_name: &str) -> i64 {
    let Some(peer) = si.peer(peer_name) else {
        println!("hostile: no peer called \"{peer_name}\" in my start info");
        return 1;
    };
    let mut buf = [0u64; PORT_WORDS];
    let env = Env {
        me: si.domid,
        peer: peer.domid,
        text: run as fn(&StartInfo<'_>, &str) -> i64 as usize as u64,
        buf: core::hint::black_box(buf.as_mut_ptr()) as u64,
    };
    let cases = table(&env);
    let mut saved = 0u64;
    let mut mismatches = 0u64;
    for case in &cases {
        let a = case.args.map(|a| match a {
            Arg::V(v) => v,
            Arg::Saved => saved,
        });
        // SAFETY: the only pointer the hypervisor may write through is
        // `wait`'s output; every case that could succeed points it at
        // `buf`, which is ours and PORT_WORDS words long; the others must
        // be refused before anything is written.
        let got = unsafe { raw_hypercall(case.nr, a[0], a[1], a[2], 0, 0, 0) };
        if case.save && got >= 0 {
            saved = got as u64;
        }
        if !case.expect.matches(got) {
            mismatches += 1;
            println!(
                "hostile: {}: expected {}, got {got}",
                case.name,
                case.expect.raw()
            );
            let _ = event(&HypercallMismatch {
                case: case.name,
                expected: case.expect.raw(),
                got,
            });
        }
    }
    core::hint::black_box(&mut buf);
    let _ = event(&HypercallTable {
        cases: cases.len() as u64,
        expected_refusals: cases.iter().filter(|c| c.expect.is_refusal()).count() as u64,
        mismatches,
    });
    i64::from(mismatches != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::ev::{schema, ALL};
    use std::string::String;

    fn env() -> Env {
        Env {
            me: 1,
            peer: 2,
            text: 0x40_1234,
            buf: STACK_TOP - 0x100,
        }
    }

    #[test]
    fn names_are_unique_and_every_call_but_exit_is_tried() {
        let t = table(&env());
        for (i, c) in t.iter().enumerate() {
            assert!(
                t[i + 1..].iter().all(|d| d.name != c.name),
                "{} twice",
                c.name
            );
            assert!(c.name.len() <= 48, "{}", c.name);
        }
        for call in Call::ALL {
            let tried = t.iter().any(|c| c.nr == call as u64);
            assert_eq!(tried, call != Call::Exit, "{}", call.name());
        }
        // Each error a caller can provoke alone is provoked.
        for e in Error::ALL {
            let provoked = t.iter().any(|c| c.expect == Expected::Err(e));
            assert_eq!(provoked, e != Error::NoSpace, "{}", e.name());
        }
        assert_eq!(t.len(), 110);
        assert_eq!(t.iter().filter(|c| c.expect.is_refusal()).count(), 99);
    }

    #[test]
    fn saved_ports_follow_a_saving_case() {
        let t = table(&env());
        let mut have = false;
        for c in &t {
            if c.args.contains(&Arg::Saved) {
                assert!(have, "{} uses a port no case saved", c.name);
            }
            have |= c.save;
        }
    }

    #[test]
    fn the_event_payloads_are_what_their_names_say() {
        let fields = |json: &[u8]| -> Option<String> {
            let s = core::str::from_utf8(json).ok()?;
            let rest = s.strip_prefix("{\"ev\":\"")?;
            Some(rest[..rest.find('"')?].into())
        };
        // The ring-0 ones are complete events of the schema that only ring 0
        // may print, so Denied is the only rule they break.
        for (json, name) in [
            (EV_RING0_FAULT, "domain_fault"),
            (EV_RING0_SHUTDOWN, "shutdown"),
            (EV_RING0_EXIT, "domain_exit"),
        ] {
            assert_eq!(fields(json).as_deref(), Some(name));
            let s = schema(name).unwrap();
            assert!(s.ring0);
            let text = core::str::from_utf8(json).unwrap();
            for f in s.fields {
                assert!(
                    text.contains(&std::format!("\"{}\":", f.name)),
                    "{name}.{}",
                    f.name
                );
            }
        }
        // The valid one is a domain event whose fields are all there.
        let s = schema("work_done").unwrap();
        assert!(!s.ring0);
        let text = core::str::from_utf8(EV_VALID).unwrap();
        assert!(s
            .fields
            .iter()
            .all(|f| text.contains(&std::format!("\"{}\":", f.name))));
        assert!(ALL.iter().all(|s| s.name != "no_such_event"));
        assert!(MSG.len() as u64 <= CONSOLE_MAX && EV_VALID.len() as u64 <= EVENT_MAX);
    }

    #[test]
    fn matching() {
        assert!(Expected::Ok(5).matches(5));
        assert!(!Expected::Ok(5).matches(4));
        assert!(!Expected::Ok(0).matches(Error::BadPort.to_raw()));
        assert!(Expected::OkAny.matches(0) && Expected::OkAny.matches(123));
        assert!(!Expected::OkAny.matches(-1));
        assert!(Expected::Err(Error::Denied).matches(-8));
        assert!(!Expected::Err(Error::Denied).matches(-9));
        assert!(!Expected::Err(Error::Denied).matches(8));
        assert_eq!(Expected::Err(Error::BadAddress).raw(), -2);
        assert_eq!(Expected::OkAny.raw(), 0);
    }
}
