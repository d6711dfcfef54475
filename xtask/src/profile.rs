//! `cargo xtask profile`: where the instructions go, exactly.
//!
//! Under TCG every guest instruction costs host time, so "instructions per
//! request" is the figure to cut (the bench's cost figures count them per
//! domain; this says which functions they are). The system boots as under
//! `run`, with `xtask/profile/tbprof.c` loaded as a QEMU plugin: it counts
//! each translated block's executions and writes, at QEMU's exit, one line
//! `VADDR HADDR INSNS COUNT` per block. Then:
//!
//! - guest RAM is one host mapping, so `HADDR - base` is a block's
//!   physical address; `base` comes from the hypervisor's own blocks, whose
//!   virtual address is [`KERNEL_BASE`] plus their physical address;
//! - a block whose physical address lies in a domain's memory (its
//!   `domain_start` event: `mem_phys`, `mem_bytes`) is that domain's, and is
//!   named with that domain's image (an ELF); a higher-half block is the
//!   hypervisor's; the rest ran before the hypervisor took over or outside
//!   it: the firmware that loads it, its identity-mapped entry code;
//! - `addr2line` names the function at each block's start.
//!
//! Work the hypervisor does for a domain (hypercalls, its interrupts) is
//! counted as the hypervisor's: the plugin sees no CR3. The counts include
//! boot; profile a long workload to make it small. Parsing, attribution and
//! the report are pure and tested here.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use crate::args::RunArgs;
use crate::Paths;

/// The hypervisor image's virtual base (`hypervisor::layout::KERNEL_BASE`):
/// its higher-half code runs at this plus its physical address.
pub const KERNEL_BASE: u64 = 0xffff_ffff_8000_0000;

/// One line of the plugin's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub vaddr: u64,
    pub haddr: u64,
    pub insns: u64,
    pub count: u64,
}

impl Block {
    fn executed(&self) -> u64 {
        self.insns.saturating_mul(self.count)
    }
}

/// Parses the plugin's output; an error names the line.
pub fn parse_blocks(text: &str) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = match f[..] {
            [v, h, n, c] => (|| {
                Some(Block {
                    vaddr: u64::from_str_radix(v, 16).ok()?,
                    haddr: u64::from_str_radix(h, 16).ok()?,
                    insns: n.parse().ok()?,
                    count: c.parse().ok()?,
                })
            })(),
            _ => None,
        };
        out.push(parsed.ok_or_else(|| {
            format!(
                "line {}: {line:?}: expected VADDR HADDR INSNS COUNT (hex hex dec dec)",
                i + 1
            )
        })?);
    }
    Ok(out)
}

/// A domain's memory and the ELF its code comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    pub image: String,
    pub phys: u64,
    pub bytes: u64,
}

/// The regions of a console log's `domain_start` events.
pub fn regions(log: &str) -> Vec<Region> {
    let mut ignored = Vec::new();
    harness::check::parse_events(log, &mut ignored)
        .into_iter()
        .filter(|e| e.name == "domain_start")
        .filter_map(|e| {
            let s = |k: &str| e.fields.get(k)?.as_str().map(str::to_owned);
            let phys = s("mem_phys")?;
            Some(Region {
                name: s("domain")?,
                image: s("image")?,
                phys: u64::from_str_radix(phys.trim_start_matches("0x"), 16).ok()?,
                bytes: e.fields.get("mem_bytes")?.as_u64()?,
            })
        })
        .collect()
}

/// Whose code a block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// The hypervisor's higher half.
    Hypervisor,
    /// Neither: the firmware, the hypervisor's identity-mapped entry.
    Boot,
    /// `regions[i]`.
    Domain(usize),
}

/// Instructions executed at each block start address, per owner.
pub type Attributed = HashMap<Owner, HashMap<u64, u64>>;

/// Splits the blocks between the hypervisor and the domains. Errors when no
/// hypervisor block gives the RAM's host base.
pub fn attribute(blocks: &[Block], regions: &[Region]) -> Result<Attributed, String> {
    // The base the most hypervisor blocks agree on (all of them should).
    let mut bases: HashMap<u64, usize> = HashMap::new();
    for b in blocks.iter().filter(|b| b.vaddr >= KERNEL_BASE) {
        *bases
            .entry(b.haddr.wrapping_sub(b.vaddr - KERNEL_BASE))
            .or_default() += 1;
    }
    let base = bases
        .into_iter()
        .max_by_key(|&(base, n)| (n, base))
        .map(|(base, _)| base)
        .ok_or("the profile holds no block of the hypervisor's higher half")?;
    let mut out: Attributed = HashMap::new();
    for b in blocks {
        let phys = b.haddr.wrapping_sub(base);
        let owner = if b.vaddr >= KERNEL_BASE {
            Owner::Hypervisor
        } else {
            regions
                .iter()
                .position(|r| phys >= r.phys && phys - r.phys < r.bytes)
                .map_or(Owner::Boot, Owner::Domain)
        };
        *out.entry(owner).or_default().entry(b.vaddr).or_default() += b.executed();
    }
    Ok(out)
}

/// Function names for `addrs` from `elf`, in order (`??` where unknown).
fn symbolize(elf: &Path, addrs: &[u64]) -> Result<Vec<String>, String> {
    let mut child = Command::new("addr2line")
        .args(["-f", "-C", "-e"])
        .arg(elf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run addr2line ({e}): install binutils (apt-get install binutils)")
        })?;
    let input: String = addrs.iter().map(|a| format!("{a:#x}\n")).collect();
    let mut stdin = child.stdin.take().ok_or("addr2line: no stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("addr2line: {e}"))?;
    writer
        .join()
        .map_err(|_| "addr2line: the writer panicked")?
        .map_err(|e| format!("addr2line: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Two lines per address: the function, then FILE:LINE.
    let names: Vec<String> = text.lines().step_by(2).map(str::to_owned).collect();
    if names.len() != addrs.len() {
        return Err(format!(
            "addr2line on {} named {} of {} addresses",
            elf.display(),
            names.len(),
            addrs.len()
        ));
    }
    Ok(names)
}

/// One owner's part of the report.
pub struct Section {
    pub title: String,
    pub total: u64,
    /// (function, instructions), most first.
    pub functions: Vec<(String, u64)>,
}

/// Adds up `per_addr` by the function `name` gives each address.
pub fn by_function(
    per_addr: &HashMap<u64, u64>,
    name: &HashMap<u64, String>,
) -> Vec<(String, u64)> {
    let mut sums: HashMap<&str, u64> = HashMap::new();
    for (a, n) in per_addr {
        *sums
            .entry(name.get(a).map_or("??", String::as_str))
            .or_default() += n;
    }
    let mut v: Vec<(String, u64)> = sums.into_iter().map(|(f, n)| (f.to_owned(), n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The table: every owner with its share of all instructions, then its top
/// `top` functions.
pub fn render(sections: &[Section], top: usize) -> String {
    let all: u64 = sections.iter().map(|s| s.total).sum();
    let pct = |n: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            100.0 * n as f64 / of as f64
        }
    };
    let mut s = format!("{all} instructions executed\n");
    for sec in sections {
        let _ = writeln!(
            s,
            "\n{}: {} instructions ({:.1}%)",
            sec.title,
            sec.total,
            pct(sec.total, all)
        );
        for (f, n) in sec.functions.iter().take(top) {
            let _ = writeln!(s, "  {n:>12} {:>5.1}%  {f}", pct(*n, sec.total));
        }
    }
    s
}

/// Builds the plugin with the system's C compiler.
fn build_plugin(p: &Paths) -> Result<PathBuf, String> {
    let src = p.root.join("xtask/profile/tbprof.c");
    let dir = p.airlock.join("profile");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let so = dir.join("tbprof.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .status()
        .map_err(|e| format!("cannot run cc ({e}): install a C compiler (apt-get install gcc)"))?;
    if !status.success() {
        return Err(format!("cc could not build {}", p.show(&src)));
    }
    Ok(so)
}

pub fn profile(mut r: RunArgs, top: usize) -> Result<ExitCode, String> {
    let p = Paths::new();
    let so = build_plugin(&p)?;
    let out = p.airlock.join("profile/blocks.txt");
    let _ = std::fs::remove_file(&out);
    r.qemu_args.push("-plugin".into());
    r.qemu_args
        .push(format!("{},out={}", so.display(), out.display()));
    let booted = crate::boot(&r)?;
    let code = booted.verdict();
    let text = std::fs::read_to_string(&out).map_err(|e| {
        format!(
            "{}: {e} (did QEMU load the plugin? it needs a QEMU built with plugins)",
            p.show(&out)
        )
    })?;
    let blocks = parse_blocks(&text).map_err(|e| format!("{}: {e}", p.show(&out)))?;
    let regions = regions(&booted.run.log);
    let attributed = attribute(&blocks, &regions)?;
    let mut sections = Vec::new();
    for (owner, per_addr) in &attributed {
        let (title, elf) = match owner {
            Owner::Hypervisor => ("hypervisor".to_owned(), booted.kernel.clone()),
            Owner::Boot => (
                "boot (firmware, the hypervisor's entry)".to_owned(),
                booted.kernel.clone(),
            ),
            Owner::Domain(i) => (
                format!("domain {} (image {})", regions[*i].name, regions[*i].image),
                booted.image_dir.join(&regions[*i].image),
            ),
        };
        let mut addrs: Vec<u64> = per_addr.keys().copied().collect();
        addrs.sort_unstable();
        let names: HashMap<u64, String> = addrs
            .iter()
            .copied()
            .zip(symbolize(&elf, &addrs)?)
            .collect();
        sections.push(Section {
            title,
            total: per_addr.values().sum(),
            functions: by_function(per_addr, &names),
        });
    }
    sections.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.title.cmp(&b.title)));
    println!("{}", render(&sections, top));
    eprintln!("airlock: the plugin's counts are in {}", p.show(&out));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 0x7f00_0000_0000;

    fn block(vaddr: u64, phys: u64, insns: u64, count: u64) -> Block {
        Block {
            vaddr,
            haddr: RAM + phys,
            insns,
            count,
        }
    }

    #[test]
    fn parses_the_plugin_output_and_names_a_bad_line() {
        let b = parse_blocks("ffffffff80112251 7f198ff12251 6 1\n400000 7f0000 3 10\n").unwrap();
        assert_eq!(
            b,
            [
                Block {
                    vaddr: 0xffff_ffff_8011_2251,
                    haddr: 0x7f19_8ff1_2251,
                    insns: 6,
                    count: 1
                },
                Block {
                    vaddr: 0x40_0000,
                    haddr: 0x7f_0000,
                    insns: 3,
                    count: 10
                }
            ]
        );
        let e = parse_blocks("400000 7f0000 3 10\n400000 zz 3 10\n").unwrap_err();
        assert!(e.starts_with("line 2: "), "{e}");
        assert!(parse_blocks("1 2 3\n").is_err());
    }

    #[test]
    fn blocks_go_to_the_domain_whose_memory_holds_them() {
        let regions = [
            Region {
                name: "blk".into(),
                image: "blk".into(),
                phys: 0x69_9000,
                bytes: 0x80_0000,
            },
            Region {
                name: "guest".into(),
                image: "testdom".into(),
                phys: 0xea_2000,
                bytes: 0x40_0000,
            },
        ];
        let blocks = [
            block(KERNEL_BASE + 0x11_2000, 0x11_2000, 5, 100),
            block(KERNEL_BASE + 0x11_3000, 0x11_3000, 2, 1),
            // both domains link at 0x400000: the physical address decides
            block(0x40_1000, 0x69_9000 + 0x2000, 4, 10),
            block(0x40_1000, 0xea_2000 + 0x2000, 4, 3),
            block(0x40_1000, 0xea_2000 + 0x2000, 4, 2), // translated again
            // the boot code runs identity-mapped, outside every domain
            block(0x10_0040, 0x10_0040, 7, 1),
        ];
        let a = attribute(&blocks, &regions).unwrap();
        assert_eq!(a[&Owner::Hypervisor][&(KERNEL_BASE + 0x11_2000)], 500);
        assert_eq!(a[&Owner::Boot][&0x10_0040], 7);
        assert_eq!(a[&Owner::Domain(0)][&0x40_1000], 40);
        assert_eq!(a[&Owner::Domain(1)][&0x40_1000], 20);
        assert!(attribute(&blocks[2..], &regions).is_err());
    }

    #[test]
    fn functions_are_summed_and_ranked() {
        let per_addr: HashMap<u64, u64> = [(1, 10), (2, 30), (3, 5)].into_iter().collect();
        let names: HashMap<u64, String> = [
            (1, "f".to_owned()),
            (2, "g".to_owned()),
            (3, "f".to_owned()),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            by_function(&per_addr, &names),
            [("g".to_owned(), 30), ("f".to_owned(), 15)]
        );
        let s = render(
            &[Section {
                title: "domain blk (image blk)".into(),
                total: 45,
                functions: by_function(&per_addr, &names),
            }],
            1,
        );
        assert!(s.starts_with("45 instructions executed\n"), "{s}");
        assert!(
            s.contains("domain blk (image blk): 45 instructions (100.0%)"),
            "{s}"
        );
        assert!(s.contains("66.7%  g"), "{s}");
        assert!(!s.contains("  f\n"), "only the top function: {s}");
    }

    #[test]
    fn regions_come_from_domain_start_events() {
        let log = "EV {\"ev\":\"domain_start\",\"domain\":\"blk\",\"domid\":1,\"label\":\"blk_driver\",\"image\":\"blk\",\"mem_bytes\":8388608,\"mem_phys\":\"0x00699000\",\"weight\":1}\n";
        assert_eq!(
            regions(log),
            [Region {
                name: "blk".into(),
                image: "blk".into(),
                phys: 0x69_9000,
                bytes: 8 << 20
            }]
        );
    }
}
