//! Links the domain binaries with libdom's `domain.ld` when building for
//! the domain target; on the host the bins are stubs and need nothing.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = std::path::Path::new(&dir).join("../libdom/domain.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        let script = script
            .canonicalize()
            .expect("libdom/domain.ld is beside driver-domains/");
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        println!("cargo:rustc-link-arg-bins=-znoexecstack");
        // The bundle carries the image: keep symbols (for a fault's RIP),
        // drop the DWARF, which is most of the file.
        println!("cargo:rustc-link-arg-bins=--strip-debug");
    }
}
