//! CUDA kernel sources from `cuda/`, embedded at build time so the wheel, the Python
//! loader and the Rust benches all use the very same text.

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

#[cfg(test)]
mod tests {
    #[test]
    fn sources_are_embedded_by_name() {
        let mut names: Vec<_> = super::SOURCES.iter().map(|(n, _)| *n).collect();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate kernel file names");
        for (name, text) in super::SOURCES {
            assert!(name.ends_with(".cu") || name.ends_with(".cuh"), "{name}");
            assert!(!text.is_empty(), "{name} is empty");
        }
    }
}
