fn main() {
    std::process::exit(executor::main())
}
