//! The net driver domain: not written yet; it exits with status 1 so that a
//! manifest using it fails instead of passing.
#![cfg_attr(target_os = "none", no_std, no_main)]

fn run(_si: &libdom::StartInfo<'_>) -> i64 {
    libdom::println!("the net driver domain is not written yet");
    1
}

libdom::entry!(run);
