//! `executor-guest-agent`: the guest agent of the microvm runtime as its own small binary, so that
//! the initramfs the guest kernel unpacks (byte by byte, under TCG) does not carry the whole
//! executor. It is PID 1 of each microVM (`/init`).

fn main() {
    std::process::exit(executor::guest::agent::main())
}
