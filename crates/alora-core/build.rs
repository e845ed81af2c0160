//! Embeds every `cuda/*.cu` and `cuda/*.cuh` file of the repository as `SOURCES`.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let cuda = manifest.join("../../cuda");
    println!("cargo:rerun-if-changed={}", cuda.display());
    // A build without the kernels would ship a wheel whose CUDA backend cannot work.
    let mut files: Vec<PathBuf> = fs::read_dir(&cuda)
        .unwrap_or_else(|e| panic!("cannot read the kernel sources in {}: {e}", cuda.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")));
    assert!(
        !files.is_empty(),
        "no .cu/.cuh kernel sources in {}",
        cuda.display()
    );
    files.sort();
    let mut out = String::from("/// (file name, source text) of every kernel file, sorted by name.\npub const SOURCES: &[(&str, &str)] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let name = f.file_name().unwrap().to_str().unwrap();
        let path = fs::canonicalize(f).unwrap();
        out.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    out.push_str("];\n");
    fs::write(
        PathBuf::from(env::var("OUT_DIR").unwrap()).join("kernel_sources.rs"),
        out,
    )
    .unwrap();
}
