//! The `fwrepo` binary: everything lives in the library, except one allocator setting that
//! must come before any thread starts.

/// glibc gives threads up to eight malloc arenas per core, and memory freed in one arena
/// serves only that arena: with the blocking pool's threads taking turns on sled, the
/// 100,000-device fleet benchmark held 600 MB where two arenas hold 280 MB at the same
/// speed (threads keep their own small caches either way). `MALLOC_ARENA_MAX` in the
/// environment still decides when set. Before any thread starts.
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread runs yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    fwrepo::cli::main()
}
