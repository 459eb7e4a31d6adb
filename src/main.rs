//! The `fwrepo` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    fwrepo::cli::main()
}
