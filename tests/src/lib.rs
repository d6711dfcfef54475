//! The scenario harness: what `cargo xtask test` uses to boot a scenario
//! under QEMU and judge what it printed.
//!
//! A scenario is `tests/scenarios/NAME.toml`: a manifest plus a `[test]`
//! table. xtask checks the TOML (file, line and field in every error) and
//! hands this crate a plain [`Scenario`]; the harness then
//!
//! - corrupts the packed bundle if the scenario asks ([`corrupt`]),
//! - boots QEMU with a time limit and kills it (its whole process group) if
//!   it hangs ([`qemu`]),
//! - runs the test peer a virtio-net's `udp` netdev talks to, when the
//!   scenario has `[test.peer]` ([`peer`]),
//! - runs the TCP host peer that connects to a guest through a `user`
//!   netdev's `hostfwd`, when the scenario has `[test.tcp]` ([`tcppeer`]),
//! - makes the scenario's disk image and checks it after QEMU exits, when
//!   the scenario has `[test.disk]` ([`disk`]),
//! - checks the console ([`check`]): every `EV` line against the schema in
//!   `abi::ev`, the expected and forbidden events, the ratios and equalities
//!   between event fields, and QEMU's exit status.
//!
//! The checking is pure (a log and an outcome in, a verdict out) and tested
//! on fixtures; only [`qemu`] touches processes.

pub mod check;
pub mod corrupt;
pub mod disk;
pub mod peer;
pub mod qemu;
pub mod scenario;
pub mod tcppeer;

pub use check::{check_log, Verdict};
pub use peer::{PeerReport, PeerSpec};
pub use qemu::Outcome;
pub use scenario::{Corruption, Equal, Expect, ExpectedExit, Pattern, Ratio, Scenario, Selector};
