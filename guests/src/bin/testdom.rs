//! `testdom`: the guest domain of the issue-3 scenarios; its role comes from
//! the manifest's `args` (see the `guests` crate). On the host it is a stub.
#![cfg_attr(target_os = "none", no_std, no_main)]

fn run(si: &libdom::StartInfo<'_>) -> i64 {
    guests::testdom(si)
}

libdom::entry!(run);
