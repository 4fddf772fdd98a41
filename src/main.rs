//! The `dryrun` binary: everything lives in the library; see `dryrun::cli`.

fn main() -> std::process::ExitCode {
    dryrun::cli::main()
}
