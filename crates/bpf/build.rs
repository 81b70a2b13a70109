//! Compiles every `bpf/progs/*.bpf.c` with clang into `OUT_DIR/<name>.o`, which `src/lib.rs`
//! embeds. Without clang or the libbpf headers it warns and writes empty stubs: the crate
//! still builds (so the rest of the workspace does), and loading reports what to install.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The objects src/lib.rs embeds: one per attach point.
const OBJECTS: [&str; 2] = ["from_container", "to_container"];

fn main() {
    if let Err(e) = run() {
        // A real compile error in the C code fails the build with clang's message.
        eprintln!("{e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let bpf = manifest.join("../../bpf");
    println!("cargo:rerun-if-changed={}", bpf.display());
    for dir in ["lib", "progs"] {
        for f in list(&bpf.join(dir))? {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=PALISADE_BPF_CFLAGS");

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let missing = if Command::new(&clang).arg("--version").output().is_err() {
        Some(format!("`{clang}` was not found"))
    } else if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        Some("the libbpf headers (/usr/include/bpf/bpf_helpers.h) were not found".to_string())
    } else {
        None
    };
    if let Some(why) = missing {
        println!(
            "cargo:warning=palisade-bpf: {why}; embedding empty eBPF objects (install clang and libbpf-dev, e.g. scripts/install-deps.sh)"
        );
        for name in OBJECTS {
            fs::write(out.join(format!("{name}.o")), []).map_err(|e| e.to_string())?;
        }
        return Ok(());
    }

    let multiarch = multiarch_include();
    for name in OBJECTS {
        let src = bpf.join("progs").join(format!("{name}.bpf.c"));
        let obj = out.join(format!("{name}.o"));
        let mut cmd = Command::new(&clang);
        cmd.args([
            "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
        ]);
        if let Some(dir) = &multiarch {
            cmd.arg(format!("-I{dir}"));
        }
        if let Ok(extra) = env::var("PALISADE_BPF_CFLAGS") {
            cmd.args(extra.split_whitespace());
        }
        cmd.arg("-c").arg(&src).arg("-o").arg(&obj);
        let output = cmd.output().map_err(|e| format!("running {clang}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "clang failed on {}:\n{}",
                src.display(),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    Ok(())
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        v.push(e.map_err(|e| e.to_string())?.path());
    }
    v.sort();
    Ok(v)
}

/// `/usr/include/<triple>` for `asm/types.h`, which `-target bpf` does not search.
fn multiarch_include() -> Option<String> {
    let triple = match env::consts::ARCH {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        _ => return None,
    };
    let dir = format!("/usr/include/{triple}");
    Path::new(&dir).exists().then_some(dir)
}
