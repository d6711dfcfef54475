//! airlock's guest domains. `testdom` is one image that plays every role
//! the issue-3 scenarios need; the manifest's `args` choose it:
//!
//! | args | what the domain does |
//! |---|---|
//! | `role=ping count=N [channel=pp]` | sends N notifications over its port of the channel, waiting for each reply |
//! | `role=pong count=N [channel=pp]` | answers N notifications |
//! | `role=idle [ms=1000]` | sleeps on the timer VIRQ, then exits 0 (a real peer for `hostile`) |
//! | `role=hostile peer=NAME` | runs the hostile hypercall table ([`hostile`]) |
//! | `work=spin until_ms=T` | spins until T ms after the hypervisor's entry |
//! | `work=bystander` | a fixed amount of checked CPU and heap work, with yields |
//! | `attack=hvmem` / `attack=peer target=NAME` / `attack=code` / `attack=stack` | one isolation attack ([`attack`]) that must fault |
//! | `role=dma-attack [hv=ADDR] [peer=NAME] [unmapped=ADDR] [stale=1]` | owns an `edu`: a DMA control, then device writes at each target ([`dma`]) |
//! | `role=msi-spoof irte=N vector=V hv_vector=H` | owns an `edu`: tries to raise interrupts it does not own ([`msi`]) |
//! | `role=irq-victim [ms=1000]` | owns a device, binds its interrupt, counts the notifications it gets ([`msi`]) |
//! | `role=blkfront vbd=xvda [write=S..E] [verify=S..E] [pattern=A] [outside=1] [seq_mb=N] [bs=64k] [depth=4] [rand=N] [expect=denied]` | a disk workload over blkfront ([`blkwork`]) |
//! | `role=hostile-blkfront vbd=xvda [other=NAME]` | breaks blkif's rules on its own ring, case by case ([`blkhostile`]) |
//! | `role=tcp-send to=IP port=P bytes=16M [pattern=A] [recv=N] [gw=IP]` | connects over netfront and smoltcp, sends a checked stream ([`tcp`]) |
//! | `role=tcp-recv port=P bytes=16M [pattern=A] [send=N] [gw=IP]` | listens, receives and checks a stream ([`tcp`]) |
//! | `role=tcp-serve port=P [recv=N recv_pattern=H] [send=N send_pattern=G]` | listens, moves a stream each way ([`tcp`]) |
//! | `role=net-spoof victim=IP [count=16]` | sends frames as the victim (its MAC, its IPv4), then honest control frames ([`netspoof`]) |
//! | `role=net-listen [ms=20000]` | counts the marked frames that reach it ([`netspoof`]) |
//! | `role=hostile-netfront [cases=a,b]` | breaks netif's rules on its own TX ring, case by case ([`nethostile`]) |
//!
//! Each reports its result as an event (`pingpong`, `work_done`,
//! `attack`, `hypercall_table`, `data_check`, `throughput`) and exits 0 on
//! success, 1 on failure;
//! an attacker that survives its attack exits 1. Bad args print why and
//! exit 2.
//!
//! The choice of role, the hostile table and the bystander's work are pure
//! and host-tested; what touches hypercalls runs only in a domain.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod attack;
pub mod blkhostile;
pub mod blkwork;
pub mod dma;
pub mod hostile;
pub mod msi;
pub mod net;
pub mod nethostile;
pub mod netspoof;
pub mod pingpong;
pub mod tcp;
pub mod work;

use alloc::format;
use alloc::string::String;

use libdom::args::ArgError;
use libdom::{println, Args, StartInfo};

/// Exit status for args the domain cannot use.
pub const EXIT_BAD_ARGS: i64 = 2;

/// Which attack an attacker makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack<'a> {
    /// Read the hypervisor's image.
    HvMem,
    /// Read domain `target`'s memory at its physical address, then at the
    /// hypervisor's direct-map alias of it.
    Peer { target: &'a str },
    /// Write its own text.
    Code,
    /// Execute its own stack.
    Stack,
}

/// What a `testdom` does, from its args.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role<'a> {
    Ping {
        count: u64,
        channel: &'a str,
    },
    Pong {
        count: u64,
        channel: &'a str,
    },
    Idle {
        ms: u64,
    },
    Hostile {
        peer: &'a str,
    },
    Spin {
        until_ms: u64,
    },
    Bystander,
    Attack(Attack<'a>),
    DmaAttack(dma::Targets<'a>),
    MsiSpoof {
        irte: u16,
        vector: u8,
        hv_vector: u8,
    },
    IrqVictim {
        ms: u64,
    },
    Blkfront(blkwork::Plan<'a>),
    HostileBlkfront {
        vbd: &'a str,
        other: Option<&'a str>,
    },
    Tcp(tcp::Plan<'a>),
    NetSpoof {
        victim: [u8; 4],
        count: u64,
        vif: Option<&'a str>,
    },
    NetListen {
        ms: u64,
        vif: Option<&'a str>,
    },
    HostileNetfront {
        cases: alloc::vec::Vec<&'static str>,
        vif: Option<&'a str>,
    },
}

fn arg_err(e: ArgError<'_>) -> String {
    format!("{e}")
}

/// Reads the role from `args`; the error says what is wrong.
pub fn role(args: &str) -> Result<Role<'_>, String> {
    let a = Args::parse(args).map_err(arg_err)?;
    let given: [Option<&str>; 3] = [a.get("role"), a.get("work"), a.get("attack")];
    if given.iter().flatten().count() != 1 {
        return Err(format!(
            "args \"{args}\": give exactly one of role=, work=, attack="
        ));
    }
    let r = match given {
        [Some("ping"), _, _] | [Some("pong"), _, _] => {
            a.only(&["role", "count", "channel"]).map_err(arg_err)?;
            let count = a.u64("count").map_err(arg_err)?;
            let channel = a.get("channel").unwrap_or(pingpong::CHANNEL);
            if given[0] == Some("ping") {
                Role::Ping { count, channel }
            } else {
                Role::Pong { count, channel }
            }
        }
        [Some("idle"), _, _] => {
            a.only(&["role", "ms"]).map_err(arg_err)?;
            Role::Idle {
                ms: a.u64_or("ms", 1000).map_err(arg_err)?,
            }
        }
        [Some("dma-attack"), _, _] => {
            a.only(&["role", "hv", "peer", "unmapped", "stale"])
                .map_err(arg_err)?;
            let num = |key: &str| -> Result<Option<u64>, String> {
                match a.get(key) {
                    None => Ok(None),
                    Some(v) => dma::parse_num(v)
                        .map(Some)
                        .ok_or_else(|| format!("argument {key}=\"{v}\" is not a number")),
                }
            };
            Role::DmaAttack(dma::Targets {
                hv: num("hv")?,
                peer: a.get("peer"),
                unmapped: num("unmapped")?,
                stale: a.u64_or("stale", 0).map_err(arg_err)? != 0,
            })
        }
        [Some("msi-spoof"), _, _] => {
            a.only(&["role", "irte", "vector", "hv_vector"])
                .map_err(arg_err)?;
            let num = |key: &str, max: u64| -> Result<u64, String> {
                let v = a.require(key).map_err(arg_err)?;
                dma::parse_num(v)
                    .filter(|n| *n <= max)
                    .ok_or_else(|| format!("argument {key}=\"{v}\" is not a number up to {max:#x}"))
            };
            Role::MsiSpoof {
                irte: num("irte", 0xffff)? as u16,
                vector: num("vector", 0xff)? as u8,
                hv_vector: num("hv_vector", 0xff)? as u8,
            }
        }
        [Some("irq-victim"), _, _] => {
            a.only(&["role", "ms"]).map_err(arg_err)?;
            Role::IrqVictim {
                ms: a.u64_or("ms", 1000).map_err(arg_err)?,
            }
        }
        [Some("blkfront"), _, _] => Role::Blkfront(blkwork::Plan::parse(args)?),
        [Some("hostile-blkfront"), _, _] => {
            a.only(&["role", "vbd", "other"]).map_err(arg_err)?;
            Role::HostileBlkfront {
                vbd: a.get("vbd").unwrap_or("xvda"),
                other: a.get("other"),
            }
        }
        [Some("tcp-send" | "tcp-recv" | "tcp-serve"), _, _] => Role::Tcp(tcp::Plan::parse(args)?),
        [Some("net-spoof"), _, _] => {
            a.only(&["role", "victim", "count", "vif"])
                .map_err(arg_err)?;
            let v = a.require("victim").map_err(arg_err)?;
            Role::NetSpoof {
                victim: net::parse_ipv4(v)
                    .ok_or_else(|| format!("argument victim=\"{v}\" is not an IPv4 address"))?,
                count: a.u64_or("count", 16).map_err(arg_err)?,
                vif: a.get("vif"),
            }
        }
        [Some("net-listen"), _, _] => {
            a.only(&["role", "ms", "vif"]).map_err(arg_err)?;
            Role::NetListen {
                ms: a.u64_or("ms", 20_000).map_err(arg_err)?,
                vif: a.get("vif"),
            }
        }
        [Some("hostile-netfront"), _, _] => {
            a.only(&["role", "cases", "vif"]).map_err(arg_err)?;
            Role::HostileNetfront {
                cases: nethostile::pick(a.get("cases"))?,
                vif: a.get("vif"),
            }
        }
        [Some("hostile"), _, _] => {
            a.only(&["role", "peer"]).map_err(arg_err)?;
            Role::Hostile {
                peer: a.require("peer").map_err(arg_err)?,
            }
        }
        [_, Some("spin"), _] => {
            a.only(&["work", "until_ms"]).map_err(arg_err)?;
            Role::Spin {
                until_ms: a.u64("until_ms").map_err(arg_err)?,
            }
        }
        [_, Some("bystander"), _] => {
            a.only(&["work"]).map_err(arg_err)?;
            Role::Bystander
        }
        [_, _, Some("peer")] => {
            a.only(&["attack", "target"]).map_err(arg_err)?;
            Role::Attack(Attack::Peer {
                target: a.require("target").map_err(arg_err)?,
            })
        }
        [_, _, Some(case @ ("hvmem" | "code" | "stack"))] => {
            a.only(&["attack"]).map_err(arg_err)?;
            Role::Attack(match case {
                "hvmem" => Attack::HvMem,
                "code" => Attack::Code,
                _ => Attack::Stack,
            })
        }
        [Some(r), _, _] => {
            return Err(format!(
            "unknown role \"{r}\" (ping, pong, idle, hostile, dma-attack, msi-spoof, irq-victim, blkfront, hostile-blkfront, tcp-send, tcp-recv, tcp-serve, net-spoof, net-listen, hostile-netfront)"
        ))
        }
        [_, Some(w), _] => return Err(format!("unknown work \"{w}\" (spin, bystander)")),
        [_, _, Some(x)] => {
            return Err(format!("unknown attack \"{x}\" (hvmem, peer, code, stack)"))
        }
        [None, None, None] => unreachable!("exactly one was given"),
    };
    Ok(r)
}

/// `testdom`'s main: runs the role its args name.
pub fn testdom(si: &StartInfo<'_>) -> i64 {
    let role = match role(si.args) {
        Ok(r) => r,
        Err(e) => {
            println!("testdom: {e}");
            return EXIT_BAD_ARGS;
        }
    };
    match role {
        Role::Ping { count, channel } => pingpong::run(si, true, count, channel),
        Role::Pong { count, channel } => pingpong::run(si, false, count, channel),
        Role::Idle { ms } => work::idle(ms),
        Role::Hostile { peer } => hostile::run(si, peer),
        Role::Spin { until_ms } => work::spin(until_ms),
        Role::Bystander => work::bystander(),
        Role::Attack(a) => attack::run(si, a),
        Role::DmaAttack(t) => dma::run(si, t),
        Role::MsiSpoof {
            irte,
            vector,
            hv_vector,
        } => msi::spoof(
            si,
            msi::Targets {
                irte,
                vector,
                hv_vector,
            },
        ),
        Role::IrqVictim { ms } => msi::victim(si, ms),
        Role::Blkfront(plan) => blkwork::run(si, &plan),
        Role::HostileBlkfront { vbd, other } => blkhostile::run(si, vbd, other),
        Role::Tcp(plan) => tcp::run(si, &plan),
        Role::NetSpoof { victim, count, vif } => netspoof::spoof(si, victim, count, vif),
        Role::NetListen { ms, vif } => netspoof::listen(si, ms, vif),
        Role::HostileNetfront { cases, vif } => nethostile::run(si, &cases, vif),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_args() {
        assert_eq!(
            role("role=ping count=10000"),
            Ok(Role::Ping {
                count: 10000,
                channel: "pp"
            })
        );
        assert_eq!(
            role("count=3 role=pong channel=x"),
            Ok(Role::Pong {
                count: 3,
                channel: "x"
            })
        );
        assert_eq!(role("role=idle"), Ok(Role::Idle { ms: 1000 }));
        assert_eq!(role("role=idle ms=5"), Ok(Role::Idle { ms: 5 }));
        assert_eq!(
            role("role=hostile peer=idle"),
            Ok(Role::Hostile { peer: "idle" })
        );
        assert_eq!(
            role("work=spin until_ms=1500"),
            Ok(Role::Spin { until_ms: 1500 })
        );
        assert_eq!(role("work=bystander"), Ok(Role::Bystander));
        assert_eq!(
            role("role=dma-attack hv=0x100000 peer=bystander unmapped=0x8000000"),
            Ok(Role::DmaAttack(dma::Targets {
                hv: Some(0x10_0000),
                peer: Some("bystander"),
                unmapped: Some(0x800_0000),
                stale: false
            }))
        );
        assert_eq!(
            role("role=dma-attack stale=1"),
            Ok(Role::DmaAttack(dma::Targets {
                stale: true,
                ..Default::default()
            }))
        );
        assert!(matches!(
            role("role=blkfront vbd=xvdb write=0..8"),
            Ok(Role::Blkfront(blkwork::Plan { vbd: "xvdb", .. }))
        ));
        assert_eq!(
            role("role=hostile-blkfront other=honest"),
            Ok(Role::HostileBlkfront {
                vbd: "xvda",
                other: Some("honest")
            })
        );
        assert!(matches!(
            role("role=tcp-recv port=5001 bytes=16M"),
            Ok(Role::Tcp(tcp::Plan {
                stream: driver_domains::tcp_stream::Plan {
                    mode: tcp::Mode::Listen { port: 5001 },
                    ..
                },
                vif: None
            }))
        ));
        assert_eq!(
            role("role=net-spoof victim=10.0.0.2"),
            Ok(Role::NetSpoof {
                victim: [10, 0, 0, 2],
                count: 16,
                vif: None
            })
        );
        assert_eq!(
            role("role=net-listen ms=5"),
            Ok(Role::NetListen { ms: 5, vif: None })
        );
        assert_eq!(
            role("role=hostile-netfront cases=ring-jump,control"),
            Ok(Role::HostileNetfront {
                cases: alloc::vec!["control", "ring-jump"],
                vif: None
            })
        );
        assert_eq!(role("attack=hvmem"), Ok(Role::Attack(Attack::HvMem)));
        assert_eq!(role("attack=code"), Ok(Role::Attack(Attack::Code)));
        assert_eq!(role("attack=stack"), Ok(Role::Attack(Attack::Stack)));
        assert_eq!(
            role("attack=peer target=bystander"),
            Ok(Role::Attack(Attack::Peer {
                target: "bystander"
            }))
        );
    }

    #[test]
    fn bad_args_say_why() {
        for (args, msg) in [
            ("", "give exactly one of role=, work=, attack="),
            ("role=ping work=spin", "give exactly one of"),
            ("role=ping", "argument \"count\" is missing"),
            (
                "role=ping count=ten",
                "argument count=\"ten\" is not a number",
            ),
            (
                "role=ping count=1 colour=red",
                "unknown argument \"colour\"",
            ),
            ("role=dance", "unknown role \"dance\""),
            ("work=nap", "unknown work \"nap\""),
            ("attack=dma", "unknown attack \"dma\""),
            ("attack=peer", "argument \"target\" is missing"),
            ("attack=hvmem target=x", "unknown argument \"target\""),
            ("role=hostile", "argument \"peer\" is missing"),
            (
                "role=dma-attack hv=lots",
                "argument hv=\"lots\" is not a number",
            ),
            ("role=dma-attack target=x", "unknown argument \"target\""),
            ("role", "argument \"role\" is not key=value"),
            ("role=net-spoof", "argument \"victim\" is missing"),
            ("role=net-spoof victim=guest2", "not an IPv4 address"),
            ("role=hostile-netfront cases=all", "unknown case \"all\""),
        ] {
            let e = role(args).unwrap_err();
            assert!(e.contains(msg), "{args}: {e}");
        }
    }
}
