//! The `executor` binary: everything is in the library (`executor::main`), so that the
//! subcommands, the loop and the tests share one implementation.
fn main() {
    std::process::exit(executor::main())
}
